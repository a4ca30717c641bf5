"""What `jeidnn prune` removes and how it recovers (:class:`PruneSettings`); which exit becomes the last."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from jeidnn.errors import JeidnnError


@dataclass(frozen=True)
class PruneSettings:
    """What ``jeidnn prune`` removes and how it recovers."""

    heads: float = 0.0
    """Fraction of all attention heads to remove, in [0, 1)."""
    ffn: float = 0.0
    """Fraction of all FFN (intermediate) neurons to remove, in [0, 1)."""
    layers: str | int | None = None
    """``auto``: drop the layers after the deepest exit the operating point takes on calib; N: keep the
    first N layers (N must carry an exit); None: keep every layer."""
    recover_steps: int = 0
    """Optimizer steps of the recovery fine-tune on train (0: none)."""
    recover_lr: float | None = None
    """Its learning rate (default: the run's ``finetune.lr``)."""
    importance_samples: int | None = None
    """Val samples the importance sums over (default: all of val)."""

    def check(self) -> None:
        """One-line errors for values that are wrong whatever the run."""
        for option, value in (("--heads", self.heads), ("--ffn", self.ffn)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise JeidnnError(f"{option} must be a fraction in [0, 1), got {value!r}")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise JeidnnError(f"--layers must be auto or a number of layers, got {self.layers!r}")
        if isinstance(self.layers, int) and self.layers < 1:
            raise JeidnnError(f"--layers must keep at least 1 layer, got {self.layers}")
        if self.recover_steps < 0:
            raise JeidnnError(f"--recover-steps must be >= 0, got {self.recover_steps}")
        if self.recover_lr is not None and not (math.isfinite(self.recover_lr) and self.recover_lr > 0):
            raise JeidnnError(f"--recover-lr must be a positive number, got {self.recover_lr}")
        if self.importance_samples is not None and self.importance_samples < 1:
            raise JeidnnError(f"--importance-samples must be >= 1, got {self.importance_samples}")


def parse_layers(text: str | None) -> str | int | None:
    """``--layers``: ``auto`` or a positive integer."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise JeidnnError(f"--layers must be auto or a number of layers, got {text!r}") from None


def last_exit(layers: str | int | None, exit_layers: list[int], calib_exits: Tensor | None) -> int:
    """The 0-based exit that becomes the last one."""
    if layers is None:
        return len(exit_layers) - 1
    if layers == "auto":
        if calib_exits is None:
            raise JeidnnError("--layers auto needs an early-exit operating point; pass --layers N")
        return int(calib_exits.max())
    if layers > exit_layers[-1]:
        raise JeidnnError(f"--layers {layers} is beyond the model's {exit_layers[-1]} layers")
    if layers not in exit_layers:
        raise JeidnnError(
            f"--layers {layers} carries no exit; keep up to an exit layer: {', '.join(map(str, exit_layers))}"
        )
    return exit_layers.index(layers)
