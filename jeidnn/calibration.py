"""Calibration: top-label ECE, per-exit temperature scaling and reliability-diagram data.

ECE follows docs/evaluation.md: top-label, L1, 15 equal-width bins, computed on the whole
set at once through ``torchmetrics.classification.MulticlassCalibrationError`` (its
state keeps every confidence, so feeding it in batches gives the whole-set value, not a
mean of per-batch ECEs). Temperatures are fitted per exit on the ``calib`` split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

__all__ = [
    "ReliabilityDiagram",
    "apply_temperatures",
    "calibration_error_metric",
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


def calibration_error_metric(num_classes: int, n_bins: int = 15) -> MulticlassCalibrationError:
    """The torchmetrics metric behind :func:`ece` (top-label, L1), for batch-wise accumulation.

    Feed it probabilities (rows in [0, 1]); it softmaxes anything outside [0, 1] per batch,
    which would silently mix logits and probabilities.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"Expected argument `n_bins` to be a positive integer but got {n_bins}")
    return MulticlassCalibrationError(num_classes=num_classes, n_bins=n_bins, norm="l1")


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error of probabilities on the whole set.

    Args:
        probs: (N, C) class probabilities (not logits).
        labels: (N,) int64 true classes.
        n_bins: equal-width confidence bins on [0, 1].

    Returns:
        ECE in [0, 1] (0.05 = 5 points of calibration error).

    Example:
        >>> round(ece(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1])), 4)
        0.35
    """
    assert probs.ndim == 2 and labels.shape == probs.shape[:1], (probs.shape, labels.shape)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("`ece` expects probabilities in [0, 1]; apply softmax to logits first")
    if probs.shape[0] == 0:
        return float("nan")
    metric = calibration_error_metric(probs.shape[1], n_bins)
    metric.update(probs.float(), labels.long())
    return float(metric.compute())


@dataclass
class ReliabilityDiagram:
    """Per-bin statistics of a reliability diagram (equal-width bins on [0, 1]).

    Bins are ``[e_i, e_{i+1})`` like torchmetrics; a confidence of exactly 1 falls in the last bin.
    """

    bin_edges: Tensor  # (B + 1,)
    bin_confidence: Tensor  # (B,) mean top-label confidence in the bin (nan when empty)
    bin_accuracy: Tensor  # (B,) accuracy in the bin (nan when empty)
    bin_counts: Tensor  # (B,) int64 samples in the bin
    ece: float


def reliability_diagram(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityDiagram:
    """Bin the top-label confidences of (N, C) probabilities and report per-bin accuracy."""
    conf, pred = probs.float().max(dim=1)  # (N,), (N,)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.zeros(n_bins).scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins).scatter_add_(0, idx, correct)
    empty = counts == 0
    bin_conf = torch.where(empty, torch.nan, conf_sum / counts.clamp_min(1))
    bin_acc = torch.where(empty, torch.nan, acc_sum / counts.clamp_min(1))
    return ReliabilityDiagram(edges, bin_conf, bin_acc, counts.long(), ece(probs, labels, n_bins))


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
