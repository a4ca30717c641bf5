"""The PNG plots of an evaluated run's report (``plots/``), drawn from the report dict.

:func:`write_plots` draws them all; :mod:`jeidnn.evaluate.report` writes report.md around them. Colours
and markers come from the method registry (:func:`jeidnn.evaluate.methods.plot_style`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jeidnn.evaluate.methods import plot_style  # noqa: E402
from jeidnn.evaluate.metrics import upper_envelope  # noqa: E402

__all__ = ["PLOT_DIR", "budget_rows", "label_of", "write_plots"]

PLOT_DIR = "plots"


def label_of(method: dict) -> str:
    extension = method.get("extension") and "(extension)" not in method["label"]
    return method["label"] + (" (extension)" if extension else "")


def _style(report: dict, name: str) -> dict:
    return plot_style(name, [n for n, m in report["methods"].items() if m["kind"] == "learned"])


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_rows(report: dict) -> tuple[list[float], list[str], dict[tuple[float, str], dict]]:
    b = report["summary"]["budgeted"]
    names = list(dict.fromkeys(r["method"] for r in b["rows"]))
    return b["budgets"], names, {(r["budget"], r["method"]): r for r in b["rows"]}


def _plot_budgeted(report: dict, path: Path) -> None:
    budgets, names, rows = budget_rows(report)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for n in names:
        pts = [(bud, r) for bud in budgets if (r := rows.get((bud, n))) and r["accuracy"] is not None]
        if not pts:
            continue
        xs, ys = [bud for bud, _ in pts], [100 * r["accuracy"] for _, r in pts]
        st = _style(report, n)
        method = report["methods"][n]
        deltas = [r.get("delta_vs_reference", r["delta_vs_best_baseline"]) for _, r in pts]
        if method["kind"] == "learned" and all(deltas):
            err = [
                [100 * (d["mean"] - d["ci_low"]) for d in deltas],
                [100 * (d["ci_high"] - d["mean"]) for d in deltas],
            ]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=label_of(method), **st)
        else:
            ax.plot(xs, ys, label=label_of(method), **st)
    ax.set_xlabel("cost budget (calib A), 1.0 = original model")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Budgeted, test-blind: accuracy of each method's calib-chosen configuration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _plot_exits(report: dict, path: Path, layers: list[int]) -> float | None:
    budgets, names, rows = budget_rows(report)
    usable = [b for b in budgets if any((rows.get((b, n)) or {}).get("accuracy") is not None for n in names)]
    if not usable:
        return None
    budget = min(usable, key=lambda b: abs(b - 0.5))
    chosen = [(n, r) for n in names if (r := rows.get((budget, n))) and r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(layers) * len(chosen) / 3), 4.8))
    width = 0.8 / len(chosen)
    x = np.arange(len(layers))
    for i, (n, r) in enumerate(chosen):
        ax.bar(
            x + (i - (len(chosen) - 1) / 2) * width,
            100 * np.asarray(r["exit_fractions"]),
            width,
            color=_style(report, n)["color"],
            label=f"{label_of(report['methods'][n])} (cost {r['cost']:.2f})",
        )
    ax.set_xticks(x, [str(la) for la in layers])
    ax.set_xlabel("exit (backbone layer)")
    ax.set_ylabel("test samples exiting (%)")
    ax.set_title(f"Exit distribution of each method's configuration at budget {budget:g}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return budget


def _envelope(points: list[dict]) -> list[dict]:
    idx = upper_envelope([p["cost"] for p in points], [p["accuracy"] for p in points])
    return [points[i] for i in idx]


def _curves(report: dict) -> list[tuple[str, dict]]:
    return [(n, m) for n, m in report["methods"].items() if m["points"] and m["kind"] != "oracle"]


def _plot_accuracy(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo, hi = report["summary"]["cost_range"]
    if lo is not None and hi is not None and hi > lo:
        ax.axvspan(lo, hi, color="0.9", zorder=0, label="AUC cost range")
    for name, method in _curves(report):
        pts, st = method["points"], _style(report, name)
        ax.scatter(
            [p["cost"] for p in pts], [100 * p["accuracy"] for p in pts], color=st["color"], s=10, alpha=0.3
        )
        env = _envelope(pts)
        ax.plot([p["cost"] for p in env], [100 * p["accuracy"] for p in env], label=label_of(method), **st)
    oracle = report["methods"].get("oracle", {}).get("points")
    if oracle:
        o = oracle[0]
        ax.axhline(
            100 * o["accuracy"],
            color="black",
            ls="--",
            lw=1.2,
            label=f"oracle, upper bound (cost {o['cost']:.2f})",
        )
    ax.set_xlabel("normalised cost (1.0 = original model)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Envelope on test (optimistic): lines = upper envelopes, dots = all points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _plot_ece(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, title in zip(
        axes, ("ece", "ece_temperature_scaled"), ("raw", "temperature-scaled"), strict=True
    ):
        for name, method in _curves(report):
            env = [p for p in _envelope(method["points"]) if p[key] is not None]
            if env:
                ax.plot(
                    [p["cost"] for p in env],
                    [100 * p[key] for p in env],
                    label=label_of(method),
                    **_style(report, name),
                )
        ax.set_title(f"ECE on the accuracy envelope, {title}")
        ax.set_xlabel("normalised cost")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"ECE (%, {report['evaluation'].get('ece_bins', 15)} bins)")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def _plot_conformal(report: dict, path: Path, alphas: list[str]) -> None:
    fig, axes = plt.subplots(2, len(alphas), figsize=(6 * len(alphas), 8), squeeze=False)
    for col, a in enumerate(alphas):
        for name, method in _curves(report):
            env = [p for p in _envelope(method["points"]) if a in p["conformal"]]
            xs, st = [p["cost"] for p in env], _style(report, name)
            axes[0, col].plot(
                xs, [100 * p["conformal"][a]["coverage"] for p in env], label=label_of(method), **st
            )
            axes[1, col].plot(xs, [p["conformal"][a]["mean_set_size"] for p in env], **st)
        axes[0, col].axhline(
            100 * (1 - float(a)), color="black", ls="--", lw=1, label=f"1 − α = {1 - float(a):g}"
        )
        axes[0, col].set_title(f"coverage, α = {a}")
        axes[1, col].set_title(f"mean set size, α = {a}")
        axes[0, col].set_ylabel("test coverage (%)")
        axes[1, col].set_ylabel("labels per set")
        for row in range(2):
            axes[row, col].set_xlabel("normalised cost")
            axes[row, col].grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    _save(fig, path)


def _plot_reliability(panels: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="perfect calibration")
        for i, (label, diag) in enumerate(panel["curves"]):
            keep = diag.bin_counts > 0
            ax.plot(
                diag.bin_confidence[keep],
                diag.bin_accuracy[keep],
                marker="o",
                color=f"C{3 if i == 0 else i - 1}",
                label=f"{label}: ECE {100 * diag.ece:.1f}%",
            )
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean of bin)", ylabel="accuracy in bin")
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    _save(fig, path)


_RULE_STYLE = {
    "naive": ("naive (no bound)", "#d62728", "v", ":"),
    "calm": ("CALM (Hoeffding)", "#7f7f7f", "s", "--"),
    "ours": ("ours (certified)", "#1f77b4", "o", "-"),
    "peeking": ("test-peeking bound", "#2ca02c", "^", "-."),
    "peeking_clipped": ("test-peeking bound, clipped loss", "#98df8a", "^", ":"),
}


def _plot_guarantees(entries: list[dict], path: Path) -> None:
    """Per guarantee: the mean held-out cost each rule plays against eps, its violation rate beside."""
    fig, axes = plt.subplots(1, len(entries), figsize=(6.5 * len(entries), 4.8), squeeze=False)
    for ax, entry in zip(axes[0], entries, strict=True):
        g, curve = entry["guarantee"], entry["curve"]
        eps = [c["epsilon"] for c in curve]
        for rule, (label, colour, marker, ls) in _RULE_STYLE.items():
            if rule not in curve[0]:
                continue
            costs = [c[rule]["mean_cost"] for c in curve]
            ax.plot(eps, costs, color=colour, marker=marker, ls=ls, label=label)
            if rule in ("naive", "ours"):
                for x, y, c in zip(eps, costs, curve, strict=True):
                    ax.annotate(
                        f"{100 * c[rule]['violation']:.0f}%", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=colour,
                    )  # fmt: skip
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        where = f"δ = {g['delta']:g}" if g["kind"] == "high_probability" else "in expectation"
        ax.set_title(f"{g['risk']}, {where}: cost (label: violation rate)", fontsize=9)
        ax.set_xlabel("ε (largest risk allowed)")
        ax.set_ylabel("mean held-out cost over the re-splits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def write_plots(
    run_dir: Path, report: dict, reliability: list[dict] | None
) -> tuple[dict[str, str], float | None]:
    """Draw the PNG plots into ``run_dir/plots/``.

    Args:
        report: as :func:`jeidnn.evaluate.report.write_report` takes it (with ``evaluation.alphas_keys``).
        reliability: reliability-diagram panels; None or empty skips that plot.

    Returns:
        The plots report.md lists (title -> path relative to ``run_dir``) and the budget of the exit
        distribution plot (None: not drawn).
    """
    run_dir = Path(run_dir)
    (run_dir / PLOT_DIR).mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}

    def target(stem: str, title: str | None = None) -> Path:
        if title:
            plots[title] = f"{PLOT_DIR}/{stem}.png"
        return run_dir / PLOT_DIR / f"{stem}.png"

    _plot_budgeted(report, target("budgeted_accuracy"))
    layers = report["exits"].get("layers") or list(range(1, len(report["exits"]["cost"]) + 1))
    exit_budget = _plot_exits(report, target("exit_fractions"), layers)
    _plot_accuracy(report, target("accuracy_vs_cost", "Accuracy vs. cost"))
    _plot_ece(report, target("ece_vs_cost", "ECE vs. cost"))
    present = report["evaluation"]["alphas_keys"]
    alphas = [a for a in ("0.05", "0.1") if a in present] or present[:2]
    if alphas:
        _plot_conformal(
            report, target("conformal_vs_cost", "Conformal coverage and set size vs. cost"), alphas
        )
    guarantees = report["summary"].get("guarantees") or []
    if guarantees:
        _plot_guarantees(guarantees, target("guarantees"))
        plots["guarantees"] = f"{PLOT_DIR}/guarantees.png"  # report.md places it in its own section
    if reliability:
        _plot_reliability(reliability, target("reliability", "Reliability diagrams (budgeted choices)"))
    return plots, exit_budget
