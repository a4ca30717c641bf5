"""A saved early-exit model cut after backbone layer ``K`` (``jeidnn split``): a device and a server tier.

* the **device** tier holds the embeddings, layers ``1 .. K`` and the exits after them, and the tokenizer: it
  answers the samples that exit there and hands the others on as a :class:`~jeidnn.serve.payload.Payload`;
* the **server** tier holds layers ``K+1 .. L`` and their exits: it runs the payloads to the end.

Both hold the gates (a few hundred numbers, stored stacked over the exits) and whatever else of the base
model is neither a layer nor an embedding (a final norm the exits read through, BERT's unused pooler). Each
folder is the exported model's own layout with only its tier's tensors in ``model.safetensors`` and a
``jeidnn_tier`` entry in ``config.json`` (the role, ``K`` and an id shared by the two halves of one split)::

    DIR/device/   config.json, model.safetensors, the tokenizer or image processor
    DIR/server/   config.json, model.safetensors

The two halves of the layer-skipping loop (:func:`run_device`, :func:`run_server`) take the same steps as
:func:`jeidnn.model.early_exit.run_dynamic`, so a split model takes the same exits and, on the same rows,
computes the same numbers as the whole one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.initialization import no_init_weights

from jeidnn.errors import JeidnnError, first_line
from jeidnn.hf.config import EarlyExitConfig
from jeidnn.hf.folder import load_preprocessor
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.io import atomic_folder, json_safe
from jeidnn.model.early_exit import gate_config, leaving_rows
from jeidnn.model.families import LayerState
from jeidnn.model.gates import Gates

__all__ = ["TIER_KEY", "DeviceOutput", "Tier", "load_tier", "run_device", "run_server", "split_model"]

TIER_KEY = "jeidnn_tier"
"""The config.json entry of a tier folder: ``{"role", "split_layer", "split_id", "payload_dtype"}``."""

EMBEDDING_MODULES = ("embeddings", "embeddings_project", "wte", "wpe", "embed_tokens")
"""Children of a backbone's base model that turn token ids (or pixels) into the first hidden states, across
the supported families (ELECTRA adds a projection, GPT-2 learned positions): the server tier never runs
them."""

Role = Literal["device", "server"]


class _Absent(nn.Module):
    """A part of the model the other tier holds."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError(f"{self.what} is held by the other tier of this split model")


class _ZeroEmbeddings(nn.Module):
    """Stands for the token embeddings on the server tier: zeros of the payload's shape ``(B, T, H)``.

    A family's ``embed`` builds what its layers read besides the hidden states (attention masks, position
    tables) from the attention mask and the shape of the first hidden states only; the server calls it with
    these zeros and then replaces the hidden states with the payload's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shape: tuple[int, int, int] = (0, 0, 0)
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass
class Tier:
    """One tier of a split model: the whole model's config and the parts this tier holds."""

    model: EarlyExitModel
    role: Role
    split_layer: int  # K: the device runs layers 1 .. K
    split_id: str
    payload_dtype: str  # what the device sends unless told otherwise

    @property
    def local_exits(self) -> list[int]:
        """0-based exits this tier evaluates."""
        on_device = self.role == "device"
        return [
            k for k, layer in enumerate(self.model.heads.layers) if (layer <= self.split_layer) == on_device
        ]


def _tier_parts(model: EarlyExitModel, role: Role, at: int) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute or index, replacement) for each part of ``model`` that ``role`` does not hold."""
    backbone, heads = model.backbone, model.heads
    parts: list[tuple[nn.Module, str, nn.Module]] = []
    for i in range(backbone.num_layers):
        if (i < at) != (role == "device"):
            parts.append((backbone.layers, str(i), _Absent(f"layer {i + 1}")))
    for k, layer in enumerate(heads.layers):
        if (layer <= at) != (role == "device"):
            parts.append((heads.heads, str(k), _Absent(f"the exit after layer {layer}")))
    if role == "server":
        zeros = _ZeroEmbeddings()
        for name in EMBEDDING_MODULES:
            if isinstance(getattr(backbone.model, name, None), nn.Module):
                parts.append((backbone.model, name, zeros))
    return parts


def _keep_only(model: EarlyExitModel, role: Role, at: int) -> EarlyExitModel:
    """``model`` (changed in place) holding only ``role``'s parts."""
    for parent, name, replacement in _tier_parts(model, role, at):
        if isinstance(parent, nn.ModuleList):
            parent[int(name)] = replacement
        else:
            setattr(parent, name, replacement)
    return model


def _saved_state(model: EarlyExitModel) -> dict[str, Tensor]:
    """The tensors ``save_pretrained`` would write for ``model``, each once, under its Hugging Face name."""
    state = model.state_dict()
    ignored = getattr(model, "_keys_to_ignore_on_save", None) or set()
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if name in ignored or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().contiguous()
    return out


def _check_split_layer(model: EarlyExitModel, at: int) -> None:
    layers, num_layers = model.heads.layers, model.backbone.num_layers
    if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at < num_layers:
        raise JeidnnError(
            f"--at {at!r} must be a layer between 1 and {num_layers - 1}: the device runs layers 1..K and "
            "the server the rest"
        )
    if at < layers[0]:
        raise JeidnnError(
            f"--at {at} leaves the device without an exit (the first exit is after layer {layers[0]}); "
            f"choose K >= {layers[0]}"
        )


def split_model(
    model: EarlyExitModel, at: int, out: str | Path, payload_dtype: str = "float16", overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``out/device`` and ``out/server``: ``model`` cut after backbone layer ``at``.

    Args:
        model: a loaded early-exit model (it is left unchanged).
        at: ``K``; the device runs layers ``1 .. K``, the server ``K+1 .. L``.
        out: the folder to write (whole or not at all).
        payload_dtype: what the device tier sends by default (``float32``, ``float16``, ``int8``).
        overwrite: replace an existing ``out``.

    Returns:
        The two folders.
    """
    from jeidnn.serve.payload import PAYLOAD_DTYPES

    _check_split_layer(model, at)
    if payload_dtype not in PAYLOAD_DTYPES:
        raise JeidnnError(f"--payload-dtype {payload_dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    whole = _saved_state(model)
    base = model.config.to_dict()
    # As save_pretrained writes it: the gates the model holds now (they may have been replaced).
    base["gates"] = json_safe(gate_config(model.gates, model.exit_threshold), nonfinite="string")
    digest = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
    for name in sorted(whole):
        if name.startswith(("heads.", "gates.")):  # small, and different for every trained model
            digest.update(whole[name].float().cpu().numpy().tobytes())
    digest.update(str(at).encode())
    split_id = digest.hexdigest()[:16]
    out = Path(out).expanduser()
    with atomic_folder(out, overwrite) as tmp:
        for role in ("device", "server"):
            tier = _keep_only(copy.deepcopy(model), role, at)
            folder = tmp / role
            folder.mkdir()
            config = dict(base)
            config[TIER_KEY] = {
                "role": role,
                "split_layer": at,
                "split_id": split_id,
                "payload_dtype": payload_dtype,
            }
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            keep = set(_saved_state(tier))
            save_file({k: v.cpu() for k, v in whole.items() if k in keep}, str(folder / "model.safetensors"))
            if role == "device" and model.preprocessor is not None:
                model.preprocessor.save_pretrained(folder)
    return out / "device", out / "server"


def read_tier_info(folder: Path) -> dict[str, Any] | None:
    """The ``jeidnn_tier`` entry of ``folder/config.json``; None for a whole model (or no model at all)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    info = config.get(TIER_KEY) if isinstance(config, dict) else None
    return info if isinstance(info, dict) else None


def load_tier(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Tier:
    """A tier folder written by :func:`split_model`, in eval mode on ``device``.

    Args:
        dtype: the backbone's dtype (None: the folder's); exit heads and gates stay float32.
    """
    folder = Path(folder).expanduser()
    info = read_tier_info(folder)
    if info is None:
        raise JeidnnError(f"{folder} is not a tier of a split model (no {TIER_KEY} in its config.json)")
    try:
        role, at = info["role"], int(info["split_layer"])
        fields = json.loads((folder / "config.json").read_text())
        fields.pop(TIER_KEY)
        config = EarlyExitConfig.from_dict(fields)
        state = load_file(str(folder / "model.safetensors"))
    except (KeyError, ValueError, TypeError, OSError, SafetensorError) as exc:
        raise JeidnnError(
            f"cannot load the tier in {folder}: {first_line(exc)}; run jeidnn split again"
        ) from None
    if role not in ("device", "server"):
        raise JeidnnError(f"{folder / 'config.json'}: unknown tier role {role!r}; run jeidnn split again")
    with no_init_weights():  # every tensor comes from the file
        model = EarlyExitModel(config)
    _check_split_layer(model, at)
    model = _keep_only(model, role, at)
    expected = set(_saved_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise JeidnnError(
            f"{folder / 'model.safetensors'} does not hold the {role} tier's tensors (missing {missing[:2]}, "
            f"unexpected {extra[:2]}); run jeidnn split again"
        )
    model.load_state_dict(state, strict=False)
    backbone_dtype = dtype or next(v.dtype for k, v in state.items() if k.startswith("backbone."))
    model.backbone.to(backbone_dtype)
    model.to(device).eval()
    if role == "device":
        model.preprocessor = load_preprocessor(str(folder), config.modality, local=True)
    return Tier(model, role, at, str(info["split_id"]), str(info.get("payload_dtype", "float16")))


# ---------------------------------------------------------------------- the two halves of the loop
@dataclass
class DeviceOutput:
    """What the device tier computed for one batch of ``B`` samples."""

    left: list[tuple[Tensor, Tensor, int]]  # per group that exited: rows (b,), logits (b, C), 0-based exit
    rows: Tensor  # (r,) the rows that go on to the server
    hidden: Tensor  # (r, T, H) their hidden states after layer K
    lengths: Tensor  # (r,) their real tokens
    gate_state: Any  # their gate state after the device's exits
    fallback: Tensor | None  # (r, C) their logits at the deepest local exit (degraded answers)
    fallback_exit: int  # that exit (0-based)


def _run_layers(
    model: EarlyExitModel,
    layers: range,
    hidden: Tensor,
    layer_state: LayerState,
    state: Any,
    keep: int | None,
) -> tuple[list[tuple[Tensor, Tensor, int]], Tensor, Tensor, LayerState, Any, Tensor | None]:
    """Layers ``layers`` (0-based) of the layer-skipping loop on the running rows, as ``run_dynamic`` does.

    ``keep``: an exit whose logits are kept for the rows still running after it (evaluated even where the
    gates would not read it). Returns the groups that left, the running rows, their hidden states, layer
    state, gate state and kept logits.
    """
    backbone, heads, gates, tau = model.backbone, model.heads, model.gates, model.exit_threshold
    last = heads.num_exits - 1
    learned = isinstance(gates, Gates)
    never = gates is None or (learned and tau > 1)
    reads = [gates is not None and (learned or gates.reads_exit(k)) for k in range(last)] + [True]
    leaves = [not never and (learned or gates.can_exit(k)) for k in range(last)]
    exit_at = {layer - 1: k for k, layer in enumerate(heads.layers)}
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    left: list[tuple[Tensor, Tensor, int]] = []
    kept = None
    for i in layers:
        hidden = backbone.run_layer(i, hidden, layer_state)  # (b, T, H)
        k = exit_at.get(i)
        if k is None or not (reads[k] or k == keep):
            continue
        pooled = backbone.pool(hidden, layer_state)  # (b, H) float32
        logits = heads.heads[k](pooled)  # (b, C)
        if k == keep:
            kept = logits
        if k == last:  # everyone still running exits here
            left.append((rows, logits, k))
            rows = rows[:0]
            break
        if not reads[k]:
            continue
        score, state = gates.step(k, logits, pooled, state) if learned else gates.step(k, logits, state)
        if not leaves[k]:
            continue
        split = leaving_rows(score >= tau if learned else score)
        if split is None:
            continue
        go_on, leave = split
        if go_on is None:
            left.append((rows, logits, k))
            rows = rows[:0]
            break
        left.append((rows[leave], logits.index_select(0, leave), k))
        hidden = hidden.index_select(0, go_on)
        layer_state = layer_state.select(go_on)
        rows = rows[go_on]
        state = state[go_on] if state is not None else None
        kept = kept.index_select(0, go_on) if kept is not None else None
    return left, rows, hidden, layer_state, state, kept


@torch.inference_mode()
def run_device(tier: Tier, inputs: dict[str, Tensor]) -> DeviceOutput:
    """The device half: embeddings, layers ``1 .. K`` and their exits for a batch of model-ready inputs."""
    model = tier.model
    hidden, layer_state = model.backbone.embed(dict(inputs))  # (B, T, H)
    gates = model.gates
    state = gates.init_state(hidden.shape[0], device=hidden.device) if gates is not None else None
    deepest = tier.local_exits[-1]
    left, rows, hidden, layer_state, state, kept = _run_layers(
        model, range(tier.split_layer), hidden, layer_state, state, deepest
    )
    mask = layer_state.token_mask  # (r, T) or None (images: every token is real)
    if mask is None:
        lengths = torch.full((len(rows),), hidden.shape[1], dtype=torch.long, device=hidden.device)
    else:
        lengths = mask.sum(dim=1).long()  # (r,)
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask.bool(), positions[None] < lengths[:, None]):
            raise JeidnnError("a split model needs right-padded inputs (real tokens first in every row)")
    return DeviceOutput(left, rows, hidden, lengths, state, kept, deepest)


@torch.inference_mode()
def run_server(tier: Tier, hidden: Tensor, lengths: Tensor, gate_state: Any) -> tuple[Tensor, Tensor]:
    """The server half: layers ``K+1 .. L`` and their exits for hidden states ``(B, T, H)`` after layer K.

    Returns:
        logits of the exit each row took ``(B, C)`` and that exit's 0-based index ``(B,)``.
    """
    model = tier.model
    backbone = model.backbone
    batch, length, width = hidden.shape
    zeros = next(m for m in backbone.model.children() if isinstance(m, _ZeroEmbeddings))
    zeros.shape, zeros.dtype, zeros.device = (batch, length, width), hidden.dtype, hidden.device
    positions = torch.arange(length, device=hidden.device)
    mask = (positions[None] < lengths[:, None].to(hidden.device)).long()  # (B, T)
    if backbone.modality == "text":
        ids = torch.zeros_like(mask)
        given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": ids}
        inputs = {k: v for k, v in given.items() if k in backbone.input_names}
    else:
        inputs = {"pixel_values": hidden.new_zeros(batch, 1)}  # the embeddings are not run
    _, layer_state = backbone.embed(inputs)
    left, *_ = _run_layers(
        model, range(tier.split_layer, backbone.num_layers), hidden, layer_state, gate_state, None
    )
    logits = left[0][1].new_empty(batch, model.num_classes)  # (B, C)
    exits = torch.empty(batch, dtype=torch.long, device=hidden.device)  # (B,)
    for rows, group, k in left:
        logits[rows], exits[rows] = group, k
    return logits, exits
