"""Human-readable report of an evaluated run: ``report.md`` and PNG plots in ``plots/``.

Everything is drawn from the report dict that :func:`jeidnn.evaluation.evaluate_run`
writes to report.json, except the reliability diagrams, which need per-bin statistics
that report.json does not keep and are passed in separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jeidnn.metrics import upper_envelope  # noqa: E402

__all__ = ["write_report"]

_PLOT_DIR = "plots"
_STYLE = {  # name -> (colour, marker)
    "jeidnn": ("#d62728", "o"),
    "threshold_maxprob": ("#1f77b4", "s"),
    "threshold_entropy": ("#2ca02c", "^"),
    "threshold_margin": ("#9467bd", "v"),
    "global_maxprob": ("#8c564b", "D"),
    "patience": ("#e377c2", "P"),
    "static": ("#7f7f7f", "X"),
    "oracle": ("#000000", "*"),
    "jeidnn_ims_threshold_maxprob": ("#ff7f0e", "h"),
}
_SHORT = {
    "threshold_maxprob": "maxprob",
    "threshold_entropy": "entropy",
    "threshold_margin": "margin",
    "global_maxprob": "global",
    "patience": "patience",
    "static": "static",
    "jeidnn_ims_threshold_maxprob": "JEI-IMs+thr",
}


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return _fmt(value, pct=True)


def _param(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:g}" for k, v in value.items())
    return "–" if value is None else f"{value:g}"


def _set_label(set_key: str) -> str:
    return "conformal set size (α = " + set_key.removeprefix("set_size_") + ")"


def _envelope(points: list[dict]) -> list[dict]:
    idx = upper_envelope([p["cost"] for p in points], [p["accuracy"] for p in points])
    return [points[i] for i in idx]


def _curves(report: dict) -> list[tuple[str, dict]]:
    return [(n, m) for n, m in report["methods"].items() if m["points"] and n != "oracle"]


def _style(name: str) -> dict:
    colour, marker = _STYLE.get(name, ("#17becf", "o"))
    # JEI-DNN drawn thicker and on top: it is the method every plot compares against.
    top = name == "jeidnn"
    return {"color": colour, "marker": marker, "lw": 2.5 if top else 1.5, "ms": 5, "zorder": 5 if top else 2}


def _shade_range(ax: plt.Axes, report: dict) -> None:
    lo, hi = report["summary"]["cost_range"]
    if lo is not None and hi is not None and hi > lo:
        ax.axvspan(lo, hi, color="0.9", zorder=0, label="AUC cost range")


def _plot_accuracy(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    _shade_range(ax, report)
    for name, method in _curves(report):
        pts = method["points"]
        st = _style(name)
        ax.scatter(
            [p["cost"] for p in pts], [100 * p["accuracy"] for p in pts], color=st["color"], s=10, alpha=0.3
        )
        env = _envelope(pts)
        ax.plot([p["cost"] for p in env], [100 * p["accuracy"] for p in env], label=method["label"], **st)
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
        ax.plot([o["cost"]], [100 * o["accuracy"]], "k*", ms=12)
    ax.set_xlabel("normalised cost (1.0 = original model)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs. cost (lines: upper envelopes; dots: all operating points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_ece(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, title in zip(
        axes,
        ("ece", "ece_temperature_scaled"),
        ("raw probabilities", "baselines temperature-scaled (JEI-DNN raw)"),
        strict=True,
    ):
        for name, method in _curves(report):
            env = _envelope(method["points"])
            # JEI-DNN has no temperature-scaled variant: draw its raw ECE in both panels for reference.
            k = "ece" if name == "jeidnn" else key
            xs = [p["cost"] for p in env if p[k] is not None]
            ys = [100 * p[k] for p in env if p[k] is not None]
            if xs:
                ax.plot(xs, ys, label=method["label"], **_style(name))
        ax.set_title(f"ECE on the accuracy envelope, {title}")
        ax.set_xlabel("normalised cost")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"ECE (%, {report.get('evaluation', {}).get('ece_bins', 15)} bins)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_conformal(report: dict, path: Path, alphas: list[str]) -> None:
    fig, axes = plt.subplots(2, len(alphas), figsize=(6 * len(alphas), 8), squeeze=False)
    for col, a in enumerate(alphas):
        for name, method in _curves(report):
            env = [p for p in _envelope(method["points"]) if a in p["conformal"]]
            xs = [p["cost"] for p in env]
            axes[0, col].plot(
                xs, [100 * p["conformal"][a]["coverage"] for p in env], label=method["label"], **_style(name)
            )
            axes[1, col].plot(xs, [p["conformal"][a]["mean_set_size"] for p in env], **_style(name))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reliability(panels: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="perfect calibration")
        for i, (label, diag) in enumerate(panel["curves"]):
            keep = diag.bin_counts > 0
            colour = _STYLE["jeidnn"][0] if label.startswith("JEI-DNN (") else f"C{i}"
            ax.plot(
                diag.bin_confidence[keep],
                diag.bin_accuracy[keep],
                marker="o",
                color=colour,
                label=f"{label}: ECE {100 * diag.ece:.1f}%",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (mean of bin)")
        ax.set_ylabel("accuracy in bin")
        ax.set_title(panel["title"])
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _reference_cost(report: dict) -> float:
    jei = report["methods"].get("jeidnn", {}).get("points")
    if jei:
        costs = sorted(p["cost"] for p in jei)
        return costs[len(costs) // 2]
    lo, hi = report["summary"]["cost_range"]
    return (lo + hi) / 2 if lo is not None and hi is not None else 0.5


def _plot_exits(report: dict, path: Path, layers: list[int]) -> float:
    ref = _reference_cost(report)
    chosen = []
    for name, method in report["methods"].items():
        if method["points"]:
            pts = method["points"] if name in ("oracle", "jeidnn") else _envelope(method["points"])
            chosen.append((name, method, min(pts, key=lambda p: abs(p["cost"] - ref))))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(layers) * len(chosen) / 3), 4.8))
    width = 0.8 / max(len(chosen), 1)
    x = np.arange(len(layers))
    for i, (name, method, point) in enumerate(chosen):
        ax.bar(
            x + (i - (len(chosen) - 1) / 2) * width,
            100 * np.asarray(point["exit_fractions"]),
            width,
            color=_STYLE.get(name, ("C0",))[0],
            label=f"{method['label']} (cost {point['cost']:.2f})",
        )
    ax.set_xticks(x, [str(la) for la in layers])
    ax.set_xlabel("exit (backbone layer)")
    ax.set_ylabel("test samples exiting (%)")
    ax.set_title(f"Exit distribution of each method's operating point nearest cost {ref:.2f}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ref


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _headline(report: dict, ref_cost: float) -> list[str]:
    s, methods, ex = report["summary"], report["methods"], report["exits"]
    bb, ds = report.get("backbone", {}), report.get("dataset", {})
    auc, best = s["auc"], s.get("best_baseline")
    lo, hi = s["cost_range"]
    out = [
        f"- Backbone {bb.get('name', '?')}: {bb.get('num_layers', '?')} layers, "
        f"{_fmt(bb.get('gflops_full'))} GFLOPs per sample; {ds.get('num_classes', '?')} classes; "
        f"splits {ds.get('splits', {})}.",
        f"- Final classifier test accuracy: {_pct((ex.get('test_accuracy') or [None])[-1])} % "
        "(the original model).",
    ]
    if "jeidnn" in auc and best:
        out.append(
            f"- Mean accuracy over the common cost range [{_fmt(lo)}, {_fmt(hi)}] (AUC / width): JEI-DNN "
            f"{_pct(auc['jeidnn'])} % vs best baseline {methods[best]['label']} {_pct(auc[best])} %."
        )
    if s["matched_cost"] and best:
        row = min(s["matched_cost"], key=lambda r: abs(r["cost"] - ref_cost))
        key = next((k for k in row["jeidnn"] if k.startswith("set_size_")), None)
        j, b = row["jeidnn"], row.get(best, {})
        j_set = f", {_set_label(key)} {_fmt(j[key], digits=2)}" if key else ""
        b_set = f", {_set_label(key)} {_fmt(b.get(key), digits=2)}" if key else ""
        out.append(
            f"- At cost {_fmt(row['cost'])} (λ = {_param(row['lambda'])}): JEI-DNN accuracy "
            f"{_pct(j['accuracy'])} %, ECE {_pct(j['ece'])} %{j_set}; {methods[best]['label']} at the same "
            f"cost {_pct(b.get('accuracy'))} %, ECE (better of raw / temperature-scaled) "
            f"{_pct(b.get('ece_best'))} %{b_set}."
        )
    if "oracle" in methods:
        o = methods["oracle"]["points"][0]
        out.append(
            f"- Oracle (first correct exit, an upper bound): {_pct(o['accuracy'])} % at cost "
            f"{_fmt(o['cost'])}."
        )
    return out


def _exits_table(ex: dict) -> list[str]:
    n = len(ex["cost"])
    gflops, acc = ex.get("gflops") or [None] * n, ex.get("test_accuracy") or [None] * n
    rows = [
        [
            str(i + 1),
            str(layer),
            _fmt(ex["cost"][i]),
            _fmt(ex["cost_with_gates"][i]),
            _fmt(gflops[i]),
            _pct(acc[i]),
        ]
        for i, layer in enumerate(ex.get("layers") or range(1, n + 1))
    ]
    return _table(["exit", "layer", "cost (IMs)", "cost (IMs + gates)", "GFLOPs", "test acc. (%)"], rows)


def _matched_table(matched: list[dict]) -> list[str]:
    baselines = [n for n in matched[0] if n not in ("cost", "lambda", "jeidnn")]
    key = next((k for k in matched[0]["jeidnn"] if k.startswith("set_size_")), "set_size")
    out = [
        "Each baseline's upper envelope linearly interpolated at the cost of each JEI-DNN point "
        "(acc. and ECE in %; a baseline's ECE is the better of raw and temperature-scaled; set = mean "
        f"conformal {key.replace('set_size_', 'set size at α = ')}; – = outside that baseline's cost range).",
        "",
    ]
    header = ["λ", "cost", "JEI-DNN acc.", "ECE", "set"]
    for n in baselines:
        header += [f"{_SHORT.get(n, n)} acc.", "ECE", "set"]
    rows = []
    for r in matched:
        j = r["jeidnn"]
        row = [
            _param(r["lambda"]),
            _fmt(r["cost"]),
            _pct(j["accuracy"]),
            _pct(j["ece"]),
            _fmt(j.get(key), digits=2),
        ]
        for n in baselines:
            row += [_pct(r[n]["accuracy"]), _pct(r[n]["ece_best"]), _fmt(r[n].get(key), digits=2)]
        rows.append(row)
    return out + _table(header, rows)


def _auc_table(report: dict) -> list[str]:
    auc, methods = report["summary"]["auc"], report["methods"]
    ref = auc.get("jeidnn")
    rows = []
    for name, value in sorted(auc.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1)):
        delta = None if ref is None or value is None else 100 * (value - ref)
        rows.append([methods[name]["label"], methods[name]["kind"], _pct(value), _fmt(delta, digits=2)])
    return _table(["method", "kind", "AUC (mean acc. %)", "Δ vs JEI-DNN (points)"], rows)


def _conformal_table(report: dict) -> list[str]:
    rows = []
    for method in report["methods"].values():
        for alpha in report.get("evaluation", {}).get("alphas", []):
            results = [p["conformal"][format(alpha, "g")] for p in method["points"]]
            cov = [r["coverage"] for r in results if r["coverage"] is not None]
            size = [r["mean_set_size"] for r in results if r["mean_set_size"] is not None]
            fallback = sum(bool(r["fallback_exits"]) for r in results)
            rows.append(
                [
                    method["label"],
                    format(alpha, "g"),
                    _pct(min(cov) if cov else None),
                    _pct(float(np.mean(cov)) if cov else None),
                    _fmt(float(np.mean(size)) if size else None, digits=2),
                    f"{fallback}/{len(results)}",
                ]
            )
    return _table(["method", "α", "min coverage (%)", "mean coverage (%)", "mean set size", "fallback"], rows)


def _markdown(report: dict, plots: dict[str, str], ref_cost: float) -> str:
    s = report["summary"]
    lo, hi = s["cost_range"]
    bb, ds = report.get("backbone", {}), report.get("dataset", {})
    out = [f"# jeidnn report: {bb.get('name', '?')} on {ds.get('name', '?')}", "", "## Headline", ""]
    out += _headline(report, ref_cost)
    out += ["", "## Exits", ""] + _exits_table(report["exits"])
    if s["matched_cost"]:
        out += ["", "## Matched cost", ""] + _matched_table(s["matched_cost"])
    out += [
        "",
        "## AUC",
        "",
        f"Mean test accuracy of each upper envelope over costs [{_fmt(lo)}, {_fmt(hi)}], the range all "
        "methods cover (the oracle is an upper bound and not compared; – = the ranges do not overlap).",
        "",
    ] + _auc_table(report)
    out += [
        "",
        "## Conformal prediction sets",
        "",
        "Per-exit split conformal (quantiles on calib, at the exit each sample takes); test coverage "
        "should be ≥ 1 − α. Over all operating points of each method: worst and mean coverage, mean set "
        "size; 'fallback' = points where some exit had too few calib samples and used the pooled quantile.",
        "",
    ] + _conformal_table(report)
    out += ["", "## Plots", ""]
    for title, rel in plots.items():
        out += [f"### {title}", "", f"![{title}]({rel})", ""]
    notes = report.get("evaluation", {}).get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, report: dict, reliability: list[dict] | None = None) -> Path:
    """Write ``report.md`` and the PNG plots (in ``plots/``) of an evaluated run.

    Args:
        run_dir: the run folder; report.md goes there, PNGs in ``run_dir/plots/``.
        report: the dict :func:`jeidnn.evaluation.evaluate_run` returns (methods, summary, exits...).
        reliability: reliability-diagram panels, each ``{"title": str, "curves": [(label,
            ReliabilityDiagram), ...]}``; None or empty skips that plot.

    Returns:
        Path of report.md.
    """
    run_dir = Path(run_dir)
    (run_dir / _PLOT_DIR).mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}

    def target(stem: str, title: str) -> Path:
        plots[title] = f"{_PLOT_DIR}/{stem}.png"
        return run_dir / _PLOT_DIR / f"{stem}.png"

    _plot_accuracy(report, target("accuracy_vs_cost", "Accuracy vs. cost"))
    _plot_ece(report, target("ece_vs_cost", "ECE vs. cost"))
    present = [format(a, "g") for a in report.get("evaluation", {}).get("alphas", [])]
    alphas = [a for a in ("0.05", "0.1") if a in present] or present[:2]
    if alphas:
        _plot_conformal(
            report, target("conformal_vs_cost", "Conformal coverage and set size vs. cost"), alphas
        )
    if reliability:
        _plot_reliability(reliability, target("reliability", "Reliability diagrams"))
    layers = report["exits"].get("layers") or list(range(1, len(report["exits"]["cost"]) + 1))
    ref_cost = _plot_exits(report, target("exit_fractions", "Exit distributions"), layers)
    path = run_dir / "report.md"
    path.write_text(_markdown(report, plots, ref_cost))
    return path
