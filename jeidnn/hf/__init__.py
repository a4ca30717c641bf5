"""The early-exit model as a Hugging Face model: config, PreTrainedModel, saved folders, prediction."""
