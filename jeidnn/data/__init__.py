"""Data: labelled samples from embedded corpora, CSV/JSONL files or `datasets`, deterministic splits,
batches.
"""
