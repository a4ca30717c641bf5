"""The early-exit model's parts: backbone adapter (``backbone``), exit heads (``heads``), learned gates (what
they read: ``gate_inputs``; the network: ``gates``; outputs -> exits: ``exit_rules``), rule exits
(``policies``), both inference paths (``early_exit``), structured pruning surgery (``structured``), FLOPs
(``cost``) and tokenizers / image processors (``preprocess``).
"""
