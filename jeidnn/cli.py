"""Command line: `jeidnn train`, `jeidnn evaluate`, `jeidnn predict`.

User errors (JeidnnError) print one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from jeidnn.errors import JeidnnError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def _quiet_libraries() -> None:
    # Lightning's banner lines (GPU/TPU availability, a logging-service tip) and a known
    # torch/Lightning deprecation notice drown the per-stage progress a user wants to see.
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def guarded(fn: Callable[[], int | None]) -> int:
    """Run `fn`, turning JeidnnError into a one-line message and exit status 2."""
    try:
        return int(fn() or 0)
    except JeidnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train and evaluate a JEI-DNN early-exit model. Any config field can be overridden "
        "with --section.key value, e.g. --data.max_train_samples 2000.",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args, overrides = parser.parse_known_args(argv)

    def go() -> int:
        from jeidnn.config import load_config
        from jeidnn.pipeline import run

        config_path = args.config
        if config_path is None:
            config_path = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
        cfg = load_config(config_path, overrides)
        _quiet_libraries()
        report = run(cfg, progress=not args.no_progress)
        print(f"[jeidnn] report: {cfg.run_dir / 'report.json'}  ({cfg.run_dir / 'report.md'})")
        print("[jeidnn] timings (s): " + ", ".join(f"{k}: {v}" for k, v in report["timings_s"].items()))
        return 0

    return guarded(go)


def evaluate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jeidnn evaluate", description="Recompute the evaluation of a finished run."
    )
    parser.add_argument("run_dir")
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=None, help="conformal levels, e.g. 0.05 0.1"
    )
    parser.add_argument("--ece-bins", type=int, default=None)
    args = parser.parse_args(argv)

    def go() -> int:
        from jeidnn.evaluation import evaluate_run

        evaluate_run(args.run_dir, alphas=args.alphas, ece_bins=args.ece_bins, write=True)
        print(f"[jeidnn] updated {Path(args.run_dir) / 'report.json'} and report.md")
        return 0

    return guarded(go)


def predict_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jeidnn predict", description="Early-exit predictions as JSON lines."
    )
    parser.add_argument("model_dir")
    parser.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    parser.add_argument("--input", default=None, help="CSV or JSONL file of inputs")
    parser.add_argument("--column", default="text", help="column of --input holding the text")
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="conformal miscoverage level (default: the run's export.alpha)",
    )
    parser.add_argument("--output", default=None, help="JSON lines file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    def go() -> int:
        from jeidnn.predict import predict_cli

        return predict_cli(
            args.model_dir, args.text, args.input, args.column, args.alpha, args.output, args.batch_size
        )

    return guarded(go)


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: jeidnn {train,evaluate,predict} ...", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; choose train, evaluate or predict", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
