"""Command line: `jeidnn train | evaluate | predict | export | certify | prune | serve | split`;
`python train.py` is `jeidnn train`.

`train` takes one option per config field (jeidnn/config/parser.py), so `--help` lists every key with its
documentation. User errors print one line on stderr and exit with status 2, without a traceback or a
usage dump; status messages are logged as `[jeidnn] ...` lines on stderr (`--quiet`: warnings only).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from jeidnn.cli.common import CommandParser, guarded
from jeidnn.log import setup_logging

log = logging.getLogger(__name__)

TRAIN_HELP = (
    "Train, evaluate and export a JEI-DNN early-exit model. Reads --config FILE (default: the packaged "
    "configs/default.yaml); any key below overrides it, e.g. --data.max_train_samples 2000. Values are "
    "YAML: --model.exit_layers '[2, 4]', --jeidnn.lambdas null."
)


def train_main(argv: list[str], prog: str = "train.py") -> int:
    def go() -> int:
        from jeidnn.config.parser import config_parser, packaged_config, parse_config

        parser = config_parser(prog, description=TRAIN_HELP)
        parser.add_argument(
            "--print_config", action="store_true", help="Print the resolved config as YAML and exit."
        )
        parser.add_argument(
            "--quiet", action="store_true", help="No progress bars; log only warnings and errors."
        )
        parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
        cfg, args = parse_config(parser, argv, default_config=packaged_config())
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            return 0
        from jeidnn.evaluate.methods import check_export_method

        check_export_method(cfg)  # a bad export.method fails here, before any data or model is loaded
        setup_logging(args.quiet)
        from jeidnn.pipeline.run import run

        report = run(cfg, progress=not (args.quiet or args.no_progress))
        log.info("report: %s  (%s)", cfg.run_dir / "report.json", cfg.run_dir / "report.md")
        log.info("timings (s): %s", ", ".join(f"{k}: {v}" for k, v in report["timings_s"].items()))
        return 0

    return guarded(go)


def evaluate_main(argv: list[str]) -> int:
    parser = CommandParser(prog="jeidnn evaluate", description="Recompute the evaluation of a finished run.")
    parser.add_argument("run_dir", help="a finished run folder, runs/<name>")
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=None, help="conformal levels, e.g. 0.05 0.1"
    )
    parser.add_argument("--ece-bins", type=int, default=None, help="bins of the calibration error")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)

    def go() -> int:
        from jeidnn.evaluate.evaluation import evaluate_run

        setup_logging(args.quiet)
        evaluate_run(
            args.run_dir, alphas=args.alphas, ece_bins=args.ece_bins, write=True, progress=not args.quiet
        )
        log.info("updated %s and report.md", Path(args.run_dir) / "report.json")
        return 0

    return guarded(go)


def predict_main(argv: list[str]) -> int:
    parser = CommandParser(prog="jeidnn predict", description="Early-exit predictions as JSON lines.")
    parser.add_argument("model_dir", help="an exported model folder, runs/<name>/model")
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
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the backbone's dtype (default: the folder's; exit heads and gates stay float32)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar; log only warnings and errors")
    args = parser.parse_args(argv)

    def go() -> int:
        from jeidnn.hf.predict import predict_cli

        setup_logging(args.quiet)
        return predict_cli(
            args.model_dir,
            args.text,
            args.input,
            args.column,
            args.alpha,
            args.output,
            args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=False if args.quiet else None,
        )

    return guarded(go)


def export_main(argv: list[str]) -> int:
    from jeidnn.cli import export

    parser = CommandParser(prog="jeidnn export", description=export.DESCRIPTION)
    export.add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: export.run(args))


def certify_main(argv: list[str]) -> int:
    from jeidnn.cli import certify

    parser = CommandParser(prog="jeidnn certify", description=certify.DESCRIPTION)
    certify.add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: certify.run(args))


def prune_main(argv: list[str]) -> int:
    from jeidnn.cli.prune import main as prune  # torch-heavy: loaded only for this command

    return prune(argv)


def serve_main(argv: list[str]) -> int:
    from jeidnn.cli.serve import main as serve  # the serving stack is an optional extra

    return serve(argv)


def split_main(argv: list[str]) -> int:
    from jeidnn.cli.split import main as split

    return split(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (lambda argv: train_main(argv, prog="jeidnn train"), "train, evaluate and export a model"),
    "evaluate": (evaluate_main, "recompute the evaluation of a finished run"),
    "predict": (predict_main, "early-exit predictions of an exported model as JSON lines"),
    "export": (export_main, "export another operating point of a finished run"),
    "certify": (certify_main, "certify the cheapest operating point for a risk bound against the full model"),
    "prune": (prune_main, "prune heads, FFN neurons and layers of a finished run's model"),
    "serve": (serve_main, "serve a model (or one tier of a split model) over HTTP"),
    "split": (split_main, "split a model into a device tier and a server tier, or plan the split"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join(COMMANDS)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: jeidnn {{{','.join(COMMANDS)}}} ...\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10}{text}")
        print("\n`jeidnn COMMAND --help` lists a command's options; `jeidnn train` = `python train.py`.")
        return 0
    if not argv:
        print(f"error: name a command ({names}); see jeidnn --help", file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {names}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
