"""The run: resume state and the order of stages, from config to report.json and the exported model."""
