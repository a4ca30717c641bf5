"""Which heads and FFN neurons to remove: gradient importance on held-out data, ranked across layers.

Michel et al. (2019, *Are Sixteen Heads Really Better than One?*)'s score, for heads and FFN neurons alike:
a mask ``ξ`` multiplies each head's output (each neuron's activation); ``I = Σ_x |∂L(x)/∂ξ|`` over the
samples, with ``L`` the cross-entropy summed over the model's exits. For a neuron this is
``|Σ_tokens activation × gradient|`` per sample, first-order Taylor importance. Scores are normalised by
their ℓ2 norm within each layer, as the paper does, and the least important units are removed across all
layers (:func:`least_important`), never every unit of a layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jeidnn.errors import JeidnnError
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHeads
from jeidnn.model.structured import head_dim, layer_sizes, layer_stack, projection
from jeidnn.train.losses import summed_exit_ce

__all__ = ["Importance", "importance", "least_important", "removal_count"]


@dataclass
class Importance:
    """Gradient-based importance of every head and FFN neuron, normalised within each layer (ℓ2 = 1)."""

    heads: list[Tensor]
    """Per layer, ``(heads of the layer,)``."""
    ffn: list[Tensor]
    """Per layer, ``(FFN neurons of the layer,)``."""
    samples: int
    """How many samples were summed over."""


def _normalised(scores: Tensor) -> Tensor:
    norm = scores.norm()
    return scores / norm if norm > 0 else scores


def importance(
    backbone: Backbone, heads: ExitHeads, batches: Iterable[tuple[dict[str, Tensor], Tensor]]
) -> Importance:
    """Michel et al.'s head importance, and the same mask-gradient score for FFN neurons.

    Args:
        batches: ``(inputs, labels (B,))`` on the backbone's device; the loss of a sample is its
            cross-entropy summed over every exit of ``heads``.
    """
    parent, name = layer_stack(backbone.model)
    layers = list(getattr(parent, name))
    size = head_dim(backbone.config)
    num_heads, num_ffn = layer_sizes(backbone.model)
    head_sum = [torch.zeros(n, dtype=torch.float64) for n in num_heads]
    ffn_sum = [torch.zeros(n, dtype=torch.float64) for n in num_ffn]
    masks: dict[tuple[str, int], Tensor] = {}

    def masking(kind: str, i: int, repeat: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # (B, T, units * repeat): the heads' outputs, or the FFN activations
            mask = torch.ones(x.shape[0], x.shape[-1] // repeat, device=x.device, requires_grad=True)
            masks[kind, i] = mask
            return (x * mask.repeat_interleave(repeat, dim=1)[:, None, :], *args[1:])

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(projection(layer, "attn_out").register_forward_pre_hook(masking("heads", i, size)))
        handles.append(projection(layer, "ffn_out").register_forward_pre_hook(masking("ffn", i, 1)))
    was_training = backbone.training, heads.training
    backbone.eval()  # no dropout: the scores of a deterministic model
    heads.eval()
    samples = 0
    try:
        with torch.enable_grad():
            for inputs, labels in batches:
                masks.clear()
                logits = heads(backbone(inputs, heads.layers))  # (B, L, C)
                # A sum over samples: each sample's mask gradient is then its own ∂L(x)/∂ξ.
                loss = summed_exit_ce(logits.float(), labels, "sum")
                keys = list(masks)
                grads = torch.autograd.grad(loss, [masks[k] for k in keys])
                for (kind, i), grad in zip(keys, grads, strict=True):
                    total = head_sum if kind == "heads" else ffn_sum
                    total[i] += grad.abs().sum(dim=0).cpu().double()  # (units,) float64 on the CPU (not MPS)
                samples += labels.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training[0])
        heads.train(was_training[1])
    return Importance([_normalised(s) for s in head_sum], [_normalised(s) for s in ffn_sum], samples)


def removal_count(sizes: list[int], fraction: float, unit: str, option: str) -> int:
    """``⌊fraction × total⌋`` units of layers of ``sizes``; an error if that many must empty a layer."""
    total = sum(sizes)
    count = int(fraction * total + 1e-9)
    if count > total - len(sizes):
        raise JeidnnError(
            f"{option} {fraction:g} removes {count} of {total} {unit}s, which empties a layer "
            f"({len(sizes)} layers must keep one each); "
            f"lower {option} below {(total - len(sizes) + 1) / total:.3g}"
        )
    return count


def least_important(scores: list[Tensor], fraction: float, unit: str, option: str) -> dict[int, list[int]]:
    """The ``⌊fraction × total⌋`` lowest-scoring units across all layers, never every unit of a layer.

    A unit whose removal would empty its layer is skipped for the next lowest one elsewhere; a fraction that
    cannot be met without emptying some layer is an error (:func:`removal_count`). Ties go to the earlier
    layer, then the lower index.

    Returns:
        ``{0-based layer: sorted 0-based units to remove}`` (every layer present).
    """
    sizes = [len(s) for s in scores]
    count = removal_count(sizes, fraction, unit, option)
    order = sorted(
        ((float(s), i, j) for i, layer in enumerate(scores) for j, s in enumerate(layer.tolist())),
    )
    remove: dict[int, list[int]] = {i: [] for i in range(len(sizes))}
    left = list(sizes)
    for _, i, j in order:
        if count == 0:
            break
        if left[i] > 1:
            remove[i].append(j)
            left[i] -= 1
            count -= 1
    return {i: sorted(units) for i, units in remove.items()}
