"""Losses of the IM warm-up and of JEI-DNN's alternating training (DESIGN.md §4).

Shapes: ``N`` samples, ``L`` exits (0-based in code, the last is the frozen final classifier),
``C`` classes. Per-exit logits are ``(N, L, C)``; gate tensors cover the ``L-1`` gated exits.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IMLossMode = Literal["weighted", "sum"]

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
    n, num_exits, _ = logits.shape
    # cross_entropy wants the class dim second: (N, C, L) against (N, L) targets.
    return F.cross_entropy(logits.transpose(1, 2), labels[:, None].expand(n, num_exits), reduction="none")


def im_loss(logits: Tensor, labels: Tensor, pi: Tensor, mode: IMLossMode = "weighted") -> Tensor:
    """IM loss with the gates fixed.

    ``weighted``: the expected cross-entropy under the exit distribution, rescaled per sample to the
    size of its unweighted loss,
    ``mean_x r(x) · Σ_l π_l(x) CE_l(x)`` with ``r(x) = stopgrad(Σ_l CE_l(x) / Σ_l π_l(x) CE_l(x))``.
    ``r`` must be detached: attached, ``r · Σ π CE`` equals ``Σ CE`` identically and the weighting
    disappears. Samples whose expected loss is below 1e-6 keep ``r = 1``.

    ``sum``: ``mean_x Σ_l CE_l(x)``, the unweighted ablation.

    Args:
        logits: per-exit logits, shape ``(N, L, C)``.
        labels: class indices, shape ``(N,)``.
        pi: exit distribution, shape ``(N, L)``; treated as a constant (no gradient reaches the gates).
        mode: ``"weighted"`` or ``"sum"``.

    Returns:
        Scalar loss.
    """
    ce = per_exit_ce(logits, labels)  # (N, L)
    total = ce.sum(dim=1)  # (N,)
    if mode == "sum":
        return total.mean()
    if mode != "weighted":
        raise ValueError(f"im_loss mode must be 'weighted' or 'sum', got {mode!r}")
    expected = (pi.detach() * ce).sum(dim=1)  # (N,)
    with torch.no_grad():
        ok = expected > _MIN_EXPECTED_LOSS
        ones = torch.ones_like(total)
        r = torch.where(ok, total / torch.where(ok, expected, ones), ones)  # (N,)
    return (r * expected).mean()


def gate_targets(ce: Tensor, costs: Tensor, lam: float) -> Tensor:
    """Gate targets from the best exit under the accuracy/cost trade-off ``λ``.

    ``l*(x) = argmin_l CE_l(x) + λ c_l`` over all ``L`` exits (ties go to the earlier, cheaper exit) and
    ``t_l(x) = 1`` for the gated exits ``l ≥ l*(x)``: stop at the best exit or anywhere after it.

    Args:
        ce: per-exit cross-entropies, shape ``(N, L)`` (detach them; targets are constants).
        costs: normalised exit costs, shape ``(L,)``.
        lam: trade-off ``λ ≥ 0``.

    Returns:
        ``(N, L-1)`` float targets in {0, 1}.
    """
    best = (ce + lam * costs.to(ce)).argmin(dim=1)  # (N,); argmin returns the first minimum
    exits = torch.arange(ce.shape[1] - 1, device=ce.device)  # (L-1,)
    return (exits[None, :] >= best[:, None]).to(ce.dtype)  # (N, L-1)


def positive_weights(targets: Tensor, max_weight: float = 5.0, min_weight: float = 0.0) -> Tensor:
    """Weight of the positive (exit) class of each gate: ``min(#zeros / #ones, max_weight)``.

    ``min_weight`` (default 0, DESIGN.md §4: no lower clip) is an ablation switch: the balanced
    weight falls below 1 when most targets are 1 (large λ) and then pulls the gate back towards
    0.5; ``min_weight = max_weight = 1`` gives the unweighted BCE.

    The weight balances the two classes of each gate's targets. Degenerate gates:

    * no positive target: ``max_weight`` (the weight multiplies nothing on these targets; the largest
      allowed value lets the rare positives of other batches count fully);
    * no negative target: ``1.0``. ``#zeros / #ones`` would be 0 and silence the gate although every
      sample should exit there; with nothing to balance against, the loss stays unweighted.

    Args:
        targets: gate targets, shape ``(N, L-1)``.
        max_weight: upper clip.
        min_weight: lower clip.

    Returns:
        ``(L-1,)`` positive-class weights.
    """
    ones = targets.sum(dim=0)  # (L-1,)
    zeros = targets.shape[0] - ones
    ratio = zeros / ones.clamp_min(1)
    weights = ratio.clamp_max(max_weight)
    weights = torch.where(ones == 0, torch.full_like(weights, max_weight), weights)
    weights = torch.where((zeros == 0) & (ones > 0), torch.ones_like(weights), weights)
    return weights.clamp(min=min_weight, max=max(max_weight, min_weight))


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
    # BCE-with-logits' pos_weight multiplies exactly the t = 1 term, broadcast over the last dim.
    return F.binary_cross_entropy_with_logits(gate_logits, targets, pos_weight=pos_weight.to(gate_logits))


def warmup_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """IM warm-up loss ``Σ_l (L + 1 - l) · CE_l`` (``l`` 1-based), averaged over samples.

    Earlier exits weigh more: they see less of the backbone and need the most help.

    Args:
        logits: per-exit logits, shape ``(N, L, C)``.
        labels: class indices, shape ``(N,)``.

    Returns:
        Scalar loss.
    """
    ce = per_exit_ce(logits, labels)  # (N, L)
    num_exits = ce.shape[1]
    weights = torch.arange(num_exits, 0, -1, dtype=ce.dtype, device=ce.device)  # (L,) = L, L-1, ..., 1
    return (ce * weights).sum(dim=1).mean()
