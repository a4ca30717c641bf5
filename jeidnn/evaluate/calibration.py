"""Calibration: top-label ECE, per-exit temperature scaling and reliability-diagram data.

ECE follows docs/evaluation.md: top-label, L1, 15 equal-width bins ``[e_i, e_{i+1})`` on [0, 1]
with a confidence of exactly 1 in the last bin, computed on the whole set. torchmetrics'
``MulticlassCalibrationError`` puts a confidence of 1 in a 16th bin of its own (a sure, wrong
prediction and a 0.95 correct one then count as two bins, 0.525, instead of one, 0.475), so
:class:`TopLabelCalibrationError` is a torchmetrics ``Metric`` of ours: it keeps per-bin sums,
so feeding it in batches gives the whole-set value, not a mean of per-batch ECEs, and the
reliability diagram reads the same bins. Temperatures are fitted per exit on the ``calib`` split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ReliabilityDiagram",
    "TopLabelCalibrationError",
    "apply_temperatures",
    "ece",
    "fit_temperatures",
    "reliability_diagram",
]

# Search range for log T. T in [1/50, 50] covers every temperature we have seen fitted
# on real networks (typically 0.8 .. 5) with a wide margin on both sides.
_LOG_T_MIN = math.log(0.02)
_LOG_T_MAX = math.log(50.0)
_GRID_POINTS = 21
_GOLDEN_STEPS = 28


def _check_probs(probs: Tensor, labels: Tensor) -> None:
    assert probs.ndim == 2 and labels.shape == probs.shape[:1], (probs.shape, labels.shape)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("expected probabilities in [0, 1]; apply softmax to logits first")


def _bin_update(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin sample counts, confidence sums and correct counts, each (n_bins,) float64."""
    # amax + argmax rather than max(dim=1): torch's float64 max-with-indices kernel is ~500x slower on CPU.
    conf = probs.amax(dim=1).double()  # (N,)
    correct = (probs.argmax(dim=1) == labels).double()  # (N,)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    # Bin i is [e_i, e_{i+1}); a confidence of exactly 1 joins the last bin instead of opening its own.
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    return (
        zeros.scatter_add(0, idx, torch.ones_like(conf)),
        zeros.scatter_add(0, idx, conf),
        zeros.scatter_add(0, idx, correct),
    )


def _ece_compute(counts: Tensor, conf_sums: Tensor, correct_sums: Tensor) -> Tensor:
    """sum_b (n_b / N) |mean conf_b - acc_b| = sum_b |conf_sum_b - correct_b| / N; NaN for N = 0."""
    total = counts.sum()
    if total == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (conf_sums - correct_sums).abs().sum() / total


class TopLabelCalibrationError(Metric):
    """Top-label expected calibration error (L1) with equal-width bins, accumulated over batches.

    Example:
        >>> metric = TopLabelCalibrationError(n_bins=15)
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.95, 0.05]]), torch.tensor([1, 0]))
        >>> round(float(metric.compute()), 4)
        0.475
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
            raise ValueError(f"Expected argument `n_bins` to be a positive integer but got {n_bins}")
        self.n_bins = n_bins
        for name in ("counts", "conf_sums", "correct_sums"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: (B, C) probabilities (not logits) and (B,) true classes."""
        _check_probs(probs, labels)
        counts, conf_sums, correct_sums = _bin_update(probs, labels, self.n_bins)
        self.counts += counts.to(self.counts)
        self.conf_sums += conf_sums.to(self.conf_sums)
        self.correct_sums += correct_sums.to(self.correct_sums)

    def compute(self) -> Tensor:
        return _ece_compute(self.counts, self.conf_sums, self.correct_sums)


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error of probabilities on the whole set.

    Args:
        probs: (N, C) class probabilities (not logits).
        labels: (N,) int64 true classes.
        n_bins: equal-width confidence bins on [0, 1].

    Returns:
        ECE in [0, 1] (0.05 = 5 points of calibration error); NaN for an empty set.

    Example:
        >>> round(ece(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1])), 4)
        0.35
    """
    metric = TopLabelCalibrationError(n_bins)
    metric.update(probs, labels)
    return float(metric.compute())


@dataclass
class ReliabilityDiagram:
    """Per-bin statistics of a reliability diagram: the bins of :class:`TopLabelCalibrationError`.

    Bins are ``[e_i, e_{i+1})``; a confidence of exactly 1 falls in the last bin.
    """

    bin_edges: Tensor  # (B + 1,)
    bin_confidence: Tensor  # (B,) mean top-label confidence in the bin (nan when empty)
    bin_accuracy: Tensor  # (B,) accuracy in the bin (nan when empty)
    bin_counts: Tensor  # (B,) int64 samples in the bin
    ece: float


def reliability_diagram(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityDiagram:
    """Bin the top-label confidences of (N, C) probabilities and report per-bin accuracy and the ECE."""
    _check_probs(probs, labels)
    counts, conf_sums, correct_sums = _bin_update(probs, labels, n_bins)
    empty = counts == 0
    per_bin = counts.clamp_min(1)
    return ReliabilityDiagram(
        torch.linspace(0, 1, n_bins + 1),
        torch.where(empty, torch.nan, conf_sums / per_bin).float(),
        torch.where(empty, torch.nan, correct_sums / per_bin).float(),
        counts.long(),
        float(_ece_compute(counts, conf_sums, correct_sums)),
    )


def apply_temperatures(logits: Tensor, temperatures: Tensor) -> Tensor:
    """Per-exit temperature-scaled probabilities: softmax(logits / T_l).

    Args:
        logits: (N, L, C).
        temperatures: (L,) positive.

    Returns:
        (N, L, C) probabilities.
    """
    return torch.softmax(logits / temperatures.to(logits)[None, :, None], dim=-1)


class _NLL:
    """Mean NLL per exit of softmax(logits / T) as a function of log T, (L,) -> (L,).

    Precomputes ``d = z - max_c z`` so each evaluation is one exp/sum/log pass:
    ``lse(z / T) - z_y / T = log Σ_c exp(d_c / T) - d_y / T``. (Also avoids torch's slow
    float64 ``logsumexp`` kernel on CPU.)
    """

    def __init__(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.double()
        self.d = logits - logits.amax(dim=2, keepdim=True)  # (N, L, C), <= 0
        index = labels.long()[:, None, None].expand(-1, logits.shape[1], 1)
        self.d_true = self.d.gather(2, index).squeeze(2).mean(dim=0)  # (L,) mean of d_y over samples

    def __call__(self, log_t: Tensor) -> Tensor:
        inv_t = (-log_t).exp()  # (L,)
        lse = (self.d * inv_t[None, :, None]).exp().sum(dim=2).log().mean(dim=0)  # (L,)
        return lse - self.d_true * inv_t


@torch.no_grad()
def fit_temperatures(logits: Tensor, labels: Tensor) -> Tensor:
    """Fit one temperature per exit by minimising the NLL of softmax(logits / T) over log T.

    The NLL is convex in 1/T, hence unimodal in log T, so a coarse grid followed by a
    golden-section search in the bracketing grid cell finds the global minimum without the
    step-size and divergence issues of LBFGS on saturated logits. The search is limited to
    T in [0.02, 50]; a perfectly separable exit (NLL decreasing for ever as T -> 0) ends at
    the lower bound instead of diverging.

    Args:
        logits: (N, L, C) per-exit logits on the calibration split.
        labels: (N,) int64 true classes.

    Returns:
        (L,) float32 temperatures (1.0 for every exit when N == 0).

    Example:
        >>> t = fit_temperatures(2.0 * torch.randn(500, 3, 4), torch.randint(0, 4, (500,)))
        >>> t.shape
        torch.Size([3])
    """
    assert logits.ndim == 3 and labels.shape == logits.shape[:1], (logits.shape, labels.shape)
    n, num_exits, _ = logits.shape
    if n == 0:
        return torch.ones(num_exits)
    nll = _NLL(logits, labels)
    grid = torch.linspace(_LOG_T_MIN, _LOG_T_MAX, _GRID_POINTS, dtype=torch.float64)
    losses = torch.stack([nll(g.expand(num_exits)) for g in grid])  # (G, L)
    best = losses.argmin(dim=0)  # (L,)
    # Golden-section search inside the grid cells around the best grid point, all exits at once.
    ratio = (math.sqrt(5) - 1) / 2
    a = grid[(best - 1).clamp(min=0)]
    b = grid[(best + 1).clamp(max=_GRID_POINTS - 1)]
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(_GOLDEN_STEPS):
        left = fc < fd  # the minimum lies in [a, d]: drop (d, b]; otherwise drop [a, c)
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        # The surviving interior point is reused; only one new point per exit is evaluated.
        new = torch.where(left, b - ratio * (b - a), a + ratio * (b - a))
        f_new = nll(new)
        c, fc, d, fd = (
            torch.where(left, new, d),
            torch.where(left, f_new, fd),
            torch.where(left, c, new),
            torch.where(left, fc, f_new),
        )
    log_t = (a + b) / 2
    # Keep the grid optimum if refinement did not beat it (flat NLL, e.g. constant logits).
    refined_better = nll(log_t) <= losses.min(dim=0).values
    return torch.where(refined_better, log_t, grid[best]).exp().float()
