"""What a device tier sends its server tier: the hidden states of the samples that did not exit on the device.

Only the real tokens travel (a row's padding is rebuilt on the server), in float32, float16 or int8 with one
float32 scale per token (symmetric, ``scale = max |x| / 127``), together with what the server needs to go on
exactly where the device stopped: each row's number of real tokens, the batch's padded length, and the gates'
per-sample state (a learned gate with ``trajectory`` inputs reads the confidences of the device's exits; the
patience rules their agreement count; the product rule its running product, a bare ``(B,)`` tensor). The
bytes are a safetensors file (no pickle; the server can refuse a malformed one before reading a tensor)
whose string metadata holds the rest::

    lengths      (B,) int32          real tokens of each row (texts are right-padded: tokens 0 .. n-1)
    hidden       (sum n, H)          float32 / float16 / int8, the rows' real tokens one after the other
    scale        (sum n,) float32    int8 only: the token's scale
    gate.<field> (B, ...)            the gate state's tensors (kept in their own dtype: they are small)
    gate         (B,)                instead, a state that is one tensor (the product rule's)
    metadata: format, split_id, split_layer, padded_length, dtype, gate_state (its layout)

A MiniLM token is 384 numbers: 1,536 bytes in float32, 768 in float16, 388 in int8.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from jeidnn.errors import JeidnnError, first_line
from jeidnn.model.exit_rules import RuleState
from jeidnn.model.gates import GateState
from jeidnn.model.rule_gates import PatienceState

__all__ = ["FORMAT", "PAYLOAD_DTYPES", "Payload", "PayloadDtype", "concat", "decode", "encode", "state_to"]

FORMAT = "jeidnn-split-payload/1"
PayloadDtype = Literal["float32", "float16", "int8"]
PAYLOAD_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")
STATE_CLASSES = {cls.__name__: cls for cls in (GateState, RuleState, PatienceState)}
"""Gate states that are dataclasses of tensors, by the name their layout records. A state that is one tensor
(:class:`~jeidnn.model.rule_gates.ProductGates`' running product) has the layout ``{"class": "Tensor"}``."""
TENSOR = "Tensor"


@dataclass
class Payload:
    """The samples a device tier hands on, as the server tier runs them.

    Attributes:
        hidden: hidden states after layer ``split_layer``, right-padded with zeros, ``(B, T, H)``.
        lengths: real tokens of each row, ``(B,)`` long.
        gate_state: the gates' per-sample state after the device's exits (None for stateless rules).
        split_id: names the split both tiers come from (the server refuses another split's payload).
        split_layer: ``K``: the device ran layers ``1 .. K``.
    """

    hidden: Tensor  # (B, T, H)
    lengths: Tensor  # (B,)
    gate_state: Any
    split_id: str
    split_layer: int

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def token_mask(self) -> Tensor:
        """``(B, T)`` long: 1 on each row's real tokens, 0 on its padding."""
        positions = torch.arange(self.hidden.shape[1], device=self.lengths.device)
        return (positions[None] < self.lengths[:, None]).long()


# ---------------------------------------------------------------------- gate state <-> named tensors
def _flatten(state: Any, prefix: str, out: dict[str, Tensor]) -> dict | None:
    """Put ``state``'s tensors into ``out`` under ``prefix.field``; return its layout (class and fields)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        out[prefix] = state.clone().contiguous()
        return {"class": TENSOR}
    layout: dict[str, Any] = {"class": type(state).__name__, "fields": {}}
    for f in fields(state):
        value = getattr(state, f.name)
        if is_dataclass(value):
            layout["fields"][f.name] = _flatten(value, f"{prefix}.{f.name}", out)
        else:
            # A copy: a fresh state's fields share one zero tensor, which safetensors refuses to write twice.
            out[f"{prefix}.{f.name}"] = value.clone().contiguous()
            layout["fields"][f.name] = None
    return layout


def _unflatten(layout: Any, prefix: str, tensors: dict[str, Tensor], rows: int) -> Any:
    """The gate state ``_flatten`` laid out, each tensor checked to hold ``rows`` rows."""
    if layout is None:
        return None
    if not isinstance(layout, dict):
        raise JeidnnError(f"the payload's gate state layout at {prefix!r} is not an object")

    def tensor(key: str) -> Tensor:
        if key not in tensors:
            raise JeidnnError(f"the payload lacks the gate state tensor {key!r}")
        if tensors[key].dim() == 0 or tensors[key].shape[0] != rows:
            raise JeidnnError(f"the payload's gate state tensor {key!r} does not hold one row per sample")
        return tensors[key]

    if layout.get("class") == TENSOR:
        return tensor(prefix)
    cls = STATE_CLASSES.get(layout.get("class"))
    members = layout.get("fields")
    if cls is None or not isinstance(members, dict) or set(members) != {f.name for f in fields(cls)}:
        raise JeidnnError(f"the payload's gate state has an unknown layout {layout.get('class')!r}")
    return cls(
        **{
            name: tensor(f"{prefix}.{name}")
            if sub is None
            else _unflatten(sub, f"{prefix}.{name}", tensors, rows)
            for name, sub in members.items()
        }
    )


def _cat_states(states: Sequence[Any]) -> Any:
    """The rows of several gate states of one kind, one after the other."""
    first = states[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(list(states))
    values = {}
    for f in fields(first):
        parts = [getattr(s, f.name) for s in states]
        values[f.name] = _cat_states(parts) if is_dataclass(parts[0]) else torch.cat(parts)
    return type(first)(**values)


# ---------------------------------------------------------------------- bytes
def encode(payload: Payload, dtype: PayloadDtype = "float32") -> bytes:
    """The payload as bytes, its hidden states in ``dtype`` (only the real tokens are kept)."""
    if dtype not in PAYLOAD_DTYPES:
        raise JeidnnError(f"payload dtype {dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    mask = payload.token_mask().bool()  # (B, T)
    tokens = payload.hidden[mask].float().cpu()  # (sum n, H): row 0's tokens, then row 1's ...
    tensors: dict[str, Tensor] = {"lengths": payload.lengths.to(torch.int32).cpu()}
    if dtype == "int8":
        scale = (tokens.abs().amax(dim=-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (sum n,)
        tensors["hidden"] = torch.round(tokens / scale[:, None]).clamp(-127, 127).to(torch.int8)
        tensors["scale"] = scale
    else:
        tensors["hidden"] = tokens.to(getattr(torch, dtype))
    gate_tensors: dict[str, Tensor] = {}
    layout = _flatten(payload.gate_state, "gate", gate_tensors)
    tensors.update({k: v.cpu() for k, v in gate_tensors.items()})
    metadata = {
        "format": FORMAT,
        "split_id": payload.split_id,
        "split_layer": str(payload.split_layer),
        "padded_length": str(payload.hidden.shape[1]),
        "dtype": dtype,
        "gate_state": json.dumps(layout),
    }
    return save(tensors, metadata=metadata)


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file's header (the bytes after it are not read)."""
    if len(data) < 8:
        raise JeidnnError("the payload is not a safetensors file (fewer than 8 bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise JeidnnError("the payload is not a safetensors file (its header is longer than the body)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JeidnnError(f"the payload's header is not JSON: {first_line(exc)}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def decode(data: bytes, hidden_size: int, dtype: torch.dtype = torch.float32) -> Payload:
    """A payload from its bytes, checked before use: a malformed one raises a one-line JeidnnError.

    Args:
        data: what :func:`encode` wrote.
        hidden_size: ``H`` of the model that will run it.
        dtype: the dtype of the returned hidden states (the server's backbone dtype).
    """
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise JeidnnError(f"the payload's format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        tensors = load(data)
        padded, layer = int(meta["padded_length"]), int(meta["split_layer"])
        layout = json.loads(meta["gate_state"])
        kind, split_id = meta["dtype"], meta["split_id"]
    except (SafetensorError, KeyError, ValueError) as exc:
        raise JeidnnError(f"the payload cannot be read: {first_line(exc)}") from None
    if "lengths" not in tensors or "hidden" not in tensors:
        raise JeidnnError("the payload lacks its `lengths` or `hidden` tensor")
    lengths, tokens = tensors["lengths"].long(), tensors["hidden"]
    if lengths.dim() != 1 or not len(lengths) or int(lengths.min()) < 1 or int(lengths.max()) > padded:
        raise JeidnnError(f"the payload's row lengths must lie in 1..{padded} (its padded length)")
    if tokens.dim() != 2 or tokens.shape != (int(lengths.sum()), hidden_size):
        raise JeidnnError(
            f"the payload's hidden states have shape {tuple(tokens.shape)}, expected "
            f"({int(lengths.sum())}, {hidden_size}) for its rows and this model"
        )
    if kind == "int8":
        if tensors.get("scale", torch.empty(0)).shape != (len(tokens),):
            raise JeidnnError("an int8 payload needs one scale per token")
        tokens = tokens.float() * tensors["scale"].float()[:, None]
    elif kind not in PAYLOAD_DTYPES:
        raise JeidnnError(f"the payload's dtype {kind!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    hidden = tokens.new_zeros(len(lengths), padded, hidden_size, dtype=dtype)  # (B, T, H)
    mask = torch.arange(padded)[None] < lengths[:, None]  # (B, T)
    hidden[mask] = tokens.to(dtype)
    gate_tensors = {k: v for k, v in tensors.items() if k == "gate" or k.startswith("gate.")}
    gate_state = _unflatten(layout, "gate", gate_tensors, len(lengths))
    return Payload(hidden, lengths, gate_state, split_id, layer)


def concat(payloads: Sequence[Payload]) -> Payload:
    """One payload holding the rows of ``payloads`` (of one split) in order, right-padded to the longest."""
    if len(payloads) == 1:
        return payloads[0]
    longest = max(p.hidden.shape[1] for p in payloads)
    hidden = torch.cat(
        [nn.functional.pad(p.hidden, (0, 0, 0, longest - p.hidden.shape[1])) for p in payloads]
    )
    lengths = torch.cat([p.lengths for p in payloads])
    state = _cat_states([p.gate_state for p in payloads])
    return Payload(hidden, lengths, state, payloads[0].split_id, payloads[0].split_layer)


def state_to(state: Any, device: torch.device | str) -> Any:
    """A gate state with every tensor on ``device``."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.to(device)
    values = {f.name: getattr(state, f.name) for f in fields(state)}
    return type(state)(
        **{k: state_to(v, device) if is_dataclass(v) else v.to(device) for k, v in values.items()}
    )
