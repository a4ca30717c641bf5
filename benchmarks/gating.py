"""Learned gates against the best tuned thresholds on several offline tasks, test-blind and with intervals.

Runs ``python train.py --config configs/<task>.yaml`` for each task (or reuses a finished run), then collects
each run's headline table (``report.json → summary.budgeted``: every method's operating point chosen on
calib half A per cost budget, measured on test, with a paired-bootstrap interval of its accuracy minus the
best baseline's) and writes

* ``benchmarks/results/gating.md``: budget × method per task, the goal checks, and diagnostics (oracle gap;
how
  well each gate's exit score ranks "correct at this exit" against the IM's max probability);
* ``benchmarks/results/gating.json``: ``{"<task>": <that run's summary.budgeted>, ...}``;
* ``benchmarks/results/gating.png``: accuracy vs budget per task.

Usage:
    python benchmarks/gating.py                        # every task in TASKS: trains what is missing
    python benchmarks/gating.py --tasks default --reuse
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from jeidnn.evaluate.predictions import RunPredictions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ["default", "banking77", "clinc150", "trec50"]
GOAL_BUDGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
COMMAND = "python benchmarks/gating.py"


def run_task(task: str, runs_dir: Path, reuse: bool) -> Path:
    """The finished run folder of ``task`` (trained now unless ``reuse`` finds one)."""
    run_dir = runs_dir / f"gating-{task}"
    if reuse and (run_dir / "report.json").is_file():
        return run_dir
    cmd = [sys.executable, "train.py", "--config", f"configs/{task}.yaml", "--name", f"gating-{task}"]
    cmd += ["--output_dir", str(runs_dir), "--overwrite", "true"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (ties count one half)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = torch.empty(len(score), dtype=torch.float64)
    order = score.double().argsort()
    sorted_scores = score.double()[order]
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    # average ranks of ties
    unique, inverse = torch.unique(sorted_scores, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    counts = torch.bincount(inverse, minlength=len(unique)).double()
    ranks[order] = (sums / counts)[inverse]
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def rows_by(report: dict) -> dict[str, dict[float, dict]]:
    out: dict[str, dict[float, dict]] = {}
    for row in report["summary"]["budgeted"]["rows"]:
        out.setdefault(row["method"], {})[round(row["budget"], 3)] = row
    return out


def best_learned(report: dict) -> str | None:
    """The learned method with the best mean *calib-A* accuracy over the goal budgets (a test-blind
    choice)."""
    by = rows_by(report)
    learned = [m for m, rows in by.items() if next(iter(rows.values()))["kind"] == "learned"]

    def calib_mean(method: str) -> float:
        values = [by[method].get(b, {}).get("calib_accuracy") for b in GOAL_BUDGETS]
        return sum(v if v is not None else -1.0 for v in values) / len(values)

    return max(learned, key=calib_mean) if learned else None


def diagnostics(report: dict, run_dir: Path) -> dict:
    """Ranking quality per gated exit on test: AUROC for "this exit's prediction is correct" of the warm-up
    IM's max probability, and of each learned method's exit score (its model chosen at budget 0.5)."""
    predictions = RunPredictions.read(report, run_dir)
    warm = predictions.warmup
    labels = warm["test_labels"]
    probs = warm["test_logits"].softmax(-1)
    w_correct = probs.argmax(-1) == labels[:, None]
    num_gates = probs.shape[1] - 1
    out = {"pmax": [auroc(probs[:, e].amax(-1), w_correct[:, e]) for e in range(num_gates)], "learned": {}}
    by = rows_by(report)
    for method, entry in (report.get("learned") or {}).items():
        param = (by.get(method, {}).get(0.5) or {}).get("param") or {}
        if "model" not in param:
            continue
        learned = predictions.learned[method][param["model"]]
        correct = learned["test_logits"].argmax(-1) == labels[:, None]
        out["learned"][method] = {
            "label": entry["label"],
            "param": param,
            "auroc": [auroc(learned["test_scores"][:, e], correct[:, e]) for e in range(num_gates)],
        }
    oracle = report["methods"]["oracle"]["points"][0]
    out["oracle"] = {"accuracy": oracle["accuracy"], "cost": oracle["cost"]}
    return out


def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}"


def task_section(task: str, report: dict, run_dir: Path) -> tuple[list[str], dict]:
    by = rows_by(report)
    budgets = report["summary"]["budgeted"]["budgets"]
    methods = list(by)
    ds, ex = report["dataset"], report["exits"]
    lines = [
        f"## {task}: {ds['name']}",
        "",
        f"{ds['num_classes']} classes; splits {ds['splits']}; per-exit test accuracy of the warm-up IMs "
        + " / ".join(pct(a) for a in ex["test_accuracy"])
        + " % at costs "
        + " / ".join(f"{c:.2f}" for c in ex["cost"])
        + ".",
        "",
        "Test accuracy (%) of each method's operating point chosen on calib half A; learned methods also "
        "show the difference to the best baseline at that budget (points) with its paired-bootstrap 95 % "
        "interval.",
        "",
    ]
    header = ["budget", *[next(iter(by[m].values()))["label"] for m in methods], "best baseline"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in budgets:
        cells, best = [], "–"
        for m in methods:
            row = by[m].get(round(b, 3), {})
            acc, d = row.get("accuracy"), row.get("delta_vs_best_baseline")
            best = row.get("best_baseline") or best
            if acc is not None and row.get("kind") == "learned" and d:
                cells.append(
                    f"{pct(acc)} ({100 * d['mean']:+.1f} "
                    f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}])"
                )
            else:
                cells.append(pct(acc))
        label = next(iter(by[best].values()))["label"] if best in by else best
        lines.append("| " + " | ".join([f"{b:g}", *cells, label]) + " |")

    chosen = best_learned(report)
    summary: dict = {"best_learned": chosen}
    if chosen:
        deltas, lows, ece_ok, misses = [], [], [], []
        for b in GOAL_BUDGETS:
            row = by[chosen].get(b)
            if not row or row.get("accuracy") is None:
                continue
            deltas.append(row["delta_vs_best_baseline"]["mean"])
            lows.append(row["delta_vs_best_baseline"]["ci_low"])
            baseline_ts = [
                r[b]["ece_temperature_scaled"]
                for m, r in by.items()
                if b in r and r[b]["kind"] not in ("learned", "oracle") and r[b].get("ece_temperature_scaled")
            ]
            own = min(x for x in (row["ece"], row["ece_temperature_scaled"]) if x is not None)
            ece_ok.append((b, own, min(baseline_ts) if baseline_ts else None))
            for alpha, miss in (row.get("resplit_miss") or {}).items():
                misses.append((b, alpha, miss["mean"]))
        summary.update(
            {
                "mean_gain": sum(deltas) / len(deltas) if deltas else None,
                "min_ci_low": min(lows) if lows else None,
                "ece": ece_ok,
                "worst_miss_gap": max((abs(m - float(a)) for _, a, m in misses), default=None),
            }
        )
        label = next(iter(by[chosen].values()))["label"]
        lines += [
            "",
            "**Best learned method** (highest mean calib-A accuracy over budgets 0.3–0.8, a test-blind "
            f"choice): {label}.",
            "",
            f"- Mean gain over the best baseline, budgets 0.3–0.8: {100 * summary['mean_gain']:+.2f} points; "
            f"lowest interval bound {100 * summary['min_ci_low']:+.2f} points (goal: ≥ −0.5)."
            if deltas
            else "- It meets none of the budgets 0.3–0.8 on calib.",
        ]
        if ece_ok:
            worse = [b for b, own, base in ece_ok if base is not None and own > base]
            lines.append(
                "- ECE (better of raw / temperature-scaled) vs the best temperature-scaled baseline: "
                + ", ".join(f"{b:g}: {pct(own)} vs {pct(base)}" for b, own, base in ece_ok)
                + (f" (above at {', '.join(f'{b:g}' for b in worse)})." if worse else " (never above).")
            )
        if summary["worst_miss_gap"] is not None:
            lines.append(
                f"- Conformal: largest |mean re-split miss − α| at these budgets: "
                f"{100 * summary['worst_miss_gap']:.2f} points (goal ≤ 1)."
            )
        diag = diagnostics(report, run_dir)
        summary["diagnostics"] = diag
        lines += [
            "",
            f"Oracle (first correct exit, an upper bound): {pct(diag['oracle']['accuracy'])} % at cost "
            f'{diag["oracle"]["cost"]:.2f}. How well each score ranks "this exit is correct" on test (AUROC '
            "per gated exit): the warm-up IM's max probability, and each learned method's exit score (its "
            "model chosen at budget 0.5, scored against its own IMs):",
            "",
            "| score | " + " | ".join(f"exit {i + 1}" for i in range(len(diag["pmax"]))) + " |",
            "|" + "---|" * (len(diag["pmax"]) + 1),
            "| max probability (warm-up IMs) | " + " | ".join(f"{a:.3f}" for a in diag["pmax"]) + " |",
        ]
        for entry in diag["learned"].values():
            lines.append(f"| {entry['label']} | " + " | ".join(f"{a:.3f}" for a in entry["auroc"]) + " |")
    return lines + [""], summary


def plot(reports: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.6), squeeze=False)
    for ax, (task, report) in zip(axes[0], reports.items()):
        by = rows_by(report)
        chosen = best_learned(report)
        show = [m for m in ("jeidnn_paper", chosen, "global_maxprob", "threshold_search") if m in by]
        for m in dict.fromkeys(show):
            pts = sorted((b, r) for b, r in by[m].items() if r.get("accuracy") is not None)
            xs = [b for b, _ in pts]
            ys = [100 * r["accuracy"] for _, r in pts]
            label = next(iter(by[m].values()))["label"]
            if pts and by[m][pts[0][0]]["kind"] == "learned":
                # The interval of Δ shifted onto the method's accuracy: accuracy - Δ + bound.
                deltas = [r["delta_vs_best_baseline"] for _, r in pts]
                lo, hi = (
                    [100 * (r["accuracy"] - d["mean"] + d[k]) for (_, r), d in zip(pts, deltas)]
                    for k in ("ci_low", "ci_high")
                )
                ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                            marker="o", capsize=3, label=label)  # fmt: skip
            else:
                ax.plot(xs, ys, marker="s", label=label)
        ax.set_title(task)
        ax.set_xlabel("cost budget (chosen on calib half A)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Bars: 95 % bootstrap interval of the difference to the best baseline, placed on the method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs/gating-<task> folders")
    args = parser.parse_args(argv)
    reports, runs = {}, {}
    for task in args.tasks:
        runs[task] = run_task(task, args.runs_dir, args.reuse)
        reports[task] = json.loads((runs[task] / "report.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [
        "# Learned gates vs. tuned thresholds, test-blind",
        "",
        f"Generated by `{COMMAND} --tasks {' '.join(args.tasks)}` at commit {commit.stdout.strip() or '?'}; "
        "do not edit by hand. Protocol: docs/evaluation.md; methods: docs/method.md.",
        "",
    ]
    summaries = {}
    for task, report in reports.items():
        section, summaries[task] = task_section(task, report, runs[task])
        lines += section
    lines += ["![accuracy vs budget](gating.png)", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gating.md").write_text("\n".join(lines))
    (RESULTS / "gating.json").write_text(
        json.dumps({task: r["summary"]["budgeted"] for task, r in reports.items()}, indent=1)
    )
    plot(reports, RESULTS / "gating.png")
    print(
        json.dumps(
            {t: {k: v for k, v in s.items() if k != "diagnostics"} for t, s in summaries.items()}, indent=1
        )
    )
    print(f"wrote {RESULTS / 'gating.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
