"""`jeidnn export RUN`: its arguments, and what it runs (:func:`jeidnn.export.exporter.export_run`).

:func:`jeidnn.cli.main.export_main` wires them into the command line.
"""

from __future__ import annotations

import argparse

from jeidnn.log import setup_logging

__all__ = ["DESCRIPTION", "add_arguments", "run"]

DESCRIPTION = (
    "Export an operating point of a finished run as a model folder with its conformal quantiles and model "
    "card: by default the run's export.selection (budget: of every method's calib-A choice within the "
    "budget, the one most accurate on val), or any method's (--method)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``RUN [--selection S] [--method NAME] [--budget B | --lam L] [--alpha A] [--out DIR] [--dtype D]
    [--overwrite] [--quiet]``."""
    parser.add_argument("run_dir", metavar="RUN", help="a finished run folder, runs/<name>")
    parser.add_argument(
        "--selection",
        choices=["budget", "guarantee", "method"],
        help="budget: the method most accurate on val among every method's calib-A choice within the "
        "budget; guarantee: the cheapest operating point certified for the run's export.guarantee; "
        "method: --method's (default: the run's export.selection; --method implies method)",
    )
    parser.add_argument(
        "--method", help="a learned or baseline method of the run, exported at the budget (or --lam)"
    )
    parser.add_argument(
        "--budget", type=float, help="calib cost budget (default: the run's export.cost_budget)"
    )
    parser.add_argument(
        "--lam", type=float, help="learned methods: the λ of the model to export, not --budget"
    )
    parser.add_argument(
        "--alpha", type=float, help="default conformal level (default: the run's export.alpha)"
    )
    parser.add_argument("--out", help="output folder (default: RUN/export/<method>-<budget>)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the exported backbone's dtype (default: the run's; exit heads and gates stay float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")


def run(args: argparse.Namespace) -> int:
    """Export what ``args`` ask for; a bad input raises a one-line JeidnnError."""
    from jeidnn.export.exporter import export_run  # torch-heavy: loaded only for this command

    setup_logging(args.quiet)
    options = {"budget": args.budget, "lam": args.lam, "alpha": args.alpha, "out": args.out}
    options["selection"] = args.selection
    export_run(args.run_dir, args.method, overwrite=args.overwrite, dtype=args.dtype, **options)
    return 0
