"""Human-readable report of an evaluated run: ``report.md`` (its plots: :mod:`jeidnn.evaluate.plots`).

Everything is drawn from the report dict :func:`jeidnn.evaluate.evaluation.evaluate` returns, except the
reliability diagrams, which need per-bin statistics that report.json does not keep and are passed
in separately. The budgeted, test-blind table comes first; the envelope views follow under
"Envelope on test (optimistic)" (docs/evaluation.md explains both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jeidnn.evaluate.plots import PLOT_DIR, budget_rows, label_of, write_plots
from jeidnn.evaluate.report_headline import headline_section
from jeidnn.io import write_text

__all__ = ["write_report"]


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return _fmt(value, pct=True)


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}".replace("-", "−")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


# --------------------------------------------------------------------------- budgeted (headline)


def _budget_cell(row: dict | None) -> str:
    if row is None or row["accuracy"] is None:
        return "–"
    cell = _pct(row["accuracy"])
    delta = row.get("delta_vs_reference", row.get("delta_vs_best_baseline"))  # reports before the reference
    if row["kind"] == "learned" and delta:
        cell += f" ({_signed(delta['mean'])} [{_signed(delta['ci_low'])}, {_signed(delta['ci_high'])}])"
    return cell


def _budgeted_section(report: dict, plot: str) -> list[str]:
    b = report["summary"]["budgeted"]
    budgets, names, rows = budget_rows(report)
    methods = report["methods"]
    split = b["calib_split"]
    out = [
        "## Budgeted comparison (test-blind)",
        "",
        f"For each cost budget, every method plays the configuration with the best accuracy on calib half A "
        f"({split['a']} samples) among those whose calib-A cost is within the budget; temperatures and "
        f"conformal quantiles are fitted on calib half B ({split['b']} samples; split seed {split['seed']}). "
        "Cells: test accuracy (%); for learned methods also the difference to the reference baseline at "
        f"that budget in points with its paired-bootstrap 95 % interval ({b['bootstrap']} resamples). The "
        "reference baseline is the non-learned method whose choice is the most accurate on val (see the "
        "headline); the test-best baseline, the most accurate on test, favours the baselines. – = the method "
        "cannot meet the budget on calib A.",
        "",
    ]
    header = ["budget"] + [label_of(methods[n]) for n in names] + ["reference baseline", "test-best baseline"]
    table = []
    for budget in budgets:
        here = [r for n in names if (r := rows.get((budget, n)))]
        refs = [
            next((r[key] for r in here if r.get(key)), None)
            for key in ("reference_baseline", "best_baseline")
        ]
        table.append(
            [f"{budget:g}"]
            + [_budget_cell(rows.get((budget, n))) for n in names]
            + [label_of(methods[ref]) if ref else "–" for ref in refs]
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
                label_of(methods[n]),
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
            + "; ".join(
                f"{label_of(methods[r['method']])} at {r['budget']:g} ({r['reason']})" for r in missing
            )
            + ".",
        ]
    out += [
        "",
        f"![Accuracy vs. budget]({plot})",
        "",
        "Accuracy vs. budget: test accuracy of each method's calib-chosen configuration; the bars on learned "
        "methods are the 95 % bootstrap interval of the difference to the reference baseline, shifted onto "
        "the method's accuracy.",
    ]
    return out


# --------------------------------------------------------------------------- guarantees


def _rule_cell(summary: dict | None, cost: bool = True) -> str:
    """``cost (violation %)`` of one rule over the re-splits."""
    if not summary:
        return "–"
    return (
        f"{_fmt(summary['mean_cost'])} ({_pct(summary['violation'])} %)"
        if cost
        else _fmt(summary["mean_cost"])
    )


def _violation(summary: dict) -> str:
    lo, hi = summary["violation_ci"]
    return f"{_pct(summary['violation'])} [{_pct(lo)}, {_pct(hi)}]"


def _guarantee_section(entry: dict, methods: dict) -> list[str]:
    g, cert, check = entry["guarantee"], entry["certificate"], entry["resplit"]
    statement = f"{g['risk']} ≤ {g['epsilon']:g}" + (
        f" with probability ≥ {1 - g['delta']:g}" if g["kind"] == "high_probability" else " in expectation"
    )
    out = [f"### {statement}", ""]
    if cert is None:
        out += [f"Nothing certified: {entry['reason']}", ""]
    else:
        label = label_of(methods[cert["method"]])
        out += [
            f"Certified: **{label}** ({cert['param']}), test cost {_fmt(cert['test_cost'])}, test accuracy "
            f"{_pct(cert['test_accuracy'])} %, test risk {_fmt(cert['test_risk'], digits=4)} (calib-B risk "
            f"{_fmt(cert['certified_risk'], digits=4)}). Proof: {cert['proof']}.",
            "",
        ]
    clipped = "peeking_clipped" in check["all"]
    header = ["method", "certified alone: test cost", "test risk", "ours: violation % [95 % CI]", "ours"]
    header += ["naive", "CALM", "peeking"] + (["peeking (clipped)"] if clipped else [])
    rows = []
    named = [(n, label_of(methods[n]), entry["methods"][n], check["methods"][n]) for n in check["methods"]]
    shared = ", ".join(label_of(methods[n]) for n in check["shared"])
    named.append(("all", f"as certified ({shared})", None, check["all"]))
    for _, label, alone, rules in named:
        row = [label, _fmt((alone or {}).get("test_cost")), _fmt((alone or {}).get("test_risk"), digits=4)]
        row += [_violation(rules["ours"]), _rule_cell(rules["ours"], cost=False)]
        row += [_rule_cell(rules.get(r)) for r in ("naive", "calm")] + [
            _rule_cell(rules["peeking"], cost=False)
        ]
        row += [_rule_cell(rules["peeking_clipped"], cost=False)] if clipped else []
        rows.append(row)
    return out + _table(header, rows) + [""]


_GUARANTEES_INTRO = (
    "The cheapest operating point whose risk against the full model (the backbone's own final "
    "classifier) is at most ε, certified on calib half B; calib half A ordered each method's "
    'candidates and screened the methods, and test chose nothing (docs/evaluation.md, "Guarantees"). '
    "`accuracy_gap` is the accuracy lost against the full model, `consistency` the fraction of "
    'predictions that differ from its. "Certified alone": each method certified on its own at δ, '
    "its test cost and test risk. Re-split columns: {resplits} random re-splits of calib B ∪ test "
    "(seed {seed}) into a certification part the size of calib B and a held-out rest; the mean "
    "held-out cost of what each rule plays and, in parentheses, how often its held-out risk "
    "exceeds ε (a valid rule: at most δ, up to the interval). naive = the cheapest candidate whose "
    "certification-part risk is ≤ ε, no bound; CALM = fixed-sequence testing with Hoeffding "
    "p-values; peeking = the cheapest candidate whose held-out risk is ≤ ε, a lower bound on cost, "
    "not a method (clipped: on max(gap, 0), the bound of tests that read the clipped loss). "
    "Nothing certified: the full model, cost 1."
)


def _guarantees(report: dict, plot: str | None) -> list[str]:
    entries = report["summary"].get("guarantees") or []
    if not entries:
        return []
    check = entries[0]["resplit"]
    out = [
        "## Guarantees",
        "",
        _GUARANTEES_INTRO.format(resplits=check["resplits"], seed=check["seed"]),
        "",
    ]
    for entry in entries:
        out += _guarantee_section(entry, report["methods"])
    if plot:
        out += [
            f"![Certified cost against ε]({plot})",
            "",
            "Cost against ε of each rule across methods (as "
            "certified), with its violation rate over the re-splits at each point.",
            "",
        ]
    return out


# --------------------------------------------------------------------------- envelope (optimistic)


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
            label_of(methods[r["method"]]),
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
        [[label_of(methods[n]), methods[n]["kind"], _pct(v)] for n, v in auc],
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
                    label_of(method),
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
    report = {**report, "evaluation": {**report["evaluation"]}}
    report["evaluation"]["alphas_keys"] = [format(a, "g") for a in report["evaluation"].get("alphas", [])]
    plots, exit_budget = write_plots(run_dir, report, reliability)
    bb, ds = report.get("backbone", {}), report.get("dataset", {})
    out = [f"# jeidnn report: {bb.get('name', '?')} on {ds.get('name', '?')}", ""]
    out += headline_section(report) + [""]
    out += _budgeted_section(report, f"{PLOT_DIR}/budgeted_accuracy.png") + [""]
    out += _guarantees(report, plots.pop("guarantees", None))
    out += _setup(report, exit_budget) + [""]
    out += _envelope_section(report, plots)
    notes = report["evaluation"].get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes]
    path = run_dir / "report.md"
    write_text(path, "\n".join(out) + "\n")
    return path
