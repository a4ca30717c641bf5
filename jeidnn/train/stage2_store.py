"""Stage 2's finished fits on disk: trained models (weights, variant, λ, history) in one safetensors file."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from jeidnn.config.gating import GateVariant
from jeidnn.io import write_safetensors
from jeidnn.model.gates import Gates
from jeidnn.train.stage2 import TrainedModel


def save_models(path: Path, models: Sequence[TrainedModel]) -> None:
    """Write trained models (weights, variant name, λ, history) to one safetensors file, atomically."""
    tensors: dict[str, Tensor] = {}
    for k, model in enumerate(models):
        tensors.update({f"{k}.heads.{n}": v.contiguous() for n, v in model.heads.state_dict().items()})
        tensors.update({f"{k}.gates.{n}": v.contiguous() for n, v in model.gates.state_dict().items()})
        tensors.update({f"{k}.backbone.{n}": v.contiguous() for n, v in (model.backbone or {}).items()})
    meta = [{"variant": m.variant.name, "lambda": m.lam, "history": m.history} for m in models]
    write_safetensors(path, tensors, metadata={"models": json.dumps(meta)})


def load_models(
    path: Path, variants: Sequence[GateVariant], heads: nn.Module, hidden_size: int
) -> list[TrainedModel]:
    """The models :func:`save_models` wrote, rebuilt around copies of ``heads`` (the warm-up heads)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["models"])
    tensors = load_file(str(path))
    by_name = {v.name: v for v in variants}
    models = []
    for k, entry in enumerate(meta):
        variant = by_name[entry["variant"]]
        model_heads = copy.deepcopy(heads).cpu().eval()
        model_heads.load_state_dict(
            {n[len(f"{k}.heads.") :]: v for n, v in tensors.items() if n.startswith(f"{k}.heads.")}
        )
        gates = Gates(len(heads.heads), variant, hidden_size)
        gates.load_state_dict(
            {n[len(f"{k}.gates.") :]: v for n, v in tensors.items() if n.startswith(f"{k}.gates.")}
        )
        own = {n[len(f"{k}.backbone.") :]: v for n, v in tensors.items() if n.startswith(f"{k}.backbone.")}
        models.append(
            TrainedModel(
                variant, float(entry["lambda"]), model_heads, gates.eval(), entry["history"], own or None
            )
        )
    return models
