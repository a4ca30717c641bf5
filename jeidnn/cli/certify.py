"""`jeidnn certify RUN`: the cheapest operating point of a finished run certified for a stated guarantee
(:func:`jeidnn.evaluate.certify.certify`), each method's on its own, and the re-split check
(:class:`jeidnn.evaluate.guarantees.ResplitCheck`); ``--export DIR`` writes the certified model folder.

:func:`jeidnn.cli.main.certify_main` wires it into the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from jeidnn.errors import JeidnnError
from jeidnn.log import setup_logging

__all__ = ["DESCRIPTION", "add_arguments", "run"]

DESCRIPTION = (
    "Certify the cheapest operating point of a finished run whose risk against the full model is at most "
    "--epsilon, with probability at least 1 - --delta (Learn-Then-Test) or in expectation (conformal risk "
    "control), and check the guarantee on random re-splits of calib half B and test."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``RUN [--risk R] [--epsilon E] [--delta D] [--kind K] [--method all|NAME ...] [--resplits N]
    [--pvalue P] [--across A] [--export DIR] [--overwrite] [--quiet]``."""
    parser.add_argument("run_dir", metavar="RUN", help="a finished run folder, runs/<name>")
    parser.add_argument("--risk", default="accuracy_gap", help="accuracy_gap (default) or consistency")
    parser.add_argument("--epsilon", type=float, default=0.01, help="largest risk allowed, in (0, 1)")
    parser.add_argument("--delta", type=float, default=0.1, help="probability the risk exceeds epsilon")
    parser.add_argument(
        "--kind", default="high_probability", help="high_probability (default) or expectation"
    )
    parser.add_argument(
        "--method", nargs="+", default=["all"], help="all (default) or one or more methods of the run"
    )
    parser.add_argument(
        "--resplits", type=int, default=500, help="re-splits of the check (0: no check; default 500)"
    )
    parser.add_argument("--pvalue", default=None, help="p-value (default: the risk's; docs/evaluation.md)")
    parser.add_argument(
        "--across", default="screen_on_a", help="screen_on_a (default) or bonferroni: how methods share delta"
    )
    parser.add_argument("--export", metavar="DIR", help="write the certified model folder here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --export folder")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")


def _guarantee(args: argparse.Namespace) -> Any:
    from jeidnn.config.schema import GuaranteeConfig
    from jeidnn.evaluate.certify import check_guarantee

    for key in ("epsilon", "delta"):
        value = getattr(args, key)
        if not (math.isfinite(value) and 0 < value < 1):
            raise JeidnnError(f"--{key} must lie in (0, 1), got {value:g}")
    g = GuaranteeConfig(args.risk, args.epsilon, args.delta, args.kind)
    check_guarantee(g, args.pvalue, args.across)
    if args.resplits < 0:
        raise JeidnnError(f"--resplits must be 0 (no check) or a positive number, got {args.resplits}")
    return g


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(summary: dict | None) -> str:
    if not summary:
        return "–"
    lo, hi = summary["violation_ci"]
    return f"{summary['mean_cost']:.3f} ({100 * summary['violation']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}])"


def _print_points(points: dict[str, dict], out: Any) -> None:
    print("each method certified on its own at delta (calib half B):", file=out)
    for name, p in points.items():
        if p["param"] is None:
            print(f"  {name:32s} nothing certified (most conservative p = {p['first_pvalue']:.3g})", file=out)
            continue
        print(
            f"  {name:32s} {p['param']}  calib-B cost {_fmt(p['calib_b_cost'])}, test cost "
            f"{_fmt(p['test_cost'])}, test risk {_fmt(p['test_risk'], 4)} ({p['passed']} of "
            f"{p['candidates']} passed)",
            file=out,
        )


def _print_check(check: dict, out: Any) -> None:
    print(
        f"re-split check: {check['resplits']} re-splits of calib B ∪ test (seed {check['seed']}); mean "
        "held-out cost (violation rate [95 % interval]); peeking is a lower bound, not a method:",
        file=out,
    )
    rules = [r for r in ("naive", "calm", "ours", "peeking", "peeking_clipped") if r in check["all"]]
    rows = [(name, r) for name, r in check["methods"].items()] + [("ALL (as certified)", check["all"])]
    for name, r in rows:
        cells = "  ".join(
            f"{rule}: "
            + (f"{r[rule]['mean_cost']:.3f}" if rule.startswith("peeking") else _cell(r.get(rule)))
            for rule in rules
        )
        print(f"  {name:32s} {cells}", file=out)


def _export(run: Any, cert: Any, out: Path, overwrite: bool) -> Path:
    from jeidnn.export.card import write_card
    from jeidnn.export.exporter import build_model, load_backbone
    from jeidnn.export.operating_point import OperatingPoint
    from jeidnn.io import atomic_folder

    point = OperatingPoint(cert.choice, cert.proof, selection="guarantee", certificate=cert)
    backbone, preprocessor = load_backbone(run)
    model, summary = build_model(run, point, backbone, preprocessor, None)
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        write_card(tmp, run, model, summary)
    return out


def run(args: argparse.Namespace, out: Any = None) -> int:
    """Certify what ``args`` ask for and print it; a bad input raises a one-line JeidnnError before anything
    is written."""
    from jeidnn.evaluate.certify import certify, method_points
    from jeidnn.evaluate.guarantees import ResplitCheck
    from jeidnn.evaluate.risk_data import RiskData
    from jeidnn.export.operating_point import Run

    out = out or sys.stdout
    setup_logging(args.quiet)
    g = _guarantee(args)
    target = None if args.export is None else Path(args.export)
    if target is not None and target.exists() and not args.overwrite:
        raise JeidnnError(f"{target} already exists; pass --overwrite or choose another --export")
    folder = Path(args.run_dir)
    if folder.is_dir() and not (folder / "predictions").is_dir():
        raise JeidnnError(
            f"{folder} has no predictions/ folder; re-run training for it (or `jeidnn evaluate`)"
        )
    run_ = Run.open(folder)
    methods = run_.methods
    names = None if args.method == ["all"] else args.method
    data = RiskData(methods)
    cert = certify(methods, g, names, pvalue=args.pvalue, across=args.across, data=data)  # may refuse: first
    points = method_points(methods, g, names, pvalue=args.pvalue, data=data)
    check = None
    if args.resplits:
        check = ResplitCheck(
            methods, g.risk, names, resplits=args.resplits, seed=run_.cfg.seed + 3, data=data
        )
        check = check.run(g, args.pvalue, args.across)
    _print_points(points, out)
    test = cert.test_outcome()
    print(
        f"certified: {cert.method} {cert.choice.param}: test cost {test['test_cost']:.3f}, test accuracy "
        f"{100 * test['test_accuracy']:.1f} %, {g.risk} on test {cert.test_risk:.4f} (calib B "
        f"{cert.certified_risk:.4f})\nproof: {cert.proof}",
        file=out,
    )
    if check is not None:
        _print_check(check, out)
    if target is not None:
        print(f"wrote {_export(run_, cert, target, args.overwrite)}", file=out)
    return 0
