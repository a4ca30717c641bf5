"""Accuracy-cost curves: upper envelope, AUC, matched-cost interpolation; cost and exit metrics.

The **upper envelope** of a method's (cost, accuracy) operating points is the piecewise-
linear curve through its Pareto-optimal points (sorted by cost, each strictly more accurate
than every cheaper-or-equal point). Between two neighbouring Pareto points it is linear
because that trade-off is achievable: send each sample to one policy or the other at
random in the right proportion. It is monotone non-decreasing by construction. It is
defined on [cheapest point, most expensive point]: past the last Pareto point it stays flat,
since a budget that affords a dominated, costlier point also affords that Pareto point
("best accuracy at cost ≤ c"). Outside that range it is NaN: no operating point covers it.

The **AUC** of an envelope over [lo, hi] is divided by (hi - lo), so it reads as the mean
accuracy over that cost range. [lo, hi] is the range every compared method covers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from jeidnn.evaluate.conformal import alpha_key

__all__ = [
    "ExitHistogram",
    "ExpectedCost",
    "common_cost_range",
    "envelope_summary",
    "envelope_auc",
    "interpolate_envelope",
    "paired_bootstrap",
    "upper_envelope",
]


def upper_envelope(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the Pareto-optimal points, in order of increasing cost (and accuracy).

    Example:
        >>> upper_envelope([0.5, 0.2, 0.8, 0.6], [0.7, 0.6, 0.9, 0.65])
        [1, 0, 2]
    """
    c = np.asarray(costs, dtype=np.float64)
    a = np.asarray(accuracies, dtype=np.float64)
    keep = ~(np.isnan(c) | np.isnan(a))
    # Sort by cost, and by accuracy descending among equal costs so the best of a tie wins.
    order = [i for i in np.lexsort((-a, c)) if keep[i]]
    envelope: list[int] = []
    best = -np.inf
    for i in order:
        if a[i] > best:
            envelope.append(int(i))
            best = a[i]
    return envelope


def interpolate_envelope(
    costs: Sequence[float],
    accuracies: Sequence[float],
    at: Sequence[float] | float,
    values: Sequence[float] | None = None,
) -> np.ndarray:
    """Linearly interpolate along the upper envelope at the given costs ("matched cost").

    Args:
        costs: (P,) cost of each operating point.
        accuracies: (P,) accuracy of each operating point (defines the envelope).
        at: costs to evaluate at.
        values: (P,) a per-point quantity to carry along the same envelope (ECE, set size);
            None interpolates the accuracy itself.

    Returns:
        (len(at),) float64; NaN outside the envelope's cost range.
    """
    idx = upper_envelope(costs, accuracies)
    at_arr = np.atleast_1d(np.asarray(at, dtype=np.float64))
    if not idx:
        return np.full(at_arr.shape, np.nan)
    all_costs = np.asarray(costs, dtype=np.float64)
    x = all_costs[idx]
    y = np.asarray(accuracies if values is None else values, dtype=np.float64)[idx]
    out = np.interp(at_arr, x, y)  # flat past the last Pareto point
    # A tolerance so a point that lies on the envelope's end (same cost up to rounding) matches.
    tol = 1e-9
    top = np.nanmax(all_costs[~np.isnan(np.asarray(accuracies, dtype=np.float64))])
    out[(at_arr < x[0] - tol) | (at_arr > top + tol)] = np.nan
    return out


def envelope_auc(costs: Sequence[float], accuracies: Sequence[float], lo: float, hi: float) -> float:
    """Area under the upper envelope on [lo, hi] divided by (hi - lo): a mean accuracy.

    Exact for the piecewise-linear envelope (trapezoids between its kinks). When lo == hi
    it is the envelope's value there; NaN if [lo, hi] is empty or not covered by the envelope.

    Example:
        >>> envelope_auc([0.0, 1.0], [0.5, 0.7], 0.0, 1.0)
        0.6
    """
    if not hi >= lo:
        return float("nan")
    idx = upper_envelope(costs, accuracies)
    if not idx:
        return float("nan")
    x = np.asarray(costs, dtype=np.float64)[idx]  # kinks of the envelope (it is flat after the last)
    if hi - lo < 1e-12:
        return float(interpolate_envelope(costs, accuracies, [lo])[0])
    grid = np.unique(np.concatenate([[lo, hi], x[(x > lo) & (x < hi)]]))
    y = interpolate_envelope(costs, accuracies, grid)
    if np.isnan(y).any():
        return float("nan")
    area = float(np.sum((grid[1:] - grid[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / (hi - lo)


def common_cost_range(method_costs: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """The cost range every method covers: (max of the minima, min of the maxima).

    lo > hi means the methods' ranges do not overlap; :func:`envelope_auc` then gives NaN.
    Exclude single-point upper bounds such as the oracle before calling.
    """
    finite = {k: [c for c in v if np.isfinite(c)] for k, v in method_costs.items()}
    finite = {k: v for k, v in finite.items() if v}
    if not finite:
        return float("nan"), float("nan")
    lo = max(min(v) for v in finite.values())
    hi = min(max(v) for v in finite.values())
    return float(lo), float(hi)


def paired_bootstrap(diffs: Tensor, resamples: int, seed: int, chunk: int = 100) -> Tensor:
    """Percentile bootstrap of the mean of paired per-sample differences, many columns at once.

    Every column is resampled with the same test indices (paired across methods and budgets).

    Args:
        diffs: (N, M) per-sample differences, e.g. correct(method) - correct(best baseline).
        resamples: bootstrap resamples of the N indices.
        seed: seeds the resamples.

    Returns:
        (M, 3) float64: observed mean, 2.5 % and 97.5 % percentiles of the resampled means.
    """
    n, m = diffs.shape
    gen = torch.Generator().manual_seed(seed)
    diffs = diffs.double()
    means = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = torch.randint(0, n, (size, n), generator=gen)
        weights = torch.zeros(size, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(size, n, dtype=torch.float64)
        )  # (size, N) how often each sample is drawn
        means.append(weights @ diffs / n)  # (size, M)
    boot = torch.cat(means) if means else torch.zeros(0, m, dtype=torch.float64)
    ci = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0).T  # (M, 2)
    return torch.cat([diffs.mean(dim=0)[:, None], ci], dim=1)


def _matched_baseline(points: list[dict], cost: float, set_key: str, set_size: Any) -> dict:
    """A baseline's envelope (by accuracy) interpolated at `cost`, carrying ECE and set size along."""
    costs, accs = [p["cost"] for p in points], [p["accuracy"] for p in points]

    def at(values: list) -> float:
        values = [np.nan if v is None else v for v in values]
        return float(interpolate_envelope(costs, accs, [cost], values)[0])

    ece_raw, ece_ts = at([p["ece"] for p in points]), at([p["ece_temperature_scaled"] for p in points])
    finite = [v for v in (ece_raw, ece_ts) if math.isfinite(v)]
    return {
        "accuracy": at(accs),
        "ece": ece_raw,
        "ece_temperature_scaled": ece_ts,
        "ece_best": min(finite) if finite else None,  # compare with the better of raw and scaled
        set_key: at([set_size(p) for p in points]),
    }


def envelope_summary(methods: dict[str, dict], alphas: list[float]) -> dict:
    """The envelope views of report.json ``methods``: cost_range, AUC and matched-cost rows.

    Args:
        methods: name -> ``{"kind", "points": [{"cost", "accuracy", "ece", "ece_temperature_scaled",
            "conformal", "param"}, ...]}``; the oracle (kind ``oracle``) is left out, and a matched-cost
            row is made for each point of each learned method.
        alphas: conformal levels; set sizes are carried at 0.05 (else the middle level).

    Returns:
        ``{"cost_range", "auc", "auc_note", "envelope_best_baseline", "matched_cost"}``.
    """
    curves = {n: m["points"] for n, m in methods.items() if m["kind"] != "oracle" and m["points"]}
    lo, hi = common_cost_range({n: [p["cost"] for p in pts] for n, pts in curves.items()})
    auc = {
        n: envelope_auc([p["cost"] for p in pts], [p["accuracy"] for p in pts], lo, hi)
        for n, pts in curves.items()
    }
    set_alpha = alpha_key(0.05 if 0.05 in alphas else alphas[len(alphas) // 2]) if alphas else None
    set_key = f"set_size_{set_alpha}"

    def set_size(point: dict) -> float | None:
        return point["conformal"][set_alpha]["mean_set_size"] if set_alpha else None

    baselines = [n for n in curves if methods[n]["kind"] != "learned"]
    matched = []
    for name in (n for n in curves if methods[n]["kind"] == "learned"):
        for p in curves[name]:
            matched.append(
                {
                    "method": name,
                    "param": p["param"],
                    "cost": p["cost"],
                    "accuracy": p["accuracy"],
                    "ece": p["ece"],
                    "ece_temperature_scaled": p["ece_temperature_scaled"],
                    set_key: set_size(p),
                    "baselines": {
                        b: _matched_baseline(curves[b], p["cost"], set_key, set_size) for b in baselines
                    },
                }
            )
    baseline_auc = {n: auc[n] for n in baselines if math.isfinite(auc[n])}
    return {
        "cost_range": [lo, hi],
        "auc": auc,
        "auc_note": "mean test accuracy of each method's upper envelope over cost_range; oracle excluded",
        "envelope_best_baseline": max(baseline_auc, key=baseline_auc.get) if baseline_auc else None,
        "matched_cost": matched,
    }


# --------------------------------------------------------------------------- torchmetrics classes


def _exit_histogram_update(exits: Tensor, num_exits: int) -> Tensor:
    return torch.bincount(exits.long(), minlength=num_exits)[:num_exits]


def _expected_cost_update(exits: Tensor, costs: Tensor) -> tuple[Tensor, Tensor]:
    return costs.double()[exits.long()].sum(), torch.tensor(exits.numel())


class ExpectedCost(Metric):
    """Mean normalised cost of the exits taken (1.0 = the original model; docs/evaluation.md).

    Example:
        >>> metric = ExpectedCost(costs=torch.tensor([0.5, 1.0]))
        >>> metric.update(torch.tensor([0, 1, 1, 1]))
        >>> float(metric.compute())
        0.875
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, costs: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("costs", torch.as_tensor(costs, dtype=torch.float64).clone(), persistent=False)
        self.add_state("cost_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, exits: Tensor) -> None:
        """Add a batch of 0-based exits (B,)."""
        cost_sum, total = _expected_cost_update(exits, self.costs)
        self.cost_sum += cost_sum.to(self.cost_sum)
        self.total += total.to(self.total)

    def compute(self) -> Tensor:
        return self.cost_sum / self.total if self.total > 0 else torch.tensor(float("nan"))


class ExitHistogram(Metric):
    """Fraction of samples leaving at each exit, (L,).

    Example:
        >>> metric = ExitHistogram(num_exits=3)
        >>> metric.update(torch.tensor([0, 2, 2, 2]))
        >>> metric.compute().tolist()
        [0.25, 0.0, 0.75]
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_exits: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_exits = num_exits
        self.add_state("counts", default=torch.zeros(num_exits, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, exits: Tensor) -> None:
        """Add a batch of 0-based exits (B,)."""
        self.counts += _exit_histogram_update(exits, self.num_exits).to(self.counts)

    def compute(self) -> Tensor:
        total = self.counts.sum()
        return self.counts.double() / total if total > 0 else torch.full((self.num_exits,), float("nan"))


def exit_outcome(correct: Tensor, exits: Tensor, costs: Sequence[float] | Tensor) -> dict[str, Any]:
    """Accuracy, mean cost and exit fractions of one exit assignment.

    Args:
        correct: (N, L) bool, the prediction at each exit is right; exits: (N,) the exit each sample takes;
            costs: (L,) normalised cost of each exit.

    Example:
        >>> correct = torch.tensor([[False, True], [True, True]])
        >>> exit_outcome(correct, torch.tensor([0, 1]), [0.5, 1.0])
        {'accuracy': 0.5, 'cost': 0.75, 'exit_fractions': [0.5, 0.5]}
        >>> exit_outcome(correct[:, :1], torch.tensor([0, 0]), [0.5])["exit_fractions"]
        [1.0]
    """
    exits = exits.long()
    cost, hist = ExpectedCost(torch.as_tensor(costs, dtype=torch.float64)), ExitHistogram(correct.shape[1])
    cost.update(exits)
    hist.update(exits)
    right = correct.gather(1, exits[:, None]).squeeze(1)
    return {
        "accuracy": float(right.double().mean()),
        "cost": float(cost.compute()),
        "exit_fractions": hist.compute().reshape(-1).tolist(),  # torchmetrics squeezes a single exit
    }
