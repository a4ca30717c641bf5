"""Stages 3-4: calibration, conformal sets, the budgeted test-blind protocol, metrics and the report."""
