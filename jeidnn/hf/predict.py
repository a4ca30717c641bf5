"""`jeidnn predict`: run a saved early-exit model on texts and print one JSON line per input.

Also home of what :meth:`EarlyExitModel.predict` does around the forward: texts, PIL images or
tensors -> model-ready batches, and outputs -> :class:`Prediction`, so that the CLI and the Python
API validate inputs and report results the same way.

Example:
    $ jeidnn predict runs/tweets/model --text "what a day" --alpha 0.1
    {"label": "positive", "probability": 0.91, "exit_layer": 2, "cost": 0.35, "prediction_set": ["positive"]}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from jeidnn.data.tables import check_texts, pad_token_lists, read_texts
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.conformal import prediction_sets

if TYPE_CHECKING:
    from jeidnn.hf.modeling import EarlyExitModel
    from jeidnn.model.early_exit import EarlyExitOutput


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


def to_predictions(model: EarlyExitModel, out: EarlyExitOutput, quantiles: Tensor | None) -> list[Prediction]:
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


Batch = tuple[list[int], dict[str, Tensor]]
"""Positions of the batch's samples in the input list, and the model-ready tensors."""

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------- inputs -> batches
def make_batches(model: EarlyExitModel, inputs: Any, batch_size: int) -> Iterator[Batch]:
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


def _text_batches(model: EarlyExitModel, texts: list[str], batch_size: int) -> Iterator[Batch]:
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


def _image_batches(model: EarlyExitModel, images: list[Any], batch_size: int) -> Iterator[Batch]:
    from PIL import Image

    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise JeidnnError(
                f"input {i + 1} is a {type(image).__name__}, not a PIL image (this is a vision model)"
            )
    for start in range(0, len(images), batch_size):
        chunk = [im.convert("RGB") for im in images[start : start + batch_size]]
        pixels = model.preprocessor(images=chunk, return_tensors="pt")["pixel_values"]  # (b, 3, H, W)
        yield list(range(start, start + len(chunk))), {"pixel_values": pixels}


# ---------------------------------------------------------------------- CLI
# Texts per call of EarlyExitModel.predict, so that the progress bar moves: long enough for its
# longest-first batching to keep padding low, short enough for the bar to move.
_CHUNK_BATCHES = 16


def predict_cli(
    model_dir: str,
    texts: list[str] | None,
    input_path: str | None,
    column: str = "text",
    alpha: float | None = None,
    output: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool | None = None,
) -> int:
    """Predict `texts` (``--text``) or the `column` of `input_path`; write JSON lines to `output` or stdout.

    Args:
        alpha: conformal level; None uses the model's ``default_alpha`` (the run's ``export.alpha``).
        device: where the model runs: ``auto`` (the GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``...
        progress: a progress bar on stderr; None shows it when stderr is a terminal.

    Returns:
        The exit status (0). User mistakes raise :class:`JeidnnError`.
    """
    from tqdm.auto import tqdm

    from jeidnn.hf.modeling import EarlyExitModel

    if texts and input_path:
        raise JeidnnError("give either --text or --input, not both")
    if texts:
        items = check_texts(texts, "--text #{}")
    elif input_path:
        items = read_texts(input_path, column)
    else:
        raise JeidnnError(
            "nothing to predict: give --text TEXT (repeatable) or --input FILE (.csv or .jsonl)"
        )
    if batch_size < 1:
        raise JeidnnError(f"--batch-size must be a positive integer, got {batch_size}")
    from jeidnn.train.devices import run_device  # imports Lightning: only here, not for the Python API

    target = run_device(device, key="--device")
    model = EarlyExitModel.from_pretrained(model_dir).to(target)
    if alpha is not None:
        model.quantiles_for(alpha)  # fail on an uncalibrated alpha before any work
    if progress is None:
        progress = sys.stderr.isatty()
    chunk = batch_size * _CHUNK_BATCHES
    lines = []
    with tqdm(total=len(items), desc="predict", unit="text", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            lines += [
                json.dumps(p.to_json()) + "\n"
                for p in model.predict(part, alpha=alpha, batch_size=batch_size)  # None: default_alpha
            ]
            bar.update(len(part))
    if output is None:
        sys.stdout.write("".join(lines))
    else:
        try:
            Path(output).expanduser().write_text("".join(lines))
        except OSError as exc:
            raise JeidnnError(f"cannot write --output {output}: {exc.strerror}") from None
    return 0
