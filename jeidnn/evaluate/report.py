"""Human-readable report of an evaluated run: ``report.md`` and PNG plots in ``plots/``.

Everything is drawn from the report dict :func:`jeidnn.evaluate.evaluation.evaluate` returns, except the
reliability diagrams, which need per-bin statistics that report.json does not keep and are passed
in separately. The budgeted, test-blind table comes first; the envelope views follow under
"Envelope on test (optimistic)" (docs/evaluation.md explains both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jeidnn.evaluate.metrics import upper_envelope  # noqa: E402

__all__ = ["write_report"]

_PLOT_DIR = "plots"
_BASELINE_STYLE = {  # name -> (colour, marker)
    "threshold_maxprob": ("#1f77b4", "s"),
    "threshold_entropy": ("#2ca02c", "^"),
    "threshold_margin": ("#9467bd", "v"),
    "global_maxprob": ("#8c564b", "D"),
    "threshold_search": ("#17becf", "<"),
    "patience": ("#e377c2", "P"),
    "static": ("#7f7f7f", "X"),
    "oracle": ("#000000", "*"),
    "jeidnn_ims_threshold_maxprob": ("#bcbd22", "h"),
}
_LEARNED_COLOURS = ["#d62728", "#ff7f0e", "#8b0000", "#ff1493", "#b8860b", "#4b0082"]


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return _fmt(value, pct=True)


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}".replace("-", "−")


def _label(method: dict) -> str:
    extension = method.get("extension") and "(extension)" not in method["label"]
    return method["label"] + (" (extension)" if extension else "")


def _style(report: dict, name: str) -> dict:
    learned = [n for n, m in report["methods"].items() if m["kind"] == "learned"]
    if name in learned:
        colour, marker = _LEARNED_COLOURS[learned.index(name) % len(_LEARNED_COLOURS)], "o"
    else:
        colour, marker = _BASELINE_STYLE.get(name, ("#17becf", "o"))
    # Learned methods drawn thicker and on top: they are what the plots compare against.
    top = name in learned
    return {"color": colour, "marker": marker, "lw": 2.5 if top else 1.5, "ms": 5, "zorder": 5 if top else 2}


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


# --------------------------------------------------------------------------- budgeted (headline)


def _budget_rows(report: dict) -> tuple[list[float], list[str], dict[tuple[float, str], dict]]:
    b = report["summary"]["budgeted"]
    names = list(dict.fromkeys(r["method"] for r in b["rows"]))
    return b["budgets"], names, {(r["budget"], r["method"]): r for r in b["rows"]}


def _budget_cell(row: dict | None) -> str:
    if row is None or row["accuracy"] is None:
        return "–"
    cell = _pct(row["accuracy"])
    delta = row.get("delta_vs_best_baseline")
    if row["kind"] == "learned" and delta:
        cell += f" ({_signed(delta['mean'])} [{_signed(delta['ci_low'])}, {_signed(delta['ci_high'])}])"
    return cell


def _budgeted_section(report: dict, plot: str) -> list[str]:
    b = report["summary"]["budgeted"]
    budgets, names, rows = _budget_rows(report)
    methods = report["methods"]
    split = b["calib_split"]
    out = [
        "## Budgeted comparison (test-blind)",
        "",
        f"For each cost budget, every method plays the configuration with the best accuracy on calib half A "
        f"({split['a']} samples) among those whose calib-A cost is within the budget; temperatures and "
        f"conformal quantiles are fitted on calib half B ({split['b']} samples; split seed {split['seed']}). "
        "Cells: test accuracy (%); for learned methods also the difference to the best baseline at that "
        f"budget in points with its paired-bootstrap 95 % interval ({b['bootstrap']} resamples). The best "
        "baseline is the non-learned method with the highest test accuracy at that budget, a conservative "
        "reference. – = the method cannot meet the budget on calib A.",
        "",
    ]
    header = ["budget"] + [_label(methods[n]) for n in names] + ["best baseline"]
    table = []
    for budget in budgets:
        best = next(
            (r["best_baseline"] for n in names if (r := rows.get((budget, n))) and r["best_baseline"]), None
        )
        table.append(
            [f"{budget:g}"]
            + [_budget_cell(rows.get((budget, n))) for n in names]
            + [_label(methods[best]) if best else "–"]
        )
    out += _table(header, table)
    alphas = [a for a in ("0.05", "0.1") if a in report["evaluation"]["alphas_keys"]]
    out += [
        "",
        "### Details of the budgeted choices",
        "",
        "Cost on test; ECE (%) raw / temperature-scaled; conformal coverage (%) and mean set size on test; "
        f"mean miss rate (%) over {b['resplits']} random re-splits of calib B ∪ test (should be ≤ α; (!) "
        "marks a mean above α + 0.5 points); merged = groups of exits that share one conformal quantile.",
        "",
    ]
    header = ["budget", "method", "cost", "ECE raw / TS"]
    for a in alphas:
        header += [f"cov. α={a}", f"set α={a}", f"re-split miss α={a}"]
    header.append("merged")
    detail = []
    for budget in budgets:
        for n in names:
            r = rows.get((budget, n))
            if r is None or r["accuracy"] is None:
                continue
            line = [
                f"{budget:g}",
                _label(methods[n]),
                _fmt(r["cost"]),
                f"{_pct(r['ece'])} / {_pct(r['ece_temperature_scaled'])}",
            ]
            for a in alphas:
                miss = (r["resplit_miss"] or {}).get(a) or {}
                line += [
                    _pct(r["coverage"].get(a)),
                    _fmt(r["set_size"].get(a), digits=2),
                    _pct(miss.get("mean")) + (" (!)" if (miss.get("mean") or 0) > float(a) + 0.005 else ""),
                ]
            line.append(" ".join(str(g) for g in r["merged_groups"]) or "–")
            detail.append(line)
    out += _table(header, detail)
    missing = [r for r in b["rows"] if r["accuracy"] is None]
    if missing:
        out += [
            "",
            "Budgets not met on calib A: "
            + "; ".join(f"{_label(methods[r['method']])} at {r['budget']:g} ({r['reason']})" for r in missing)
            + ".",
        ]
    out += [
        "",
        f"![Accuracy vs. budget]({plot})",
        "",
        "Accuracy vs. budget: test accuracy of each method's calib-chosen configuration; the bars on learned "
        "methods are the 95 % bootstrap interval of the difference to the best baseline, shifted onto the "
        "method's accuracy.",
    ]
    return out


def _plot_budgeted(report: dict, path: Path) -> None:
    budgets, names, rows = _budget_rows(report)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for n in names:
        pts = [(bud, r) for bud in budgets if (r := rows.get((bud, n))) and r["accuracy"] is not None]
        if not pts:
            continue
        xs, ys = [bud for bud, _ in pts], [100 * r["accuracy"] for _, r in pts]
        st = _style(report, n)
        method = report["methods"][n]
        deltas = [r["delta_vs_best_baseline"] for _, r in pts]
        if method["kind"] == "learned" and all(deltas):
            err = [
                [100 * (d["mean"] - d["ci_low"]) for d in deltas],
                [100 * (d["ci_high"] - d["mean"]) for d in deltas],
            ]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=_label(method), **st)
        else:
            ax.plot(xs, ys, label=_label(method), **st)
    ax.set_xlabel("cost budget (calib A), 1.0 = original model")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Budgeted, test-blind: accuracy of each method's calib-chosen configuration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _plot_exits(report: dict, path: Path, layers: list[int]) -> float | None:
    budgets, names, rows = _budget_rows(report)
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
            label=f"{_label(report['methods'][n])} (cost {r['cost']:.2f})",
        )
    ax.set_xticks(x, [str(la) for la in layers])
    ax.set_xlabel("exit (backbone layer)")
    ax.set_ylabel("test samples exiting (%)")
    ax.set_title(f"Exit distribution of each method's configuration at budget {budget:g}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return budget


# --------------------------------------------------------------------------- envelope (optimistic)


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
        ax.plot([p["cost"] for p in env], [100 * p["accuracy"] for p in env], label=_label(method), **st)
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
                    label=_label(method),
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
                xs, [100 * p["conformal"][a]["coverage"] for p in env], label=_label(method), **st
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


def _matched_table(report: dict) -> list[str]:
    matched, methods = report["summary"]["matched_cost"], report["methods"]
    key = next(k for k in matched[0] if k.startswith("set_size_"))
    baselines = list(matched[0]["baselines"])
    out = [
        "Each baseline's upper envelope linearly interpolated at the cost of each learned point (tau "
        "0.5): acc. and ECE in %; a baseline's ECE is the better of raw and temperature-scaled; set = mean "
        f"conformal {key.replace('set_size_', 'set size at α = ')}; – = outside that baseline's cost range.",
        "",
    ]
    header = ["method", "λ", "cost", "acc.", "ECE raw / TS", "set"]
    for n in baselines:
        header += [f"{n} acc.", "ECE", "set"]
    rows = []
    for r in matched:
        lam = r["param"].get("lambda") if isinstance(r["param"], dict) else r["param"]
        row = [
            _label(methods[r["method"]]),
            "–" if lam is None else f"{lam:g}",
            _fmt(r["cost"]),
            _pct(r["accuracy"]),
            f"{_pct(r['ece'])} / {_pct(r['ece_temperature_scaled'])}",
            _fmt(r[key], digits=2),
        ]
        for n in baselines:
            b = r["baselines"][n]
            row += [_pct(b["accuracy"]), _pct(b["ece_best"]), _fmt(b.get(key), digits=2)]
        rows.append(row)
    return out + _table(header, rows)


def _envelope_section(report: dict, plots: dict[str, str]) -> list[str]:
    s, methods = report["summary"], report["methods"]
    lo, hi = s["cost_range"]
    out = ["## Envelope on test (optimistic)", "", s["envelope_note"], ""]
    if s["matched_cost"]:
        out += ["### Matched cost", ""] + _matched_table(report) + [""]
    out += [
        "### AUC",
        "",
        f"Mean test accuracy of each upper envelope over costs [{_fmt(lo)}, {_fmt(hi)}], the range all "
        "methods cover (the oracle is an upper bound and not compared; – = the ranges do not overlap).",
        "",
    ]
    auc = sorted(s["auc"].items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1))
    out += _table(
        ["method", "kind", "AUC (mean acc. %)"],
        [[_label(methods[n]), methods[n]["kind"], _pct(v)] for n, v in auc],
    )
    out += [
        "",
        "### Conformal sets over all envelope points",
        "",
        "Quantiles on calib B at the exit each sample takes, per group of exits; test coverage should be "
        "≥ 1 − α. Worst and mean coverage over each method's points, and mean set size.",
        "",
    ]
    rows = []
    for method in methods.values():
        for a in report["evaluation"]["alphas_keys"]:
            res = [p["conformal"][a] for p in method["points"]]
            cov = [r["coverage"] for r in res if r["coverage"] is not None]
            size = [r["mean_set_size"] for r in res if r["mean_set_size"] is not None]
            rows.append(
                [
                    _label(method),
                    a,
                    _pct(min(cov) if cov else None),
                    _pct(float(np.mean(cov)) if cov else None),
                    _fmt(float(np.mean(size)) if size else None, digits=2),
                ]
            )
    out += _table(["method", "α", "min coverage (%)", "mean coverage (%)", "mean set size"], rows)
    out += ["", "### Plots", ""]
    for title, rel in plots.items():
        out += [f"#### {title}", "", f"![{title}]({rel})", ""]
    return out


def _setup(report: dict, exit_budget: float | None) -> list[str]:
    ex, bb, ds = report["exits"], report.get("backbone", {}), report.get("dataset", {})
    final = (ex.get("test_accuracy") or [None])[-1]
    out = [
        "## Setup",
        "",
        f"- Backbone {bb.get('name', '?')}: {bb.get('num_layers', '?')} layers, "
        f"{_fmt(bb.get('gflops_full'))} GFLOPs per sample; {ds.get('num_classes', '?')} classes; "
        f"splits {ds.get('splits', {})}.",
        f"- Final classifier test accuracy: {_pct(final)} % (the original model).",
    ]
    regime = report.get("regime")
    if regime:  # runs before the regimes have none
        updates = ", ".join(f"{k} {v}" for k, v in regime["backbone_updates"].items())
        out.append(f"- Training regime: {regime['name']} (backbone updates: {updates}; docs/method.md).")
    oracle = report["methods"].get("oracle", {}).get("points")
    if oracle:
        o = oracle[0]
        acc, cost = _pct(o["accuracy"]), _fmt(o["cost"])
        out.append(f"- Oracle (first correct exit, an upper bound): {acc} % at cost {cost}.")
    n = len(ex["cost"])
    gflops, acc = ex.get("gflops") or [None] * n, ex.get("test_accuracy") or [None] * n
    gated = ex.get("cost_with_gates") or [None] * n
    rows = [
        [str(i + 1), str(layer), _fmt(ex["cost"][i]), _fmt(gated[i]), _fmt(gflops[i]), _pct(acc[i])]
        for i, layer in enumerate(ex.get("layers") or range(1, n + 1))
    ]
    out += ["", "### Exits", ""]
    out += _table(["exit", "layer", "cost (IMs)", "cost (IMs + gates)", "GFLOPs", "test acc. (%)"], rows)
    if exit_budget is not None:
        out += [
            "",
            "![Exit distributions](plots/exit_fractions.png)",
            "",
            f"Exit distribution of each method's configuration at budget {exit_budget:g}.",
        ]
    return out


def write_report(run_dir: str | Path, report: dict, reliability: list[dict] | None = None) -> Path:
    """Write ``report.md`` and the PNG plots (in ``plots/``) of an evaluated run.

    Args:
        run_dir: the run folder; report.md goes there, PNGs in ``run_dir/plots/``.
        report: the dict :func:`jeidnn.evaluate.evaluation.evaluate` returns (methods, summary, exits...).
        reliability: reliability-diagram panels, each ``{"title": str, "curves": [(label,
            ReliabilityDiagram), ...]}``; None or empty skips that plot.

    Returns:
        Path of report.md.
    """
    run_dir = Path(run_dir)
    (run_dir / _PLOT_DIR).mkdir(parents=True, exist_ok=True)
    report = {**report, "evaluation": {**report["evaluation"]}}
    report["evaluation"]["alphas_keys"] = [format(a, "g") for a in report["evaluation"].get("alphas", [])]
    plots: dict[str, str] = {}

    def target(stem: str, title: str | None = None) -> Path:
        if title:
            plots[title] = f"{_PLOT_DIR}/{stem}.png"
        return run_dir / _PLOT_DIR / f"{stem}.png"

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
    if reliability:
        _plot_reliability(reliability, target("reliability", "Reliability diagrams (budgeted choices)"))
    bb, ds = report.get("backbone", {}), report.get("dataset", {})
    out = [f"# jeidnn report: {bb.get('name', '?')} on {ds.get('name', '?')}", ""]
    out += _budgeted_section(report, f"{_PLOT_DIR}/budgeted_accuracy.png") + [""]
    out += _setup(report, exit_budget) + [""]
    out += _envelope_section(report, plots)
    notes = report["evaluation"].get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes]
    path = run_dir / "report.md"
    path.write_text("\n".join(out) + "\n")
    return path
