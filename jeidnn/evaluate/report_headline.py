"""report.md's headline: the best learned method against the reference baseline at each budget.

Drawn from ``summary.budgeted.headline`` (:func:`jeidnn.evaluate.comparator.compare`); docs/evaluation.md,
"Compared with which baseline", says why the references are picked on val.
"""

from __future__ import annotations

from jeidnn.evaluate.plots import label_of

__all__ = ["delta_text", "headline_section"]

_PICKED = {
    "val": "the most accurate on **val**",
    "calib_a": "the most accurate on calib half A (this run kept no val predictions; calib A favours the "
    "baseline that searched it hardest)",
}


def delta_text(delta: dict | None) -> str:
    """``+0.4 [−0.1, +0.9]``: a difference of accuracies and its interval, in points."""
    if not delta:
        return "–"
    points = [f"{100 * delta[k]:+.1f}".replace("-", "−") for k in ("mean", "ci_low", "ci_high")]
    return f"{points[0]} [{points[1]}, {points[2]}]"


def _rows(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def headline_section(report: dict) -> list[str]:
    """The headline table and the best learned method's Δ against every baseline; [] for a run whose
    report has no headline (evaluated before it existed) or no learned method."""
    b = report["summary"]["budgeted"]
    headline = [h for h in b.get("headline") or [] if h["best_learned"] is not None]
    if not headline:
        return []
    methods = report["methods"]

    def name(method: str | None) -> str:
        return label_of(methods[method]) if method else "–"

    picked = {h["picked_on"] for h in headline}
    how = "; ".join(_PICKED[p] for p in sorted(picked, reverse=True))
    out = [
        "## Headline: best learned method vs. reference baseline",
        "",
        "At each budget every method plays its calib-A choice (below). The **reference baseline** is the "
        f"non-learned method whose choice is {how}, and the **best learned method** is picked the same way; "
        "thresholds, τ and λ were all chosen on calib A, so neither pick is fitted to the data that picks "
        "it, and test stays unseen. Δ = best learned − reference, test accuracy in points, with its "
        f"paired-bootstrap 95 % interval ({b['bootstrap']} resamples). The test-best baseline (the most "
        "accurate on test) is shown beside it: a maximum over noisy test estimates, it favours the "
        "baselines.",
        "",
    ]
    calib_picked = [f"{h['budget']:g}" for h in headline if h.get("best_learned_picked_on") == "calib_a"]
    if "val" in picked and calib_picked:
        out += [
            f"At budget{'s' if len(calib_picked) > 1 else ''} {', '.join(calib_picked)} every learned method "
            "that met the budget trained its gates "
            "on val (`gate_data: val`), so the best learned method there is picked on calib A.",
            "",
        ]
    body = [
        [
            f"{h['budget']:g}",
            name(h["best_learned"]),
            name(h["reference_baseline"]),
            delta_text(h["delta"]),
            name(h["test_best_baseline"]),
            delta_text(h["delta_vs_test_best"]),
        ]
        for h in headline
    ]
    header = [
        "budget",
        "best learned",
        "reference baseline",
        "Δ (points)",
        "test-best baseline",
        "Δ vs test-best",
    ]
    out += _rows(header, body)
    baselines = list(dict.fromkeys(n for h in headline for n in h["vs_each_baseline"]))
    out += [
        "",
        "### Best learned method against each baseline",
        "",
        "Δ (points) of the best learned method at each budget against every baseline that met the budget, "
        "with its paired-bootstrap 95 % interval, so that no single choice of reference carries the "
        "conclusion.",
        "",
    ]
    body = [
        [f"{h['budget']:g}", *(delta_text(h["vs_each_baseline"].get(n)) for n in baselines)] for h in headline
    ]
    return out + _rows(["budget", *(name(n) for n in baselines)], body)
