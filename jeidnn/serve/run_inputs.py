"""A finished run's test inputs as ``jeidnn split --plan`` and the serving benchmarks read them again: in the
order of the run's cached predictions, with each input's real tokens and its size as a ``/predict`` request
carries it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jeidnn.errors import JeidnnError
from jeidnn.hf.batches import make_batches
from jeidnn.hf.modeling import EarlyExitModel

__all__ = ["request_sizes", "run_test_inputs"]


def run_test_inputs(run_dir: Path, modality: str = "text") -> list[Any]:
    """The inputs of the run's test split (texts, or PIL images), in the order of its cached predictions
    (splits are seeded)."""
    from jeidnn.config.parser import load_config
    from jeidnn.data.sources import load_raw
    from jeidnn.data.splits import make_splits

    cfg = load_config(run_dir / "config.yaml")
    raw = load_raw(cfg.data, modality)
    test = make_splits(len(raw.labels), cfg.data, cfg.seed, raw.test_positions).indices["test"]
    inputs = [raw.inputs[i] for i in test]
    return inputs if modality == "text" else [_as_image(x) for x in inputs]


def _as_image(value: Any) -> Any:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    try:
        import numpy as np

        return Image.fromarray(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise JeidnnError(
            f"a test image of the run is a {type(value).__name__} that PIL cannot read ({exc}); --plan times "
            "and sizes images as the server receives them, PNG or JPEG"
        ) from None


IMAGE_ENVELOPE = len('{"image": ""}')
"""Bytes around an image's base64 text in a ``/predict`` request (K = 0)."""


def request_sizes(model: EarlyExitModel, inputs: list[Any]) -> tuple[Tensor, Tensor]:
    """Each input's real tokens ``(N,)`` and its bytes as a ``/predict`` request carries it ``(N,)`` float64:
    a text's UTF-8 bytes; an image's base64 PNG and its ``{"image": ...}`` object. Every image has the same
    tokens (patches and the family's own tokens: ViT's class token, DeiT's distillation token too), counted
    on the first one's hidden states."""
    if model.config.modality == "text":
        encoded = model.preprocessor(inputs, truncation=True, max_length=model.max_length)["input_ids"]
        sent = [len(t.encode()) for t in inputs]
        return torch.tensor([len(ids) for ids in encoded]), torch.tensor(sent, dtype=torch.float64)
    _, batch = next(make_batches(model, inputs[:1], 1))
    device = model.cost_per_exit.device
    with torch.inference_mode():
        hidden, _ = model.backbone.embed({k: v.to(device) for k, v in batch.items()})  # (1, T, H)
    sent = []
    for image in inputs:
        png = io.BytesIO()
        image.save(png, format="PNG")
        sent.append(4 * -(-png.tell() // 3) + IMAGE_ENVELOPE)  # base64: 4 characters per 3 bytes
    return torch.full((len(inputs),), hidden.shape[1]), torch.tensor(sent, dtype=torch.float64)
