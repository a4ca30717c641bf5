"""The early-exit model as a Hugging Face model: its config.json (``config``), the PreTrainedModel
(``modeling``), saved folders (``folder``), inputs -> batches -> predictions (``batches``) and
``jeidnn predict`` (``predict``).
"""
