"""Inference cost of every exit, counted with `torch.utils.flop_counter.FlopCounterMode` (docs/method.md).

`c_l` = FLOPs of embeddings + layers 1..l + every head (and gate) evaluated at exits 1..l,
divided by the FLOPs of the plain backbone + its final classifier.

Text: attention cost grows with sequence length, so every component is counted on real,
unpadded samples, one per distinct token length of the split, and the per-sample mean is
weighted by how often each length occurs. The result is the exact mean FLOPs per sample
over that split's real lengths (no padding counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from jeidnn.config.gating import GateSettings
from jeidnn.model.backbone import Backbone
from jeidnn.model.gate_inputs import input_size
from jeidnn.model.heads import ExitHeads


def _register_cpu_sdpa() -> None:
    # PyTorch counts the CUDA SDPA kernels but not the CPU flash kernel that sdpa dispatches
    # to on this machine: without this the attention matmuls (4·T²·H per layer) go uncounted.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls/convolutions executed by `fn()`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def gate_flops(settings: GateSettings, num_exits: int, hidden_size: int) -> float:
    """FLOPs of one learned gate on one sample, 2 per multiply-add as :func:`count_flops` counts a matmul.

    The gate layers are written as products and sums (:meth:`jeidnn.model.gates.StackedGates._net`), which
    ``FlopCounterMode`` does not see, so they are counted from the gate's shape: with ``F`` gate inputs
    (:func:`jeidnn.model.gate_inputs.input_size`, the projection included), a ``linear`` gate costs ``2 F``,
    an ``mlp`` gate ``2 (F·width + width)``, and ``hidden`` inputs add their projection ``2 H·projection``.
    Bias additions, the ReLU, the confidence features and the exit rule are not counted, as for the heads.

    Args:
        settings: the gate's shape (a :class:`~jeidnn.config.gating.GateVariant` is one).
        num_exits: ``L`` (the trajectory inputs grow with the number of gates ``L - 1``).
        hidden_size: ``H`` of the pooled features (``hidden`` inputs only).
    """
    projection = settings.projection if settings.inputs == "hidden" else 0
    inputs = input_size(settings.inputs, num_exits - 1, projection)
    if settings.arch == "linear":
        multiply_adds = inputs
    else:
        multiply_adds = inputs * settings.width + settings.width
    return float(2 * (multiply_adds + hidden_size * projection))


GATE_FLOPS = gate_flops(GateSettings(), num_exits=2, hidden_size=1)
"""The paper's gate, Linear(4 -> 1) on four confidence features: 8 FLOPs per sample."""


@dataclass
class ExitCosts:
    embed_flops: float
    layer_flops: list[float]
    """Per backbone layer (all layers, not only exit layers)."""
    head_flops: list[float]
    """Per exit."""
    gate_flops: float
    full_flops: float
    """Plain backbone + its final classifier."""
    cost: list[float]
    """Normalised cost per exit with IMs only (threshold baselines)."""
    cost_with_gates: list[float]
    """Normalised cost per exit including the JEI-DNN gates evaluated up to it."""
    counted_on: str
    """Which inputs were counted (for the report)."""

    def with_gates(self, gate_flops: float) -> list[float]:
        """Normalised cost per exit when each gated exit up to it runs a gate of ``gate_flops`` FLOPs."""
        # FLOPs first, then normalised: the same float operations as the pruning's recount of a model.
        last, full = len(self.cost) - 1, self.full_flops
        return [(c * full + min(e + 1, last) * gate_flops) / full for e, c in enumerate(self.cost)]

    @property
    def gflops_full(self) -> float:
        return self.full_flops / 1e9

    @property
    def gflops(self) -> list[float]:
        return [c * self.gflops_full for c in self.cost]


def _component_flops(backbone: Backbone, heads: ExitHeads, inputs: dict[str, Tensor]) -> tuple:
    """FLOPs of embeddings, each layer and each head on one batch, per sample."""
    batch = next(iter(inputs.values())).shape[0]
    with FlopCounterMode(display=False) as counter:
        hidden, state = backbone.embed(inputs)
    embed = counter.get_total_flops()
    exit_of_layer = {layer: i for i, layer in enumerate(heads.layers)}
    layers, head_flops = [], [0.0] * heads.num_exits
    for i in range(backbone.num_layers):
        with FlopCounterMode(display=False) as counter:
            hidden = backbone.run_layer(i, hidden, state)
        layers.append(counter.get_total_flops() / batch)
        if i + 1 in exit_of_layer:
            e = exit_of_layer[i + 1]
            pooled = backbone.pool(hidden, state)
            with FlopCounterMode(display=False) as counter:
                heads.heads[e](pooled)
            head_flops[e] = counter.get_total_flops() / batch
    return embed / batch, layers, head_flops


@torch.no_grad()
def exit_costs(
    backbone: Backbone, heads: ExitHeads, samples: list[tuple[dict[str, Tensor], float]], counted_on: str
) -> ExitCosts:
    """Count every component on weighted `samples` and normalise (docs/method.md).

    Args:
        samples: `(inputs, weight)` pairs; inputs hold one unpadded sample (text: see
            :func:`text_cost_samples`) or a batch of images; the mean is weighted by `weight`.
        counted_on: a sentence for the report saying which inputs were counted.
    """
    was_training = backbone.training, heads.training
    backbone.eval()
    heads.eval()
    total_w = 0.0
    embed = 0.0
    layers = [0.0] * backbone.num_layers
    head = [0.0] * heads.num_exits
    for inputs, weight in samples:
        e, lf, hf = _component_flops(backbone, heads, inputs)
        embed += weight * e
        layers = [a + weight * b for a, b in zip(layers, lf)]
        head = [a + weight * b for a, b in zip(head, hf)]
        total_w += weight
    embed /= total_w
    layers = [x / total_w for x in layers]
    head = [x / total_w for x in head]
    backbone.train(was_training[0])
    heads.train(was_training[1])

    full = embed + sum(layers) + head[-1]
    cost, cost_g = [], []
    num_exits = heads.num_exits
    for e, layer in enumerate(heads.layers):
        flops = embed + sum(layers[:layer]) + sum(head[: e + 1])
        cost.append(flops / full)
        gates_run = min(e + 1, num_exits - 1)  # no gate at the last exit
        cost_g.append((flops + gates_run * GATE_FLOPS) / full)
    return ExitCosts(embed, layers, head, float(GATE_FLOPS), full, cost, cost_g, counted_on)


def text_cost_samples(
    token_ids: list[list[int]], pad_type_ids: bool = True
) -> list[tuple[dict[str, Tensor], float]]:
    """One unpadded sample per distinct length, weighted by its frequency in `token_ids`."""
    by_len: dict[int, list[int]] = {}
    counts = Counter(len(ids) for ids in token_ids)
    for ids in token_ids:
        by_len.setdefault(len(ids), ids)
    out = []
    for length, ids in sorted(by_len.items()):
        t = torch.tensor([ids])  # (1, T)
        inputs = {"input_ids": t, "attention_mask": torch.ones_like(t)}
        if pad_type_ids:
            inputs["token_type_ids"] = torch.zeros_like(t)
        out.append((inputs, float(counts[length])))
    return out
