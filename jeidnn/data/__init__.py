"""Data: labelled samples from embedded corpora, CSV/JSONL files or `datasets` (sources), deterministic
splits and their fingerprint (splits), batches (datamodule).
"""
