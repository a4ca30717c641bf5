"""Per-exit split conformal prediction sets, small exits merged into groups (docs/evaluation.md).

Each sample is scored at the exit it takes: ``s = 1 - p_y``. The exits are partitioned into
groups of consecutive exits (:func:`group_exits`): an exit with enough calibration samples is a
group of its own, smaller ones are merged with their neighbours. For group ``g`` the quantile
``q_g`` is the ``ceil((n_g + 1)(1 - alpha))``-th smallest calibration score among the ``n_g``
calibration samples whose exit lies in ``g``; when that rank exceeds ``n_g`` the quantile is 1
(the full label set). Every exit of a group uses the group's quantile. The set is
``{y : p_y >= 1 - q_g}``.

Why this is valid: the exit taken is a function of the input alone (never of the label), and so
is the group of that exit, provided the partition itself does not depend on the calibration or
test labels. Within each group the calibration and test scores are then exchangeable, and the
rank rule gives ``P(y in set | group) >= 1 - alpha`` for every group, hence also marginally.
A pooled quantile used only for the small exits (while large exits keep their own) has no such
guarantee: it is calibrated for the mixture of all exits, and under-covers an exit whose samples
are harder than average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from jeidnn.model.policies import select_exit

__all__ = [
    "ConformalCoverage",
    "ConformalQuantiles",
    "ConformalSetSize",
    "alpha_key",
    "conformal_quantile",
    "evaluate_sets",
    "fit_conformal",
    "group_exits",
    "prediction_sets",
    "resplit_miss",
]


def alpha_key(alpha: float) -> str:
    """JSON key of a conformal level: 0.05 -> "0.05", 0.1 -> "0.1"."""
    return format(alpha, "g")


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


def group_exits(counts: Sequence[int] | Tensor, min_samples: int) -> list[list[int]]:
    """Partition exits 0 .. L - 1 into runs of consecutive exits with >= ``min_samples`` samples each.

    Walk the exits in order and accumulate them into the current group until it holds at least
    ``min_samples`` samples, then start a new one. A short tail (fewer samples) joins the previous
    group; if there is none, everything is one group.

    Example:
        >>> group_exits([0, 0, 50, 3, 40, 5], min_samples=30)
        [[0, 1, 2], [3, 4, 5]]
    """
    counts = [int(c) for c in counts]
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for exit_, count in enumerate(counts):
        current.append(exit_)
        total += count
        if total >= min_samples:
            groups.append(current)
            current, total = [], 0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


@dataclass
class ConformalQuantiles:
    """Per-exit quantiles fitted on the calibration split (exits of one group share a quantile)."""

    alpha: float
    quantiles: Tensor  # (L,) float64 q of each exit's group
    calib_counts: Tensor  # (L,) int64 calibration samples exiting at each exit
    groups: list[list[int]]  # partition of the 0-based exits

    @property
    def merged_groups(self) -> list[list[int]]:
        """The groups of more than one exit."""
        return [g for g in self.groups if len(g) > 1]


def _group_ids(groups: list[list[int]], num_exits: int) -> Tensor:
    group_of = torch.empty(num_exits, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    return group_of


def _group_quantiles(
    scores: Tensor, exits: Tensor, groups: list[list[int]], num_exits: int, alphas: Sequence[float]
) -> Tensor:
    """(A, L) quantile of each exit's group at each alpha: one sort for all groups and levels."""
    group_of = _group_ids(groups, num_exits)
    sample_group = group_of[exits.long()]  # (N,)
    # Sort by score, then stably by group: scores ascending within each group, values exact.
    by_score = scores.double().sort(stable=True)
    ordered = by_score.values[sample_group[by_score.indices].sort(stable=True).indices]  # (N,)
    counts = torch.bincount(sample_group, minlength=len(groups))  # (G,)
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    alpha = torch.tensor(list(alphas), dtype=torch.float64)[:, None]  # (A, 1)
    # The small epsilon keeps exact products such as 20 * 0.95 = 19 from rounding up to 20.
    rank = torch.ceil((counts[None, :] + 1) * (1 - alpha) - 1e-9).long()  # (A, G)
    full = rank > counts[None, :]
    index = (starts[None, :] + rank - 1).clamp(0, max(len(ordered) - 1, 0))
    picked = ordered[index] if len(ordered) else torch.zeros_like(index, dtype=torch.float64)
    return torch.where(full, 1.0, picked)[:, group_of]  # (A, L)


def _check_groups(groups: list[list[int]], num_exits: int) -> None:
    flat = sorted(e for g in groups for e in g)
    if flat != list(range(num_exits)):
        raise ValueError(f"Expected `groups` to partition the exits 0 .. {num_exits - 1} but got {groups}")


def fit_conformal(
    probs: Tensor,
    labels: Tensor,
    exits: Tensor,
    num_exits: int,
    alpha: float,
    min_samples: int = 30,
    groups: list[list[int]] | None = None,
) -> ConformalQuantiles:
    """Fit per-group quantiles on calibration data.

    Args:
        probs: (N, C) probabilities at the exit each calibration sample takes.
        labels: (N,) true classes.
        exits: (N,) 0-based exit taken.
        num_exits: L.
        alpha: miscoverage level.
        min_samples: with ``groups=None``, exits are grouped by :func:`group_exits` on these
            calibration counts.
        groups: a fixed partition of the exits, e.g. from the exit counts of an independent split
            (the evaluation uses calib half A), which keeps the guarantee exact.

    Returns:
        The quantiles and the partition used.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"Expected argument `alpha` to lie in (0, 1) but got {alpha}")
    scores = 1 - probs.double().gather(1, labels.long()[:, None]).squeeze(1)  # (N,)
    counts = torch.bincount(exits.long(), minlength=num_exits)[:num_exits]
    if groups is None:
        groups = group_exits(counts, min_samples)
    _check_groups(groups, num_exits)
    quantiles = _group_quantiles(scores, exits, groups, num_exits, [alpha])[0]
    return ConformalQuantiles(alpha, quantiles, counts, groups)


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
    groups: list[list[int]] | None = None,
) -> dict:
    """Fit quantiles on calib and report test coverage and mean set size.

    All probabilities are (N, C) at the exit each sample takes; exits are 0-based.

    Returns:
        ``{"coverage", "mean_set_size", "merged_groups", "quantiles"}`` (plain Python values);
        ``merged_groups`` lists the groups of more than one exit.
    """
    fitted = fit_conformal(calib_probs, calib_labels, calib_exits, num_exits, alpha, min_samples, groups)
    # The metric classes' own update, run once for both numbers.
    covered, set_size, total = _conformal_update(test_probs, test_exits, test_labels, fitted.quantiles)
    return {
        "coverage": float(_ratio_compute(covered, total)),
        "mean_set_size": float(_ratio_compute(set_size, total)),
        "merged_groups": fitted.merged_groups,
        "quantiles": fitted.quantiles.tolist(),
    }


def resplit_miss(
    probs: Tensor,
    labels: Tensor,
    exits: Tensor,
    num_exits: int,
    groups: list[list[int]],
    num_calib: int,
    alphas: Sequence[float],
    resplits: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Miss rate (1 - coverage) over random re-splits of a pool into calibration and test parts.

    Each re-split permutes the pool, fits the group quantiles on the first ``num_calib`` samples and
    measures the miss rate on the rest. Valid conformal sets have mean miss rate <= alpha up to the
    re-split noise.

    Args:
        probs: (N, C) probabilities at the exit each pooled sample takes.
        labels: (N,) true classes.
        exits: (N,) 0-based exits (label-free).
        num_exits: L.
        groups: fixed partition of the exits.
        num_calib: size of the calibration part.
        alphas: miscoverage levels.
        resplits: number of re-splits.
        seed: seeds the permutations.

    Returns:
        ``{alpha_key: {"mean", "std", "min", "max"}}`` of the miss rates.
    """
    _check_groups(groups, num_exits)
    scores = 1 - probs.double().gather(1, labels.long()[:, None]).squeeze(1)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    misses = torch.empty(len(alphas), resplits, dtype=torch.float64)
    for r in range(resplits):
        perm = torch.randperm(len(labels), generator=gen)
        cal, test = perm[:num_calib], perm[num_calib:]
        q = _group_quantiles(scores[cal], exits[cal], groups, num_exits, alphas)  # (A, L)
        covered = scores[test][None, :] <= q[:, exits[test].long()]  # same expression as prediction_sets
        misses[:, r] = 1 - covered.double().mean(dim=1)
    return {
        alpha_key(a): {
            "mean": float(m.mean()),
            "std": float(m.std(unbiased=False)),
            "min": float(m.min()),
            "max": float(m.max()),
        }
        for a, m in zip(alphas, misses, strict=True)
    }


def calib_at_exit(
    probs: Tensor, labels: Tensor, exits: Tensor, a: Tensor, b: Tensor, num_exits: int, min_samples: int
) -> tuple[list[list[int]], tuple[Tensor, Tensor, Tensor]]:
    """What conformal sets are fitted on for one exit assignment of the calib split.

    Args:
        probs: (N, L, C) calib probabilities at every exit; labels: (N,); exits: (N,) the exit taken.
        a, b: indices of calib halves A and B.

    Returns:
        The exit groups, from the calib-A exit counts (independent of calib B and test, so the sets stay
        valid), and calib B's probabilities at the exit taken (N_b, C), labels (N_b,) and exits (N_b,).
    """
    groups = group_exits(torch.bincount(exits[a].long(), minlength=num_exits), min_samples)
    exits_b = exits[b].long()
    return groups, (select_exit(probs[b], exits_b), labels[b], exits_b)


def fit_at_exits(
    probs: Tensor,
    labels: Tensor,
    exits: Tensor,
    a: Tensor,
    b: Tensor,
    num_exits: int,
    alphas: Sequence[float],
    min_samples: int,
) -> tuple[dict[str, list[float]], list[list[int]]]:
    """Per-exit quantiles ``{alpha_key: [q_1 .. q_L]}`` fitted on calib half B at the exits taken, and the
    exit groups (see :func:`calib_at_exit`)."""
    groups, calib_b = calib_at_exit(probs, labels, exits, a, b, num_exits, min_samples)
    quantiles = {
        alpha_key(x): fit_conformal(*calib_b, num_exits, x, groups=groups).quantiles.tolist() for x in alphas
    }
    return quantiles, groups
