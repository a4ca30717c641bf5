"""What :meth:`EarlyExitModel.predict <jeidnn.hf.modeling.EarlyExitModel.predict>` does around the forward:
texts, PIL images or tensors -> model-ready batches, and outputs -> :class:`Prediction`, so that the CLI
(:mod:`jeidnn.hf.predict`) and the Python API validate inputs and report results the same way.

``model`` below is an :class:`~jeidnn.hf.modeling.EarlyExitModel` (which imports this module).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from jeidnn.data.images import pixel_values
from jeidnn.data.tables import check_texts, pad_token_lists
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.conformal import prediction_sets


@dataclass
class Prediction:
    """One input's prediction. ``prediction_set`` is the conformal set at the exit taken (None without α)."""

    label: str
    probability: float
    exit_layer: int
    cost: float
    prediction_set: list[str] | None
    probabilities: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """The five fields written by ``jeidnn predict``."""
        return {
            "label": self.label,
            "probability": self.probability,
            "exit_layer": self.exit_layer,
            "cost": self.cost,
            "prediction_set": self.prediction_set,
        }


def to_predictions(model: PreTrainedModel, out: ModelOutput, quantiles: Tensor | None) -> list[Prediction]:
    """One :class:`Prediction` per row of a forward's output; conformal sets if `quantiles` (L,) is given."""
    probs = out.probs.float().cpu()  # (B, C)
    exits = out.exit_index.cpu()  # (B,)
    members = None if quantiles is None else prediction_sets(probs, exits, quantiles).tolist()  # (B, C)
    labels = model.labels
    result = []
    for b, (p, exit_) in enumerate(zip(probs.tolist(), exits.tolist())):
        top = max(range(len(p)), key=p.__getitem__)
        result.append(
            Prediction(
                label=labels[top],
                probability=p[top],
                exit_layer=model.heads.layers[exit_],
                cost=model.costs[exit_],  # the exact configured value, not its float32 copy
                prediction_set=None if members is None else [y for y, m in zip(labels, members[b]) if m],
                probabilities=dict(zip(labels, p)),
            )
        )
    return result


def predict_inputs(
    model: PreTrainedModel, inputs: Any, quantiles: Tensor | None, batch_size: int
) -> list[Prediction]:
    """``model``'s layer-skipping predictions of ``inputs`` in input order, in eval mode (its mode is
    restored after); conformal sets with the per-exit ``quantiles`` ``(L,)`` if given."""
    if batch_size < 1:
        raise JeidnnError(f"batch size must be a positive integer, got {batch_size}")
    was_training = model.training
    model.eval()
    device = model.cost_per_exit.device
    predictions: list[tuple[int, Prediction]] = []
    try:
        with torch.inference_mode():
            for positions, batch in make_batches(model, inputs, batch_size):
                out = model.forward_dynamic({k: v.to(device) for k, v in batch.items()})
                predictions.extend(zip(positions, to_predictions(model, out, quantiles)))
    finally:
        model.train(was_training)
    return [p for _, p in sorted(predictions, key=lambda item: item[0])]


Batch = tuple[list[int], dict[str, Tensor]]
"""Positions of the batch's samples in the input list, and the model-ready tensors."""

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------- inputs -> batches
def make_batches(model: PreTrainedModel, inputs: Any, batch_size: int) -> Iterator[Batch]:
    """Split texts, PIL images or a dict of tensors into model-ready batches of at most `batch_size`."""
    if isinstance(inputs, Mapping):
        yield from _tensor_batches(inputs, batch_size)
        return
    if isinstance(inputs, (str, bytes)):
        raise JeidnnError("expected a list of inputs but got a single string; wrap it in a list")
    items = list(inputs)
    if not items:
        return
    if model.preprocessor is None:
        raise JeidnnError(
            "this model was saved without a tokenizer or image processor; pass a dict of tensors"
        )
    if model.backbone.modality == "text":
        yield from _text_batches(model, check_texts(items, "input {}"), batch_size)
    else:
        yield from _image_batches(model, items, batch_size)


def _tensor_batches(inputs: Mapping[str, Any], batch_size: int) -> Iterator[Batch]:
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    if not tensors or len(set(sizes.values())) != 1:
        raise JeidnnError(f"input tensors must share their first (batch) dimension, got sizes {sizes}")
    n = next(iter(sizes.values()))
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        yield list(range(start, end)), {k: v[start:end] for k, v in tensors.items()}


def _text_batches(model: PreTrainedModel, texts: list[str], batch_size: int) -> Iterator[Batch]:
    tokenizer = model.preprocessor
    encoded = tokenizer(texts, truncation=True, max_length=model.max_length)  # lists, unpadded
    keys = [k for k in TEXT_KEYS if k in encoded]
    # Longest first so that batches hold similar lengths and carry little padding; results come back
    # in input order (EarlyExitModel.predict sorts them by position).
    order = sorted(range(len(texts)), key=lambda i: -len(encoded["input_ids"][i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        yield positions, pad_token_lists({k: [encoded[k][i] for i in positions] for k in keys}, pad_id)


def _image_batches(model: PreTrainedModel, images: list[Any], batch_size: int) -> Iterator[Batch]:
    from PIL import Image

    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise JeidnnError(
                f"input {i + 1} is a {type(image).__name__}, not a PIL image (this is a vision model)"
            )
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = pixel_values(model.preprocessor, chunk)  # (b, 3, H, W)
        yield list(range(start, start + len(chunk))), {"pixel_values": pixels}
