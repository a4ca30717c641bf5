"""What each training stage returns: typed results, passed down the run in memory.

report.json's training part is assembled once from these (:func:`jeidnn.train.report.training_report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from jeidnn.train.features import FeatureSplit
from jeidnn.train.stage2 import TrainedModel

EVAL_SPLITS = ("val", "calib", "test")
"""The splits whose predictions the evaluation reads."""


@dataclass(frozen=True)
class Stage0Result:
    """Stage 0 (backbone + final head), or where the final head comes from when it is off."""

    finetune: dict[str, Any]
    """report.json's `finetune`: steps, validations and why it stopped; or why it was skipped."""
    train_final_head: bool
    """Stage 1 must train the final head (stage 0 off and no trained classifier in the checkpoint)."""


@dataclass(frozen=True)
class JointResult:
    """The joint phase (backbone + every exit) of `regime: joint | mixed`."""

    summary: dict[str, Any]
    """report.json's `regime.joint`: steps, validations and why it stopped."""


@dataclass(frozen=True)
class FeatureCache:
    """Each split's pooled features at every exit layer, computed once by the frozen backbone."""

    splits: dict[str, FeatureSplit]
    """Per split name (`train`, `val`, `calib`, `test`)."""

    def __getitem__(self, split: str) -> FeatureSplit:
        return self.splits[split]


@dataclass(frozen=True)
class WarmupResult:
    """Stage 1 (IM warm-up) and the warmed-up exits' predictions."""

    best_epoch: list[int] | None
    """Each trained head's best epoch (-1: the joint phase's weights were kept); None when resumed."""
    logits: dict[str, Tensor]
    """Per split of :data:`EVAL_SPLITS`, every exit's logits ``(N, L, C)``."""
    labels: dict[str, Tensor]
    """Per split of :data:`EVAL_SPLITS`, ``(N,)``."""

    def tensors(self) -> dict[str, Tensor]:
        """`<split>_logits` / `<split>_labels`, as `predictions/warmup.safetensors` stores them."""
        return {
            f"{s}_{k}": v
            for s in self.logits
            for k, v in (("logits", self.logits[s]), ("labels", self.labels[s]))
        }


@dataclass(frozen=True)
class Stage2Result:
    """Stage 2: every variant's trained models and their predictions, keyed by variant and model index (λ
    ascending)."""

    costs: dict[str, list[float]]
    """Per variant, its exit costs ``(L,)`` with its own gates (float64 as counted)."""
    models: dict[str, list[TrainedModel]]
    """Per variant, its models sorted by λ."""
    predictions: dict[str, list[dict[str, Tensor]]]
    """Per variant and model index: `<split>_scores` ``(N, L-1)``, `<split>_logits` ``(N, L, C)`` and
    `<split>_labels` ``(N,)`` for each split of :data:`EVAL_SPLITS`."""
    crossfit_s: float | None = None
    """Seconds of the out-of-fold IM warm-ups of `gate_data: crossfit` (within stage 2's time); None
    without such a variant."""
