"""Training regimes (disjoint / joint / mixed) compared on one config; end-to-end stage 2 vs frozen backbone.

Runs ``python train.py --config <config> --regime <regime> --name regimes-<regime>`` for each regime (or
reuses a finished run; an unfinished one is resumed), then writes to ``--out``:

* ``regimes.md``: per-exit test accuracy and backbone updates of each regime, and per cost budget the best
  learned gate against the best baseline (thresholds, patience, static), each chosen on calib half A (the
  budgeted, test-blind protocol of docs/evaluation.md);
* ``regimes.json``: the same numbers.

``--end-to-end`` adds two runs of one learned variant at one λ (``--e2e-variant``, ``--e2e-lambda``):
``regimes-e2e`` with ``jeidnn.train_backbone: true`` and ``regimes-e2e-frozen`` without, compared at the same
budgets. Any other argument is passed on to every ``train.py`` (e.g. ``--data.max_train_samples 2000`` for a
subset).

Usage:
    python benchmarks/regimes.py                                   # configs/default.yaml, all three regimes
    python benchmarks/regimes.py --reuse                           # only collect (or finish) the runs
    python benchmarks/regimes.py --regimes --end-to-end --data.max_train_samples 2000 --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGIMES = ["disjoint", "joint", "mixed"]


def train(name: str, config: str, runs_dir: Path, reuse: bool, extra: list[str]) -> Path:
    """The finished run folder ``runs_dir/name``: reused (``reuse`` and finished), resumed (``reuse`` and
    unfinished) or trained from scratch."""
    run_dir = runs_dir / name
    if reuse and (run_dir / "report.json").is_file():
        return run_dir
    cmd = [sys.executable, "train.py", "--config", config, "--name", name, "--output_dir", str(runs_dir)]
    resume = reuse and (run_dir / "state.json").is_file()
    cmd += ["--resume", "true"] if resume else ["--overwrite", "true"]
    cmd += extra
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def best_rows(report: dict) -> list[dict]:
    """Per budget: the best learned gate and the best baseline, each the most accurate on calib half A among
    the configurations within the budget (test-blind), with their test accuracies."""
    out = []
    rows = [r for r in report["summary"]["budgeted"]["rows"] if r["accuracy"] is not None]
    for budget in report["summary"]["budgeted"]["budgets"]:
        here = [r for r in rows if r["budget"] == budget and r["kind"] != "oracle"]
        picks = {}
        for side, keep in (
            ("learned", lambda r: r["kind"] == "learned"),
            ("baseline", lambda r: r["kind"] != "learned"),
        ):
            candidates = [r for r in here if keep(r)]
            # max keeps the first of equal calib accuracies: the report's method order decides ties.
            picks[side] = max(candidates, key=lambda r: r["calib_accuracy"]) if candidates else None
        learned, baseline = picks["learned"], picks["baseline"]
        delta = None if learned is None or baseline is None else learned["accuracy"] - baseline["accuracy"]
        out.append(
            {
                "budget": budget,
                "learned": None
                if learned is None
                else {k: learned[k] for k in ("method", "accuracy", "cost")},
                "baseline": None
                if baseline is None
                else {k: baseline[k] for k in ("method", "accuracy", "cost")},
                "delta": delta,
            }
        )
    return out


def regime_section(name: str, report: dict) -> list[str]:
    lines = [
        f"### {name}",
        "",
        "| budget | best learned gate | test acc. (%) | best baseline | test acc. (%) | Δ (points) |",
        "|---|---|---|---|---|---|",
    ]
    for row in best_rows(report):
        learned, baseline = row["learned"] or {}, row["baseline"] or {}
        delta = "–" if row["delta"] is None else f"{100 * row['delta']:+.2f}"
        lines.append(
            f"| {row['budget']:g} | {learned.get('method', '–')} | {pct(learned.get('accuracy'))} "
            f"| {baseline.get('method', '–')} | {pct(baseline.get('accuracy'))} | {delta} |"
        )
    return lines + [""]


def exits_table(reports: dict[str, dict]) -> list[str]:
    width = max(len(r["exits"]["test_accuracy"]) for r in reports.values())
    header = ["run", "backbone updates", *[f"exit {i + 1}" for i in range(width)], "stage 0 + joint (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, report in reports.items():
        updates = report.get("regime", {}).get("backbone_updates", {})
        timings = report.get("timings_s", {})
        train_s = sum(v for k, v in timings.items() if k.startswith(("stage 0", "joint phase")))
        cells = [
            name,
            ", ".join(f"{k} {v}" for k, v in updates.items()),
            *[pct(a) for a in report["exits"]["test_accuracy"]],
            f"{train_s:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def end_to_end_section(frozen: dict, e2e: dict, variant: str) -> tuple[list[str], list[dict]]:
    """The variant's budgeted rows (and its `_tau` twin's) in both runs, and the best baseline of each."""
    methods = [m for m in (variant, f"{variant}_tau") if m in frozen["learned"]]
    lines = [
        "| budget | "
        + " | ".join(f"{m}: frozen | {m}: end to end | Δ" for m in methods)
        + " | best baseline: frozen run | end-to-end run |",
        "|---|" + "---|---|---|" * len(methods) + "---|---|",
    ]
    by = {
        run: {(r["budget"], r["method"]): r for r in report["summary"]["budgeted"]["rows"]}
        for run, report in (("frozen", frozen), ("e2e", e2e))
    }
    base = {
        run: {row["budget"]: row["baseline"] for row in best_rows(report)}
        for run, report in (("frozen", frozen), ("e2e", e2e))
    }
    records = []
    for budget in frozen["summary"]["budgeted"]["budgets"]:
        cells = [f"{budget:g}"]
        record: dict = {"budget": budget}
        for m in methods:
            a, b = by["frozen"][(budget, m)]["accuracy"], by["e2e"][(budget, m)]["accuracy"]
            delta = None if a is None or b is None else b - a
            cells += [pct(a), pct(b), "–" if delta is None else f"{100 * delta:+.2f}"]
            record[m] = {"frozen": a, "end_to_end": b, "delta": delta}
        for run in ("frozen", "e2e"):
            pick = base[run][budget]
            cells.append("–" if pick is None else f"{pick['method']} {pct(pick['accuracy'])}")
        record["best_baseline"] = {run: base[run][budget] for run in ("frozen", "e2e")}
        lines.append("| " + " | ".join(cells) + " |")
        records.append(record)
    return lines + [""], records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml", help="the config every run starts from")
    parser.add_argument("--regimes", nargs="*", default=REGIMES, choices=REGIMES, help="regimes to compare")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="parent of the run folders")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the results go"
    )
    parser.add_argument("--reuse", action="store_true", help="collect finished runs, resume unfinished ones")
    parser.add_argument(
        "--end-to-end", action="store_true", help="also: end-to-end stage 2 vs frozen backbone"
    )
    parser.add_argument(
        "--e2e-variant", default="jeidnn_paper", help="the config's learned variant to train end to end"
    )
    parser.add_argument("--e2e-lambda", type=float, default=0.01, help="its λ")
    args, extra = parser.parse_known_args(argv)

    reports: dict[str, dict] = {}
    for regime in args.regimes:
        run_dir = train(
            f"regimes-{regime}", args.config, args.runs_dir, args.reuse, ["--regime", regime, *extra]
        )
        reports[regime] = json.loads((run_dir / "report.json").read_text())
    e2e_runs: dict[str, dict] = {}
    if args.end_to_end:
        from jeidnn.config.parser import load_config

        cfg = load_config(ROOT / args.config, [a for a in extra if a not in ("--no-progress", "--quiet")])
        variant = next((v for v in cfg.jeidnn.variants if v.name == args.e2e_variant), None)
        if variant is None:
            parser.error(f"--e2e-variant {args.e2e_variant} is not a variant of {args.config}")
        one = [
            "--jeidnn.variants",
            json.dumps([dataclasses.asdict(variant)]),
            "--jeidnn.lambdas",
            f"[{args.e2e_lambda!r}]",
        ]
        for name, more in (("e2e-frozen", []), ("e2e", ["--jeidnn.train_backbone", "true"])):
            run_dir = train(f"regimes-{name}", args.config, args.runs_dir, args.reuse, [*extra, *one, *more])
            e2e_runs[name] = json.loads((run_dir / "report.json").read_text())

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    command = shlex.join(["python", "benchmarks/regimes.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Training regimes: disjoint, joint, mixed",
        "",
        f"Generated by `{command}` at commit {commit.stdout.strip() or '?'}; do not edit by hand. "
        "Regimes and end-to-end stage 2: docs/method.md; protocol: docs/evaluation.md.",
        "",
    ]
    results: dict = {"command": command, "regimes": {}}
    if reports:
        lines += [
            "## Per-exit test accuracy",
            "",
            *exits_table({f"regimes-{k}": v for k, v in reports.items()}),
        ]
        lines += [f"- {k}: {v['regime']['how_matched']}." for k, v in reports.items() if "regime" in v] + [""]
        lines += [
            "## Best learned gate vs best baseline per budget",
            "",
            "Each side is the configuration most accurate on calib half A within the budget (test-blind); "
            "the numbers are its test accuracy. Baselines: thresholds, patience, static.",
            "",
        ]
        for regime, report in reports.items():
            lines += regime_section(regime, report)
            results["regimes"][regime] = {
                "regime": report.get("regime"),
                "exit_test_accuracy": report["exits"]["test_accuracy"],
                "budgeted": best_rows(report),
            }
    if e2e_runs:
        frozen, e2e = e2e_runs["e2e-frozen"], e2e_runs["e2e"]
        table, records = end_to_end_section(frozen, e2e, args.e2e_variant)
        updates = e2e["regime"]["backbone_updates"]
        lines += [
            f"## End-to-end stage 2 vs frozen backbone ({args.e2e_variant}, λ = {args.e2e_lambda:g})",
            "",
            "`regimes-e2e` trains with `jeidnn.train_backbone: true`: its stage 2 adds "
            f"{updates.get('stage2', 0)} backbone updates (its IM-phase steps) to stage 0's; "
            "`regimes-e2e-frozen` is the same run with the backbone frozen in stage 2. Test accuracy (%) of "
            "each method's configuration chosen on calib half A.",
            "",
            *exits_table({"regimes-e2e-frozen": frozen, "regimes-e2e": e2e}),
            *table,
        ]
        results["end_to_end"] = {"variant": args.e2e_variant, "lambda": args.e2e_lambda, "budgeted": records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regimes.md").write_text("\n".join(lines))
    (args.out / "regimes.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'regimes.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
