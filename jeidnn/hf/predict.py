"""`jeidnn predict`: run a saved early-exit model on texts and print one JSON line per input.

The CLI and :meth:`EarlyExitModel.predict` prepare inputs and report results the same way
(:mod:`jeidnn.hf.batches`).

Example:
    $ jeidnn predict runs/tweets/model --text "what a day" --alpha 0.1
    {"label": "positive", "probability": 0.91, "exit_layer": 2, "cost": 0.35, "prediction_set": ["positive"]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jeidnn.data.tables import check_texts, read_texts
from jeidnn.errors import JeidnnError
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.io import write_text

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
    dtype: str = "auto",
) -> int:
    """Predict `texts` (``--text``) or the `column` of `input_path`; write JSON lines to `output` or stdout.

    Args:
        alpha: conformal level; None uses the model's ``default_alpha`` (the run's ``export.alpha``).
        device: where the model runs: ``auto`` (the GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``...
        progress: a progress bar on stderr; None shows it when stderr is a terminal.
        dtype: the backbone's dtype, ``float32``, ``bfloat16`` or ``float16`` (``auto`` = the folder's);
            exit heads and gates stay float32.

    Returns:
        The exit status (0). User mistakes raise :class:`JeidnnError`.
    """
    from tqdm.auto import tqdm

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
    from jeidnn.train.devices import run_device, torch_dtype  # imports Lightning: not for the Python API

    target = run_device(device, key="--device")
    loaded = "auto" if dtype == "auto" else torch_dtype(dtype, "--dtype")
    model = EarlyExitModel.from_pretrained(model_dir, dtype=loaded).to(target)
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
            write_text(Path(output).expanduser(), "".join(lines))
        except OSError as exc:
            raise JeidnnError(f"cannot write --output {output}: {exc.strerror}") from None
    return 0
