"""Learned gates against the baselines on several offline tasks, test-blind and with intervals.

Runs ``python train.py --config configs/<task>.yaml`` for each task (or reuses a finished run), then collects
each run's headline (``report.json → summary.budgeted``: every method's operating point chosen on calib half
A per cost budget and measured on test; at each budget the best learned method and the reference baseline,
both picked by the val accuracy of their calib-A choices, with a paired-bootstrap interval of their test
accuracy difference; the test-best baseline beside them) and writes

* ``gating.md``: the headline per task (Δ against the reference baseline and against the test-best one, Δ
  against each baseline, where the history-aware baselines rank), the goal checks, every method's table,
  and diagnostics (oracle gap; how well each gate's exit score ranks "correct at this exit" against the IM's
  max probability);
* ``gating.json``: ``{"<task>": {"budgeted": <that run's summary.budgeted>, "headline": <the summary over
  budgets 0.3-0.8>}, ...}``;
* ``gating.png``: accuracy vs budget per task,

in ``benchmarks/results/`` (or ``--out``).

Usage:
    python benchmarks/gating.py                        # every task in TASKS: trains what is missing
    python benchmarks/gating.py --tasks default --reuse
    python benchmarks/gating.py --tasks default --runs default=runs/default --out /tmp/gating
    python benchmarks/gating.py --tasks default --resume-from default=runs/default   # + gate_data variants
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
from safetensors.torch import load_file  # noqa: E402

from jeidnn.evaluate.calibration import ece  # noqa: E402
from jeidnn.evaluate.predictions import RunPredictions  # noqa: E402
from jeidnn.train.crossfit import CROSSFIT_PREDICTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ["default", "banking77", "clinc150", "trec50"]
GOAL_BUDGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
COMMAND = "python benchmarks/gating.py"


GATE_DATA_GATES = {
    "confidence": {"inputs": "confidence", "arch": "linear"},
    "trajectory": {"inputs": "trajectory", "arch": "mlp"},
}
"""The gates of the gate-data comparison (`--resume-from`): the two extension gates of the default config."""


def gate_data_variants(gate_data: list[str]) -> list[dict]:
    """One variant per gate and `gate_data` value, the IMs frozen (stage 1's), so that only what the gates
    learn on differs: `train` (in-fold IM outputs), `val`, `crossfit` (out-of-fold outputs on train)."""
    return [
        {
            "name": f"gate_{gates}_{data}", **spec, "standardize": True, "objective": "expected",
            "exit_rule": "conditional", "operating_point": "calib_threshold", "im_loss": "frozen",
            "gate_data": data, "extension": True,
        }
        for gates, spec in GATE_DATA_GATES.items()
        for data in gate_data
    ]  # fmt: skip


def resume_with_variants(task: str, source: Path, runs_dir: Path, gate_data: list[str], reuse: bool) -> Path:
    """A copy of the finished run ``source`` in ``<runs_dir>/gating-<task>``, resumed with the gate-data
    variants added to its own: only stage 2 and the evaluation run again (the backbone, and its feature
    cache, are reused; see README, "Interrupted or failed runs"). ``source`` is never written."""
    import shutil

    import yaml

    run_dir = runs_dir / f"gating-{task}"
    if reuse and (run_dir / "report.json").is_file():
        return run_dir
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists; remove it or pass --reuse")
    shutil.copytree(source, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    variants = config["jeidnn"]["variants"]
    variants += [v for v in gate_data_variants(gate_data) if v["name"] not in {x["name"] for x in variants}]
    cmd = [sys.executable, "train.py", "--config", str(run_dir / "config.yaml"), "--name", f"gating-{task}"]
    cmd += ["--output_dir", str(runs_dir), "--resume", "true", "--jeidnn.variants", json.dumps(variants)]
    print("$", " ".join(cmd[:-1]), "<variants>", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


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


def headline_of(report: dict, run_dir: Path) -> dict[float, dict]:
    """``summary.budgeted.headline`` by budget; a report evaluated before it existed is refused."""
    lines = report["summary"]["budgeted"].get("headline")
    if lines is None:
        raise SystemExit(
            f"{run_dir}/report.json has no summary.budgeted.headline: run `jeidnn evaluate {run_dir}`"
        )
    return {round(line["budget"], 3): line for line in lines}


def learned_gaps(report: dict) -> dict[str, float | None]:
    """Each learned method's mean Δ (test accuracy) against the reference baseline over the goal budgets."""
    gaps = {}
    for method, rows in rows_by(report).items():
        deltas = [rows[b].get("delta_vs_reference") for b in GOAL_BUDGETS if b in rows]
        if rows and next(iter(rows.values()))["kind"] == "learned":
            means = [d["mean"] for d in deltas if d is not None]
            gaps[method] = sum(means) / len(means) if means else None
    return gaps


def _best_ece(row: dict) -> float | None:
    values = [x for x in (row.get("ece"), row.get("ece_temperature_scaled")) if x is not None]
    return min(values) if values else None


def _rank(rows: dict[str, dict], name: str, key: str) -> int | None:
    """1-based rank of ``name`` among the baselines of one budget by ``key`` (higher first)."""
    if name not in rows or rows[name].get(key) is None:
        return None
    return 1 + sum(r[key] > rows[name][key] for r in rows.values() if r.get(key) is not None)


def headline_summary(report: dict, run_dir: Path) -> dict:
    """Over the goal budgets: the headline Δ (best learned vs the reference baseline, both picked on val),
    the test-picked Δ beside it, the ECE of both, the conformal miss and where each baseline ranks."""
    by, head = rows_by(report), headline_of(report, run_dir)
    per_budget = []
    for b in GOAL_BUDGETS:
        line = head.get(b)
        if line is None or line["delta"] is None:
            continue
        here = {m: rows[b] for m, rows in by.items() if b in rows and rows[b]["accuracy"] is not None}
        baselines = {m: r for m, r in here.items() if r["kind"] != "learned"}
        best, ref = here[line["best_learned"]], here[line["reference_baseline"]]
        per_budget.append(
            {
                "budget": b,
                "picked_on": line["picked_on"],
                "best_learned": line["best_learned"],
                "reference_baseline": line["reference_baseline"],
                "delta": line["delta"],
                "test_best_baseline": line["test_best_baseline"],
                "delta_vs_test_best": line["delta_vs_test_best"],
                "vs_each_baseline": line["vs_each_baseline"],
                "ece": _best_ece(best),
                "reference_ece": _best_ece(ref),
                "miss": {a: m["mean"] for a, m in (best.get("resplit_miss") or {}).items()},
                "ranks": {
                    m: {"test": _rank(baselines, m, "accuracy"), "val": _rank(baselines, m, "val_accuracy")}
                    for m in baselines
                },
                "baselines": len(baselines),
            }
        )

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    names = list(dict.fromkeys(m for x in per_budget for m in x["vs_each_baseline"]))
    return {
        "budgets": per_budget,
        "mean_gain": mean([x["delta"]["mean"] for x in per_budget]),
        "min_ci_low": min((x["delta"]["ci_low"] for x in per_budget), default=None),
        "mean_gain_vs_test_best": mean([x["delta_vs_test_best"]["mean"] for x in per_budget]),
        "mean_gain_vs_each": {
            n: mean([x["vs_each_baseline"][n]["mean"] for x in per_budget if n in x["vs_each_baseline"]])
            for n in names
        },
        "ece_above_reference": [
            x["budget"]
            for x in per_budget
            if None not in (x["ece"], x["reference_ece"]) and x["ece"] > x["reference_ece"]
        ],
        "worst_miss_gap": max(
            (abs(m - float(a)) for x in per_budget for a, m in x["miss"].items()), default=None
        ),
        "reference_count": {
            n: sum(x["reference_baseline"] == n for x in per_budget)
            for n in dict.fromkeys(x["reference_baseline"] for x in per_budget)
        },
    }


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


def im_outputs_check(report: dict, run_dir: Path) -> dict | None:
    """What the gates learn on against what they meet, per exit (the final one last): accuracy, ECE and the
    max probability's AUROC for "correct here" of stage 1's IMs on train (in fold: `gate_data: train`), of
    the out-of-fold IMs on train (`crossfit`) and of stage 1's IMs on val (unseen, as at inference). None
    for a run without a crossfit variant."""
    path = run_dir / CROSSFIT_PREDICTIONS
    if not path.is_file():
        return None
    kept = load_file(str(path))
    warm = RunPredictions.read(report, run_dir).warmup
    out_of_fold = kept["train_out_of_fold_logits"]
    sources = {
        "train, in fold": (kept["train_logits"], kept["train_labels"]),
        "train, out of fold": (out_of_fold, kept["train_labels"]),
        "val": (warm["val_logits"], warm["val_labels"]),
    }
    check = {}
    for name, (logits, labels) in sources.items():
        probs = logits.float().softmax(-1)  # (N, exits, C)
        correct = probs.argmax(-1) == labels[:, None]
        check[name] = {
            "accuracy": correct.double().mean(0).tolist(),
            "ece": [ece(probs[:, e], labels) for e in range(probs.shape[1])],
            "auroc": [auroc(probs[:, e].amax(-1), correct[:, e]) for e in range(probs.shape[1])],
        }
    return check


def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}"


def interval(d: dict | None) -> str:
    """``+0.4 [-0.1, +0.9]``, points."""
    return "–" if not d else f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cells) + " |" for cells in body
    ]


def labels_of(report: dict) -> dict[str, str]:
    return {m: next(iter(rows.values()))["label"] for m, rows in rows_by(report).items()}


def task_section(task: str, report: dict, run_dir: Path) -> tuple[list[str], dict]:
    by, label = rows_by(report), labels_of(report)
    budgets = report["summary"]["budgeted"]["budgets"]
    head = headline_of(report, run_dir)
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
        "**Headline.** At each budget the reference baseline is the non-learned method whose calib-A "
        "choice is the most accurate on val, and the best learned method is picked the same way "
        '(docs/evaluation.md, "Compared with which baseline"). Δ = best learned − reference on test '
        "(points) with its paired-bootstrap 95 % interval; beside it the test-best baseline, which favours "
        "the baselines.",
        "",
    ]
    body = []
    for b in budgets:
        line = head.get(round(b, 3))
        if line is None:
            continue
        body.append(
            [
                f"{b:g}" + (" (calib A)" if line["picked_on"] != "val" else ""),
                label.get(line["best_learned"], "–")
                + (" (calib A)" if line.get("best_learned_picked_on") == "calib_a" else ""),
                label[line["reference_baseline"]],
                interval(line["delta"]),
                label[line["test_best_baseline"]],
                interval(line["delta_vs_test_best"]),
            ]
        )
    lines += table(
        [
            "budget",
            "best learned (val)",
            "reference baseline (val)",
            "Δ",
            "test-best baseline",
            "Δ vs test-best",
        ],
        body,
    )
    summary = headline_summary(report, run_dir)
    if summary["budgets"]:
        lows = summary["min_ci_low"]
        lines += [
            "",
            f"- Mean Δ over budgets {GOAL_BUDGETS[0]:g}–{GOAL_BUDGETS[-1]:g} against the reference "
            f"baseline: {100 * summary['mean_gain']:+.2f} points; lowest interval bound {100 * lows:+.2f} "
            "(goal: ≥ −0.5 at every budget). Against the test-best baseline: "
            f"{100 * summary['mean_gain_vs_test_best']:+.2f}.",
            "- Mean Δ of the best learned method against each baseline over those budgets: "
            + ", ".join(
                f"{label[n]} {100 * v:+.2f}" for n, v in summary["mean_gain_vs_each"].items() if v is not None
            )
            + ".",
            "- Mean Δ of each learned method against the reference baseline over those budgets: "
            + ", ".join(
                f"{label[m]} {100 * v:+.2f}" for m, v in learned_gaps(report).items() if v is not None
            )
            + ".",
            "- ECE (better of raw / temperature-scaled), best learned vs reference: "
            + ", ".join(
                f"{x['budget']:g}: {pct(x['ece'])} vs {pct(x['reference_ece'])}" for x in summary["budgets"]
            )
            + (
                f" (above at {', '.join(f'{b:g}' for b in summary['ece_above_reference'])})."
                if summary["ece_above_reference"]
                else " (never above)."
            ),
        ]
        if summary["worst_miss_gap"] is not None:
            lines.append(
                "- Conformal: largest |mean re-split miss − α| of the best learned choices at these budgets: "
                f"{100 * summary['worst_miss_gap']:.2f} points (goal ≤ 1)."
            )
        new = [n for n in ("product_maxprob", "patience_confidence") if n in by]
        if new:
            lines += [
                "",
                "Where the history-aware baselines rank among the baselines at each budget (1 = most "
                "accurate), on test / on val, and Δ of the best learned method against them:",
                "",
            ]
            rank_rows = []
            for x in summary["budgets"]:
                cells = [f"{x['budget']:g}"]
                for n in new:
                    r = x["ranks"].get(n) or {}
                    cells += [
                        f"{r.get('test', '–')} / {r.get('val', '–')} of {x['baselines']}",
                        interval(x["vs_each_baseline"].get(n)),
                    ]
                rank_rows.append(cells)
            lines += table(["budget", *(h for n in new for h in (f"{label[n]} rank", "Δ"))], rank_rows)
    lines += [
        "",
        "All methods: test accuracy (%) of each method's operating point chosen on calib half A; learned "
        "methods also show Δ against the reference baseline at that budget.",
        "",
    ]
    body = []
    for b in budgets:
        cells = []
        for m in methods:
            row = by[m].get(round(b, 3), {})
            acc, d = row.get("accuracy"), row.get("delta_vs_reference")
            cells.append(
                f"{pct(acc)} ({interval(d)})" if acc is not None and row["kind"] == "learned" else pct(acc)
            )
        line = head.get(round(b, 3))
        refs = [label[line[k]] if line else "–" for k in ("reference_baseline", "test_best_baseline")]
        body.append([f"{b:g}", *cells, *refs])
    lines += table(["budget", *(label[m] for m in methods), "reference (val)", "test-best"], body)

    diag = diagnostics(report, run_dir)
    summary["diagnostics"] = diag
    lines += [
        "",
        f"Oracle (first correct exit, an upper bound): {pct(diag['oracle']['accuracy'])} % at cost "
        f'{diag["oracle"]["cost"]:.2f}. How well each score ranks "this exit is correct" on test (AUROC '
        "per gated exit): the warm-up IM's max probability, and each learned method's exit score (its "
        "model chosen at budget 0.5, scored against its own IMs):",
        "",
    ]
    body = [["max probability (warm-up IMs)", *(f"{a:.3f}" for a in diag["pmax"])]]
    body += [[e["label"], *(f"{a:.3f}" for a in e["auroc"])] for e in diag["learned"].values()]
    lines += table(["score", *(f"exit {i + 1}" for i in range(len(diag["pmax"])))], body)
    check = im_outputs_check(report, run_dir)
    if check is not None:
        summary["im_outputs"] = check
        num_exits = len(check["val"]["accuracy"])
        lines += [
            "",
            "The IM outputs the gates learn on against those they meet at inference (val): stage 1's IMs on "
            "train, which they were fitted on (`gate_data: train`), and the out-of-fold IMs on train "
            "(`crossfit`; the final exit, stage 0's head fitted on train with the backbone, has no "
            "out-of-fold version):",
            "",
        ]
        body = []
        for metric, title in (("accuracy", "accuracy %"), ("ece", "ECE %"), ("auroc", "max-prob AUROC")):
            for name, values in check.items():
                cells = [pct(a) if metric != "auroc" else f"{a:.3f}" for a in values[metric]]
                cells += ["–"] * (num_exits - len(cells))  # out of fold: the IMs only
                body.append([f"{title}, {name}", *cells])
        header = ["", *(f"exit {i + 1}" for i in range(num_exits - 1)), "final exit"]
        lines += table(header, body)
    return lines + [""], summary


def plot(reports: dict[str, dict], runs: dict[str, Path], path: Path) -> None:
    """Per task: the best learned method (picked on val) with the interval of its Δ placed on it, the
    reference baseline (picked on val), the test-best baseline and the two history-aware baselines."""
    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.6), squeeze=False)
    for ax, (task, report) in zip(axes[0], reports.items()):
        by, head = rows_by(report), headline_of(report, runs[task])
        lines = [line for b, line in sorted(head.items()) if line["delta"] is not None]
        xs = [line["budget"] for line in lines]

        def acc(line: dict, key: str, by: dict = by) -> float:
            return 100 * by[line[key]][round(line["budget"], 3)]["accuracy"]

        ys = [acc(line, "best_learned") for line in lines]
        lo = [100 * (line["delta"]["mean"] - line["delta"]["ci_low"]) for line in lines]
        hi = [100 * (line["delta"]["ci_high"] - line["delta"]["mean"]) for line in lines]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color="C3", lw=2.5,
                    label="best learned (val-picked), Δ interval")  # fmt: skip
        ax.plot(xs, [acc(line, "reference_baseline") for line in lines], marker="s", color="C0",
                label="reference baseline (val-picked)")  # fmt: skip
        ax.plot(xs, [acc(line, "test_best_baseline") for line in lines], ls="--", color="0.4",
                label="test-best baseline (favours baselines)")  # fmt: skip
        for m, colour in (("product_maxprob", "C2"), ("patience_confidence", "C4")):
            pts = sorted(
                (b, r["accuracy"]) for b, r in by.get(m, {}).items() if r.get("accuracy") is not None
            )
            if pts:
                ax.plot([b for b, _ in pts], [100 * a for _, a in pts], lw=1, alpha=0.7, color=colour,
                        label=next(iter(by[m].values()))["label"])  # fmt: skip
        ax.set_title(task)
        ax.set_xlabel("cost budget (chosen on calib half A)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Bars: 95 % bootstrap interval of Δ against the reference baseline, placed on the method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_runs(pairs: list[str]) -> dict[str, Path]:
    """``task=folder`` pairs of ``--runs``."""
    out = {}
    for pair in pairs:
        task, sep, folder = pair.partition("=")
        if not sep or not task or not folder:
            raise SystemExit(f"--runs takes task=folder pairs, got {pair!r}")
        out[task] = Path(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs/gating-<task> folders")
    parser.add_argument(
        "--runs", nargs="+", default=[], metavar="TASK=FOLDER",
        help="finished, evaluated run folders to read instead of <runs-dir>/gating-<task> (nothing trains)",
    )  # fmt: skip
    parser.add_argument(
        "--resume-from", nargs="+", default=[], metavar="TASK=FOLDER",
        help="finished run folders to copy to <runs-dir>/gating-<task> and resume with the --gate-data "
        "variants (stage 2 and the evaluation only)",
    )  # fmt: skip
    parser.add_argument(
        "--gate-data", nargs="+", default=["train", "val", "crossfit"], choices=["train", "val", "crossfit"],
        help="with --resume-from: the gate_data values compared (frozen IMs; confidence, trajectory gates)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="where gating.md / .json / .png go")
    args = parser.parse_args(argv)
    given = parse_runs(args.runs)
    for task, source in parse_runs(args.resume_from).items():
        given[task] = resume_with_variants(task, source, args.runs_dir, args.gate_data, args.reuse)
    reports, runs = {}, {}
    for task in args.tasks:
        if task in given:
            runs[task] = given[task]
            if not (runs[task] / "report.json").is_file():
                raise SystemExit(f"--runs {task}={runs[task]}: no report.json there")
        else:
            runs[task] = run_task(task, args.runs_dir, args.reuse)
        reports[task] = json.loads((runs[task] / "report.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    summaries, sections = {}, []
    for task, report in reports.items():
        section, summaries[task] = task_section(task, report, runs[task])
        sections += section
    overview = []
    for task, s in summaries.items():
        met = s["min_ci_low"] is not None and s["min_ci_low"] >= -0.005 and not s["ece_above_reference"]
        overview.append(
            [
                task,
                "–" if s["mean_gain"] is None else f"{100 * s['mean_gain']:+.2f}",
                "–" if s["min_ci_low"] is None else f"{100 * s['min_ci_low']:+.2f}",
                "–" if s["mean_gain_vs_test_best"] is None else f"{100 * s['mean_gain_vs_test_best']:+.2f}",
                ", ".join(f"{labels_of(reports[task])[n]} ×{c}" for n, c in s["reference_count"].items()),
                "yes" if met else "no",
            ]
        )
    lines = [
        "# Learned gates vs. tuned thresholds, test-blind",
        "",
        f"Generated by `{' '.join([COMMAND, *sys.argv[1:]])}` at commit {commit.stdout.strip() or '?'}; "
        "do not edit by hand. Protocol: docs/evaluation.md; methods: docs/method.md.",
        "",
        f"Over budgets {GOAL_BUDGETS[0]:g}–{GOAL_BUDGETS[-1]:g}: the mean Δ of the best learned method "
        "against the reference baseline (both picked on val), its lowest interval bound, the mean Δ against "
        "the test-best baseline (favours the baselines), which baselines were the reference, and whether "
        "the goal holds (every interval low ≥ −0.5 point and ECE never above the reference's).",
        "",
        *table(
            ["task", "mean Δ", "lowest bound", "mean Δ vs test-best", "reference baselines", "goal"], overview
        ),
        "",
        *sections,
        "![accuracy vs budget](gating.png)",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gating.md").write_text("\n".join(lines))
    (args.out / "gating.json").write_text(
        json.dumps(
            {
                task: {
                    "budgeted": r["summary"]["budgeted"],
                    "headline": {k: v for k, v in summaries[task].items() if k != "diagnostics"},
                }
                for task, r in reports.items()
            },
            indent=1,
        )
    )
    plot(reports, runs, args.out / "gating.png")
    print(
        json.dumps(
            {
                t: {k: v for k, v in s.items() if k not in ("diagnostics", "budgets")}
                for t, s in summaries.items()
            },
            indent=1,
        )
    )
    print(f"wrote {args.out / 'gating.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
