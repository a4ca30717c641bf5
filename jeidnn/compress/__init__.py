"""Structured pruning of a finished run's model (`jeidnn prune`)."""
