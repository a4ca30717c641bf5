"""Per-exit split conformal prediction sets (DESIGN.md §6).

Each sample is scored at the exit it takes: ``s = 1 - p_y``. For exit ``l`` the
quantile ``q_l`` is the ``ceil((n_l + 1)(1 - alpha))``-th smallest calibration score among
the ``n_l`` calibration samples that exit at ``l``; when that rank exceeds ``n_l`` the
quantile is 1 (the full label set). Exits with fewer than ``min_samples`` calibration
samples use the pooled quantile (same rule over all calibration samples) and are reported
in ``fallback_exits``. The set is ``{y : p_y >= 1 - q_l}``.

Conditioning the quantile on the exit keeps the marginal guarantee
``P(y in set) >= 1 - alpha``: the exit decision does not look at the label, so within each
exit the calib and test samples stay exchangeable. The pooled fallback gives up the
per-exit guarantee for that exit only (it is the standard split-conformal quantile there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ConformalCoverage",
    "ConformalQuantiles",
    "ConformalSetSize",
    "conformal_quantile",
    "evaluate_sets",
    "fit_conformal",
    "prediction_sets",
]


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """Split-conformal quantile: the ``ceil((n + 1)(1 - alpha))``-th smallest score, or 1 if that rank > n.

    Args:
        scores: (n,) nonconformity scores in [0, 1].
        alpha: miscoverage level in (0, 1).

    Example:
        >>> # rank ceil((4 + 1) * 0.6) = 3: the third smallest score
        >>> round(conformal_quantile(torch.tensor([0.1, 0.4, 0.2, 0.3]), alpha=0.4), 4)
        0.3
    """
    n = scores.numel()
    # The small epsilon keeps exact products such as 20 * 0.95 = 19 from rounding up to 20.
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if rank > n:
        return 1.0
    return float(scores.double().sort().values[rank - 1])


@dataclass
class ConformalQuantiles:
    """Per-exit quantiles fitted on the calibration split."""

    alpha: float
    quantiles: Tensor  # (L,) float64 q_l
    calib_counts: Tensor  # (L,) int64 calibration samples exiting at each exit
    fallback_exits: list[int]  # 0-based exits that use the pooled quantile
    pooled_quantile: float


def fit_conformal(
    probs: Tensor, labels: Tensor, exits: Tensor, num_exits: int, alpha: float, min_samples: int = 30
) -> ConformalQuantiles:
    """Fit per-exit quantiles on calibration data.

    Args:
        probs: (N, C) probabilities at the exit each calibration sample takes.
        labels: (N,) true classes.
        exits: (N,) 0-based exit taken.
        num_exits: L.
        alpha: miscoverage level.
        min_samples: an exit with fewer calibration samples uses the pooled quantile.

    Returns:
        The quantiles and which exits fell back to the pooled one.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"Expected argument `alpha` to lie in (0, 1) but got {alpha}")
    scores = 1 - probs.double().gather(1, labels.long()[:, None]).squeeze(1)  # (N,)
    pooled = conformal_quantile(scores, alpha)
    counts = torch.bincount(exits.long(), minlength=num_exits)[:num_exits]
    quantiles = torch.empty(num_exits, dtype=torch.float64)
    fallback: list[int] = []
    for exit_ in range(num_exits):
        if counts[exit_] < min_samples:
            quantiles[exit_] = pooled
            fallback.append(exit_)
        else:
            quantiles[exit_] = conformal_quantile(scores[exits == exit_], alpha)
    return ConformalQuantiles(alpha, quantiles, counts, fallback, pooled)


def prediction_sets(probs: Tensor, exits: Tensor, quantiles: Tensor) -> Tensor:
    """Conformal sets ``{y : p_y >= 1 - q_l}`` at each sample's exit.

    Written as ``1 - p_y <= q_l`` so the comparison uses the same floating-point expression
    as the score: a calibration sample whose score equals ``q_l`` is always in its own set.

    Args:
        probs: (N, C) probabilities at the exit taken.
        exits: (N,) 0-based exit taken.
        quantiles: (L,) per-exit quantiles.

    Returns:
        (N, C) bool membership.
    """
    q = quantiles.double()[exits.long()]  # (N,)
    return (1 - probs.double()) <= q[:, None]


def _conformal_update(
    probs: Tensor, exits: Tensor, labels: Tensor, quantiles: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-batch sufficient statistics: (#covered, total set size, #samples)."""
    sets = prediction_sets(probs, exits, quantiles)  # (B, C)
    covered = sets.gather(1, labels.long()[:, None]).sum()
    return covered, sets.sum(), torch.tensor(labels.numel())


def _ratio_compute(numerator: Tensor, total: Tensor) -> Tensor:
    return numerator.double() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class _ConformalMetric(Metric):
    is_differentiable = False
    full_state_update = False

    def __init__(self, quantiles: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("quantiles", quantiles.double().clone(), persistent=False)
        self.add_state("covered", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("set_size", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, exits: Tensor, labels: Tensor) -> None:
        """Add a batch: probs (B, C) at the exit taken, exits (B,), labels (B,)."""
        covered, set_size, total = _conformal_update(probs, exits, labels, self.quantiles)
        self.covered += covered.to(self.covered)
        self.set_size += set_size.to(self.set_size)
        self.total += total.to(self.total)


class ConformalCoverage(_ConformalMetric):
    """Fraction of samples whose true label is in their conformal set.

    Example:
        >>> metric = ConformalCoverage(quantiles=torch.tensor([0.5, 1.0]))
        >>> metric.update(torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 0]), torch.tensor([1, 1]))
        >>> float(metric.compute())
        0.5
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        return _ratio_compute(self.covered, self.total)


class ConformalSetSize(_ConformalMetric):
    """Mean number of labels in the conformal sets.

    Example:
        >>> metric = ConformalSetSize(quantiles=torch.tensor([0.5, 1.0]))
        >>> metric.update(torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1]), torch.tensor([1, 1]))
        >>> float(metric.compute())
        1.5
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        return _ratio_compute(self.set_size, self.total)


def evaluate_sets(
    calib_probs: Tensor,
    calib_labels: Tensor,
    calib_exits: Tensor,
    test_probs: Tensor,
    test_labels: Tensor,
    test_exits: Tensor,
    num_exits: int,
    alpha: float,
    min_samples: int = 30,
) -> dict:
    """Fit quantiles on calib and report test coverage and mean set size.

    All probabilities are (N, C) at the exit each sample takes; exits are 0-based.

    Returns:
        ``{"coverage", "mean_set_size", "fallback_exits", "quantiles"}`` (plain Python values).
        ``fallback_exits`` lists the exits whose pooled quantile was actually used, i.e. those
        with fewer than ``min_samples`` calib samples that at least one test sample takes.
    """
    fitted = fit_conformal(calib_probs, calib_labels, calib_exits, num_exits, alpha, min_samples)
    coverage = ConformalCoverage(fitted.quantiles)
    size = ConformalSetSize(fitted.quantiles)
    coverage.update(test_probs, test_exits, test_labels)
    size.update(test_probs, test_exits, test_labels)
    return {
        "coverage": float(coverage.compute()),
        "mean_set_size": float(size.compute()),
        "fallback_exits": [e for e in fitted.fallback_exits if bool((test_exits == e).any())],
        "quantiles": fitted.quantiles.tolist(),
    }
