"""Losses of the IM warm-up and of stage 2's alternating training (docs/method.md).

Shapes: ``N`` samples, ``L`` exits (0-based in code, the last is the frozen final classifier),
``C`` classes. Per-exit logits are ``(N, L, C)``; gate tensors cover the ``L-1`` gated exits. Every loss also
takes a leading model dim ``(K, N, ...)`` (stage 2 trains K models side by side; λ is then ``(K,)``) and
returns one value per model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IMLossMode = Literal["weighted", "uniform"]
PositiveWeight = Literal["exact", "cumulative", "none"]

# Below this expected loss a sample's exit distribution only weights IMs that are already right; the
# normaliser r = Σ CE / Σ π·CE would then blow up, so such samples keep r = 1.
_MIN_EXPECTED_LOSS = 1e-6


def per_exit_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every exit on every sample.

    Args:
        logits: per-exit logits, shape ``(N, L, C)``.
        labels: class indices, shape ``(N,)``.

    Returns:
        ``(N, L)`` unreduced cross-entropies.
    """
    log_probs = logits.log_softmax(dim=-1)  # (..., N, L, C)
    index = labels[:, None, None].expand(*log_probs.shape[:-1], 1)
    return -log_probs.gather(-1, index).squeeze(-1)  # (..., N, L)


def summed_exit_ce(
    logits: Tensor,
    labels: Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    exit_weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy summed over exits, ``Σ_l w_l CE_l(x)`` (``w`` = ones by default), reduced over samples.

    The one loss of every phase that trains all exits at once: the IM warm-up, the joint phase, the pruning
    recovery fine-tune and the pruning importance scores.

    Args:
        logits: per-exit logits, shape ``(N, L, C)``.
        labels: class indices, shape ``(N,)``.
        reduction: ``"mean"`` or ``"sum"`` over samples (a sum keeps each sample's gradient its own).
        exit_weights: ``(L,)`` per-exit weights ``w_l``.

    Returns:
        Scalar loss. Example: two exits with CEs ``(1, 2)`` and ``(3, 4)`` on two samples give ``mean`` 5 and
        ``sum`` 10.
    """
    ce = per_exit_ce(logits, labels)  # (N, L)
    if exit_weights is not None:
        ce = ce * exit_weights
    if reduction == "sum":
        return ce.sum()
    if reduction != "mean":
        raise ValueError(f"summed_exit_ce reduction must be 'mean' or 'sum', got {reduction!r}")
    return ce.sum(dim=1).mean()  # (N, L) -> (N,) -> scalar


def im_loss(logits: Tensor, labels: Tensor, pi: Tensor, mode: IMLossMode = "weighted") -> Tensor:
    """IM loss with the gates fixed.

    ``weighted``: the expected cross-entropy under the exit distribution, rescaled per sample to the
    size of its unweighted loss,
    ``mean_x r(x) · Σ_l π_l(x) CE_l(x)`` with ``r(x) = stopgrad(Σ_l CE_l(x) / Σ_l π_l(x) CE_l(x))``.
    ``r`` must be detached: attached, ``r · Σ π CE`` equals ``Σ CE`` identically and the weighting
    disappears. Samples whose expected loss is below 1e-6 keep ``r = 1``.

    ``uniform``: ``mean_x Σ_l CE_l(x)``: what the authors' released code effectively trains (its normaliser
    is not detached, which cancels the weighting).

    Args:
        logits: per-exit logits, shape ``(N, L, C)``.
        labels: class indices, shape ``(N,)``.
        pi: exit distribution, shape ``(N, L)``; treated as a constant (no gradient reaches the gates).
        mode: ``"weighted"`` or ``"uniform"``.

    Returns:
        Scalar loss.
    """
    ce = per_exit_ce(logits, labels)  # (..., N, L)
    total = ce.sum(dim=-1)  # (..., N)
    if mode == "uniform":
        return total.mean(dim=-1)
    if mode != "weighted":
        raise ValueError(f"im_loss mode must be 'weighted' or 'uniform', got {mode!r}")
    expected = (pi.detach() * ce).sum(dim=-1)  # (..., N)
    with torch.no_grad():
        ok = expected > _MIN_EXPECTED_LOSS
        ones = torch.ones_like(total)
        r = torch.where(ok, total / torch.where(ok, expected, ones), ones)  # (N,)
    return (r * expected).mean(dim=-1)


def _per_model(lam: float | Tensor, like: Tensor) -> Tensor:
    """λ as a tensor that broadcasts over ``like``'s last two dims: a float, or ``(K,)`` for ``(K, N, L)``."""
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    return lam[..., None, None]


def gate_targets(ce: Tensor, costs: Tensor, lam: float | Tensor) -> Tensor:
    """Gate targets from the best exit under the accuracy/cost trade-off ``λ`` (the paper's BCE objective).

    ``l*(x) = argmin_l CE_l(x) + λ c_l`` over all ``L`` exits (ties go to the earlier, cheaper exit) and
    ``t_l(x) = 1`` for the gated exits ``l ≥ l*(x)``: stop at the best exit or anywhere after it.

    Args:
        ce: per-exit cross-entropies, shape ``(N, L)`` (detach them; targets are constants).
        costs: normalised exit costs, shape ``(L,)``.
        lam: trade-off ``λ ≥ 0``.

    Returns:
        ``(N, L-1)`` float targets in {0, 1}.
    """
    best = best_exit(ce, costs, lam)  # (..., N); argmin returns the first minimum
    exits = torch.arange(ce.shape[-1] - 1, device=ce.device)  # (L-1,)
    return (exits >= best[..., None]).to(ce.dtype)  # (..., N, L-1)


def best_exit(ce: Tensor, costs: Tensor, lam: float | Tensor) -> Tensor:
    """``l*(x) = argmin_l CE_l(x) + λ c_l`` (ties go to the earlier exit): ``(..., N, L)`` -> ``(..., N)``."""
    return (ce + _per_model(lam, ce) * costs.to(ce)).argmin(dim=-1)


def positive_weights(
    ce: Tensor, costs: Tensor, lam: float, mode: PositiveWeight = "exact", max_weight: float = 5.0
) -> Tensor:
    """Weight ``w_l(1)`` of the positive (exit) class of each gate, counted on ``ce`` (the val split).

    ``exact`` (the paper's code): ``n_l`` = samples whose best exit ``l*`` is exactly ``l``;
    ``cumulative``: ``n_l`` = samples with target 1 at gate ``l`` (``l* ≤ l``);
    in both, ``w_l(1) = min((N - n_l) / max(n_l, 0.1), max_weight)``. ``none``: every weight is 1.

    Args:
        ce: per-exit cross-entropies ``(N, L)``.
        costs: normalised exit costs ``(L,)``.
        lam: the trade-off λ.
        mode: ``exact``, ``cumulative`` or ``none``.
        max_weight: upper clip.

    Returns:
        ``(L-1,)`` weights. Example: ``l* = (0, 0, 1, 2)`` over 3 exits gives exact counts ``(2, 1)`` and
        weights ``(1, 3)``; cumulative counts ``(2, 3)`` and weights ``(1, 1/3)``.
    """
    n, num_exits = ce.shape
    if mode == "none":
        return ce.new_ones(num_exits - 1)
    best = best_exit(ce, costs, lam)
    counts = torch.bincount(best, minlength=num_exits)[: num_exits - 1].to(ce.dtype)  # (L-1,)
    if mode == "cumulative":
        counts = counts.cumsum(0)
    elif mode != "exact":
        raise ValueError(f"positive weight mode must be 'exact', 'cumulative' or 'none', got {mode!r}")
    return ((n - counts) / counts.clamp_min(0.1)).clamp_max(max_weight)


def expected_loss(pi: Tensor, exit_loss: Tensor, costs: Tensor, lam: float | Tensor) -> Tensor:
    """``mean_x Σ_l π_l(x) (ℓ_l(x) + λ c_l)``: expected loss plus λ times expected cost.

    Args:
        pi: exit distribution ``(N, L)`` (differentiable in the gates).
        exit_loss: per-exit loss ``(N, L)``, a constant for the gates.
        costs: ``(L,)``.
        lam: λ.
    """
    return (pi * (exit_loss + _per_model(lam, pi) * costs.to(pi))).sum(dim=-1).mean(dim=-1)


def gate_loss(gate_logits: Tensor, targets: Tensor, pos_weight: Tensor) -> Tensor:
    """Class-weighted binary cross-entropy of the gates (IMs fixed).

    ``mean over x and l of w_l(t) · BCE(logit_l(x), t_l(x))`` with ``w_l(1) = pos_weight_l`` and
    ``w_l(0) = 1``.

    Args:
        gate_logits: shape ``(N, L-1)``.
        targets: shape ``(N, L-1)``, in {0, 1}.
        pos_weight: shape ``(L-1,)``.

    Returns:
        Scalar loss.
    """
    # BCE-with-logits' pos_weight multiplies exactly the t = 1 term, broadcast over the samples.
    weight = pos_weight.to(gate_logits)[..., None, :]  # (..., 1, L-1)
    bce = F.binary_cross_entropy_with_logits(gate_logits, targets, pos_weight=weight, reduction="none")
    return bce.mean(dim=(-2, -1))


def warmup_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """IM warm-up loss ``Σ_l CE_l``, averaged over samples.

    Each IM has its own parameters and sees only its own term, so the sum trains the IMs independently
    in one pass. A per-exit weight (the paper's ``L + 1 − l``) would only rescale each IM's gradient,
    which Adam undoes (up to its eps, and only with ``warmup.weight_decay`` 0, the default: torch's Adam
    adds the decay to the gradient before normalising), so it is not applied.

    Args:
        logits: per-exit logits, shape ``(N, L, C)``.
        labels: class indices, shape ``(N,)``.

    Returns:
        Scalar loss.
    """
    return summed_exit_ce(logits, labels)
