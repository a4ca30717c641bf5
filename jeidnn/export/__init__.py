"""Export: a run's operating point as a Hugging Face model folder."""
