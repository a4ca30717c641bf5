"""What every training stage of a run reads: the run context.

:class:`RunContext` holds the settings a stage reads (config, run folder, device, progress bars); the model
and data the run loads once are :class:`jeidnn.train.inputs.RunInputs`. A stage takes the parts it needs as
arguments and returns a typed result (:mod:`jeidnn.train.results`); a stage that trains the backbone or the
exits in place says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from jeidnn.config.schema import RunConfig


@dataclass(frozen=True)
class RunContext:
    """The settings every stage of one run reads.

    Example:
        >>> ctx = RunContext(cfg, cfg.run_dir, torch.device("cpu"), progress=False)
    """

    cfg: RunConfig
    run_dir: Path
    """`runs/<name>/`: checkpoints, cache, predictions and logs of the stages."""
    device: torch.device
    """Where the backbone passes outside Lightning run (cost counting): `cfg.accelerator` resolved."""
    progress: bool
    """Show progress bars."""
    precision: str = "32-true"
    """Lightning precision of stage 0 and the joint phase: `cfg.precision` resolved for `device`."""
