"""Structured pruning of an early-exit model: attention heads, FFN neurons and the layers after an exit.

The three granularities, each removing real weights (the pruned model is smaller, not masked):

* **heads**: a head's rows of the query, key and value projections and its columns of the attention
  output projection (what ``prune_heads`` did in transformers 4; transformers 5 removed it, so the slicing
  is done here with ``transformers.pytorch_utils.prune_linear_layer``);
* **FFN neurons**: an intermediate neuron's row of the first FFN linear and its column of the second;
* **layers**: every layer after an exit is dropped, with the exits after it; that exit becomes the last.

Which units go is decided by :mod:`jeidnn.compress.importance`.

Per-layer sizes differ after pruning while a Hugging Face config holds one ``num_attention_heads`` and one
``intermediate_size``: the pruned sizes are recorded in the backbone config (``jeidnn_pruned``), and
:func:`restore_pruned_shapes` gives a backbone built from that config the same shapes before its weights
load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import prune_linear_layer

from jeidnn.errors import JeidnnError
from jeidnn.model.families import family_of
from jeidnn.model.gate_inputs import NUM_CONFIDENCE_FEATURES
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.rule_gates import (
    PatienceConfidenceGates,
    PatienceGates,
    ProductGates,
    RuleGates,
    StaticGates,
    ThresholdGates,
)

__all__ = [
    "PRUNED_KEY",
    "drop_layers",
    "keep_exits",
    "layer_sizes",
    "prune_ffn",
    "prune_heads",
    "restore_pruned_shapes",
]

PRUNED_KEY = "jeidnn_pruned"
"""Backbone config attribute of a pruned model: ``{"heads": [per layer], "ffn": [per layer]}``."""

# Module paths inside one layer, per role; the first that exists wins (they differ across families and
# across transformers releases: ViT's attention.attention.query became attention.q_proj in 5.x).
_PARTS: dict[str, tuple[str, ...]] = {
    "query": ("attention.self.query", "attention.q_lin", "attention.q_proj", "attention.attention.query"),
    "key": ("attention.self.key", "attention.k_lin", "attention.k_proj", "attention.attention.key"),
    "value": ("attention.self.value", "attention.v_lin", "attention.v_proj", "attention.attention.value"),
    "attn_out": ("attention.output.dense", "attention.out_lin", "attention.o_proj"),
    "ffn_in": ("intermediate.dense", "ffn.lin1", "mlp.fc1"),
    "ffn_out": ("output.dense", "ffn.lin2", "mlp.fc2"),
}


# --------------------------------------------------------------------------- the parts of a layer


def _locate(layer: nn.Module, role: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the linear playing ``role`` in ``layer``."""
    for path in _PARTS[role]:
        *parents, name = path.split(".")
        node: nn.Module | None = layer
        for part in parents:
            node = getattr(node, part, None)
        if node is not None and isinstance(getattr(node, name, None), nn.Linear):
            return node, name
    raise JeidnnError(
        f"cannot find the {role} projection of {type(layer).__name__} (tried {', '.join(_PARTS[role])}); "
        "this transformers version is not supported for pruning"
    )


def projection(layer: nn.Module, role: str) -> nn.Linear:
    """The linear playing ``role`` (``query``, ``key``, ``value``, ``attn_out``, ``ffn_in``, ``ffn_out``)."""
    parent, name = _locate(layer, role)
    return getattr(parent, name)


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the layer ModuleList of a Hugging Face encoder."""
    for path in family_of(model.config.model_type).layers:
        *parents, name = path.split(".")
        node: nn.Module | None = model
        for part in parents:
            node = getattr(node, part, None)
        if node is not None and isinstance(getattr(node, name, None), nn.ModuleList):
            return node, name
    raise JeidnnError(f"cannot find the layer stack of {type(model).__name__}; not supported for pruning")


def head_dim(config) -> int:
    """Size of one attention head (unchanged by pruning: heads are removed whole)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def layer_sizes(model: nn.Module) -> tuple[list[int], list[int]]:
    """Heads and FFN neurons of every layer, read from the weights."""
    parent, name = layer_stack(model)
    size = head_dim(model.config)
    layers = list(getattr(parent, name))
    heads = [projection(layer, "query").out_features // size for layer in layers]
    return heads, [projection(layer, "ffn_in").out_features for layer in layers]


def _record_sizes(model: nn.Module) -> None:
    heads, ffn = layer_sizes(model)
    setattr(model.config, PRUNED_KEY, {"heads": heads, "ffn": ffn})


def _keep(layer: nn.Module, role: str, index: Tensor, dim: int) -> None:
    parent, name = _locate(layer, role)
    old = getattr(parent, name)
    new = prune_linear_layer(old, index, dim=dim)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    setattr(parent, name, new)


def _keep_heads(layer: nn.Module, heads: Tensor, size: int) -> None:
    """Keep the 0-based ``heads`` (ascending) of ``layer``: their rows of Q, K, V, their columns of O."""
    index = (heads[:, None] * size + torch.arange(size)).flatten()  # (n_kept * size,)
    for role in ("query", "key", "value"):
        _keep(layer, role, index, dim=0)
    _keep(layer, "attn_out", index, dim=1)
    for attr in ("num_attention_heads", "n_heads"):  # informative only: forwards infer it from the shapes
        for module in layer.modules():
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, len(heads))


def _keep_neurons(layer: nn.Module, neurons: Tensor) -> None:
    _keep(layer, "ffn_in", neurons, dim=0)
    _keep(layer, "ffn_out", neurons, dim=1)


# --------------------------------------------------------------------------- pruning operations


def prune_heads(model: nn.Module, remove: Mapping[int, Iterable[int]]) -> None:
    """Remove heads ``{0-based layer: [0-based heads of that layer now]}`` from a Hugging Face encoder."""
    parent, name = layer_stack(model)
    layers, size = getattr(parent, name), head_dim(model.config)
    heads, _ = layer_sizes(model)
    for i, gone in remove.items():
        gone = set(gone)
        if not gone:
            continue
        if len(gone) >= heads[i]:
            raise JeidnnError(f"cannot remove every head of layer {i + 1}; keep at least one")
        kept = torch.tensor([h for h in range(heads[i]) if h not in gone])
        _keep_heads(layers[i], kept, size)
    _record_sizes(model)


def prune_ffn(model: nn.Module, remove: Mapping[int, Iterable[int]]) -> None:
    """Remove FFN neurons ``{0-based layer: [0-based neurons of that layer now]}``."""
    parent, name = layer_stack(model)
    layers = getattr(parent, name)
    _, ffn = layer_sizes(model)
    for i, gone in remove.items():
        gone = set(gone)
        if not gone:
            continue
        if len(gone) >= ffn[i]:
            raise JeidnnError(f"cannot remove every FFN neuron of layer {i + 1}; keep at least one")
        _keep_neurons(layers[i], torch.tensor([n for n in range(ffn[i]) if n not in gone]))
    _record_sizes(model)


def drop_layers(model: nn.Module, num_layers: int) -> None:
    """Keep the first ``num_layers`` layers of a Hugging Face encoder."""
    parent, name = layer_stack(model)
    layers = getattr(parent, name)
    if not 1 <= num_layers <= len(layers):
        raise JeidnnError(f"cannot keep {num_layers} layers of a {len(layers)}-layer model")
    setattr(parent, name, nn.ModuleList(list(layers)[:num_layers]))
    model.config.num_hidden_layers = num_layers
    if hasattr(model.config, PRUNED_KEY):
        _record_sizes(model)


def restore_pruned_shapes(model: nn.Module) -> nn.Module:
    """Give a backbone freshly built from a pruned config the per-layer sizes recorded in that config.

    A no-op for an unpruned config. Called before the weights load (their values are placeholders here).
    """
    sizes = getattr(model.config, PRUNED_KEY, None)
    if not sizes:
        return model
    parent, name = layer_stack(model)
    layers, size = getattr(parent, name), head_dim(model.config)
    if not len(sizes["heads"]) == len(sizes["ffn"]) == len(layers):
        raise JeidnnError(
            f"the backbone config records pruned sizes for {len(sizes['heads'])} layers, "
            f"but it has {len(layers)}; save the model again"
        )
    now_heads, now_ffn = layer_sizes(model)
    for layer, heads, ffn, h0, f0 in zip(
        layers, sizes["heads"], sizes["ffn"], now_heads, now_ffn, strict=True
    ):
        if heads != h0:
            _keep_heads(layer, torch.arange(int(heads)), size)
        if ffn != f0:
            _keep_neurons(layer, torch.arange(int(ffn)))
    return model


# --------------------------------------------------------------------------- exits after dropping layers


def _gate_features(gates: Gates, num_gates: int) -> Tensor:
    """Indices into an ``L``-exit gate's inputs of the inputs of the same gate in a ``num_gates + 1``-exit
    model: its own features, the earlier exits', the agreement count, the change of p_max, the projection."""
    f = NUM_CONFIDENCE_FEATURES
    if gates.settings.inputs == "confidence":
        return torch.arange(f)
    raw = f * (gates.num_exits - 1) + 2  # the trajectory inputs of the L-exit gates
    index = [*range(f + f * (num_gates - 1)), raw - 2, raw - 1]
    if gates.settings.inputs == "hidden":
        index += range(raw, raw + gates.settings.projection)
    return torch.tensor(index)


def _keep_learned(gates: Gates, num_gates: int) -> Gates:
    """The first ``num_gates`` gates of learned ``gates``, scoring those exits exactly as before."""
    settings = gates.settings
    new = Gates(num_gates + 1, settings, int(gates.hidden_mean.shape[-1]))
    index = _gate_features(gates, num_gates)
    raw_index = index[index < gates.input_mean.shape[-1]]
    # The agreement count enters as count / (L - 1) and now as count / num_gates: `scale` times larger.
    scale = (gates.num_exits - 1) / num_gates
    agree = len(raw_index) - 2 if settings.inputs != "confidence" else None
    features = "w" if settings.arch == "linear" else "w1"  # the parameter that reads the inputs
    state = {}
    for key, value in gates.state_dict().items():
        if key in ("input_mean", "input_std"):
            value = value[:num_gates][:, raw_index]  # (g, F')
        elif key in ("hidden_mean", "hidden_std"):
            value = value[:num_gates]  # (g, H)
        else:
            value = value[:, :num_gates]  # (1, g, ...)
            if key == features:
                value = value[:, :, index]  # (1, g, F[, width])
        state[key] = value.detach().clone()
    if agree is not None and settings.standardize:
        # (count / g - scale · mean) / (scale · std) = (count / (L-1) - mean) / std
        state["input_mean"][:, agree] *= scale
        state["input_std"][:, agree] *= scale
    elif agree is not None:
        state[features][:, :, agree] /= scale
    new.load_state_dict(state)
    return new.eval()


def keep_exits(
    heads: ExitHeads, gates: Gates | RuleGates | None, last: int
) -> tuple[ExitHeads, Gates | RuleGates | None]:
    """Exits ``0 .. last`` of ``heads`` and the gates that play them; exit ``last`` becomes the final exit.

    A sample that the original gates send past exit ``last`` now leaves there; every other sample takes the
    same exit as before. The kept heads are the same modules (their weights are shared, not copied).
    """
    if last == heads.num_exits - 1:
        return heads, gates
    # The kept last head is an IM: with linear IMs it is dropout + linear, which the family's final head
    # ("none" activation) also is; MLP IMs already have the final head's shape.
    activation = "none" if heads.im_head == "linear" else heads.activation
    new = ExitHeads(heads.layers[: last + 1], 1, heads.num_classes, activation, im_head=heads.im_head)
    new.heads = nn.ModuleList(list(heads.heads)[: last + 1])
    if last == 0 or gates is None:
        return new, None
    if isinstance(gates, Gates):
        return new, _keep_learned(gates, last)
    if isinstance(gates, ThresholdGates):
        return new, ThresholdGates(gates.thresholds[:last], gates.measure)
    if isinstance(gates, ProductGates):
        return new, ProductGates(gates.thresholds[:last])
    if isinstance(gates, (PatienceGates, PatienceConfidenceGates)):
        return new, gates
    if isinstance(gates, StaticGates):
        return new, StaticGates(min(gates.exit_index, last))
    raise AssertionError(f"unknown gates {type(gates).__name__}")
