"""The method registry: every method a run evaluates, described once.

Each :class:`MethodSpec` says what a method is (``kind``), how report.json and report.md name and draw it,
how its candidate configurations are built (:mod:`jeidnn.evaluate.candidates`), how gates play a chosen
configuration in an exported model, and whether it can be exported. Learned methods come from the run's
``jeidnn.variants`` (report.json ``learned``) and are described by :func:`learned_spec`.

To add a baseline: write its candidate builder in :mod:`jeidnn.evaluate.candidates` (each candidate's
``uses`` holds what its gates need) and add one entry to :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jeidnn.errors import JeidnnError
from jeidnn.evaluate import candidates as build
from jeidnn.model.rule_gates import (
    PatienceConfidenceGates,
    PatienceGates,
    ProductGates,
    StaticGates,
    ThresholdGates,
)

__all__ = [
    "REGISTRY",
    "MethodSpec",
    "check_export_method",
    "exportable_names",
    "learned_names",
    "learned_spec",
    "plot_style",
    "run_baselines",
    "spec_of",
]

DERIVED_FROM = "jeidnn_paper"
"""The learned method whose IMs ``jeidnn_ims_threshold_maxprob`` puts thresholds on."""
LEARNED_COLOURS = ["#d62728", "#ff7f0e", "#8b0000", "#ff1493", "#b8860b", "#4b0082"]


def _threshold_gates(uses: dict) -> Any:
    return ThresholdGates(uses["thresholds"], uses["measure"])


def _patience_gates(uses: dict) -> Any:
    return PatienceGates(uses["patience"])


def _static_gates(uses: dict) -> Any:
    return StaticGates(uses["exit"])


def _product_gates(uses: dict) -> Any:
    return ProductGates(uses["thresholds"])


def _patience_confidence_gates(uses: dict) -> Any:
    return PatienceConfidenceGates(uses["patience"], uses["threshold"])


@dataclass(frozen=True)
class MethodSpec:
    """One method: what it is, how it is built, drawn, played and exported."""

    name: str
    kind: str
    """``baseline``, ``learned``, ``learned_calib_threshold`` (exit threshold chosen on calib), ``oracle``
    or ``learned_ims`` (thresholds on a learned method's IMs)."""
    report_kind: str
    """The ``kind`` report.json writes: ``learned``, ``threshold``, ``patience``, ``static`` or ``oracle``."""
    label: str
    note: str
    candidates: Callable[[build.Inputs], Any] | None = None
    """Builds its candidates (a list, or a function of the budget); None for learned methods, built from
    their report.json entry by :func:`jeidnn.evaluate.candidates.learned_candidates`."""
    gates: Callable[[dict], Any] | None = None
    """The parameter-free gates that play a candidate, from its ``uses``; None: learned gates (trained)."""
    style: tuple[str, str] | None = None
    """(colour, marker) in the plots; None: learned methods take the next of ``LEARNED_COLOURS``."""
    reads: str | None = None
    """The learned method whose predictions it reads; the method exists only when that one does."""
    envelope_points: str = "all"
    """``all`` candidates in the envelope views, or those ``chosen`` at some budget (a large grid)."""

    @property
    def exportable(self) -> bool:
        """The oracle reads each sample's label: an upper bound, not a method to deploy."""
        return self.kind != "oracle"

    def rule_gates(self, uses: dict) -> Any:
        """The gates of a chosen configuration (its candidate's ``uses``)."""
        if self.gates is None:
            raise AssertionError(f"{self.name!r} has no rule gates")
        return self.gates(uses)


def _baseline(
    name: str,
    report_kind: str,
    label: str,
    note: str,
    builder: Callable,
    gates: Callable,
    style: tuple[str, str],
    envelope_points: str = "all",
) -> MethodSpec:
    return MethodSpec(
        name, "baseline", report_kind, label, note, builder, gates, style, envelope_points=envelope_points
    )


REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        *(
            _baseline(
                f"threshold_{m}",
                "threshold",
                f"{m} thresholds".replace("maxprob", "max-prob"),
                f"budgeted-batch {m} thresholds fitted on calib A for each geometric exit target",
                build.thresholds_of(m),
                _threshold_gates,
                style,
            )
            for m, style in (
                ("maxprob", ("#1f77b4", "s")),
                ("entropy", ("#2ca02c", "^")),
                ("margin", ("#9467bd", "v")),
            )
        ),
        _baseline(
            "global_maxprob",
            "threshold",
            "global max-prob threshold",
            "one max-prob threshold at every exit",
            build.global_maxprob,
            _threshold_gates,
            ("#8c564b", "D"),
        ),
        _baseline(
            "threshold_search",
            "threshold",
            "per-exit max-prob thresholds searched on calib",
            "per-exit max-prob thresholds searched on calib A for each budget",
            build.threshold_search,
            _threshold_gates,
            ("#17becf", "<"),
        ),
        _baseline(
            "product_maxprob",
            "threshold",
            "max-prob product thresholds",
            "budgeted-batch thresholds on the product of the max-probabilities of the exits so far",
            build.product_maxprob,
            _product_gates,
            ("#393b79", ">"),
        ),
        _baseline(
            "patience",
            "patience",
            "patience (PABEE)",
            "exit once the prediction stays the same for `patience` more exits",
            build.patience,
            _patience_gates,
            ("#e377c2", "P"),
        ),
        _baseline(
            "patience_confidence",
            "patience",
            "patience + max-prob",
            "exit once the prediction stays the same for `patience` more exits and its max-prob reaches a "
            "threshold",
            build.patience_confidence,
            _patience_confidence_gates,
            ("#ad494a", "d"),
            envelope_points="chosen",
        ),
        _baseline(
            "static",
            "static",
            "static depth",
            "every sample at one layer",
            build.static,
            _static_gates,
            ("#7f7f7f", "X"),
        ),
        MethodSpec(
            "oracle",
            "oracle",
            "oracle",
            "oracle (upper bound)",
            "it picks each sample's exit by reading its label (an upper bound, not a method)",
            build.oracle,
            None,
            ("#000000", "*"),
        ),
        MethodSpec(
            "jeidnn_ims_threshold_maxprob",
            "learned_ims",
            "threshold",
            "learned IMs + max-prob thresholds",
            "budgeted-batch max-prob thresholds on the IMs of each jeidnn_paper model",
            build.thresholds_on_learned_ims(DERIVED_FROM),
            _threshold_gates,
            ("#bcbd22", "h"),
            reads=DERIVED_FROM,
        ),
    ]
}
"""Every non-learned method, in report order (learned methods come first)."""


def learned_spec(name: str, entry: dict) -> MethodSpec:
    """The spec of the learned method ``name`` (report.json ``learned[name]``)."""
    tuned = entry.get("operating_point") == "calib_threshold"
    return MethodSpec(
        name,
        "learned_calib_threshold" if tuned else "learned",
        "learned",
        entry.get("label", name),
        "stage-2 gates; exit threshold chosen on calib A"
        if tuned
        else "stage-2 gates at their own threshold",
    )


def spec_of(name: str, learned: dict[str, dict]) -> MethodSpec:
    """The spec of any method of a run whose report.json ``learned`` is ``learned``."""
    return learned_spec(name, learned[name]) if name in learned else REGISTRY[name]


def run_baselines(learned: list[str] | dict) -> list[MethodSpec]:
    """The non-learned methods of a run with these learned methods, in report order."""
    return [s for s in REGISTRY.values() if s.reads is None or s.reads in learned]


def exportable_names(learned: list[str] | dict) -> list[str]:
    """Every method a run with these learned methods can export, in report order."""
    return [*learned, *(s.name for s in run_baselines(learned) if s.exportable)]


def learned_names(cfg: Any) -> list[str]:
    """The learned methods a run of ``cfg`` trains: each variant, and the `_tau` twin of each native one."""
    names: list[str] = []
    if cfg.jeidnn.enabled:
        for v in cfg.jeidnn.variants:
            names += [v.name, f"{v.name}_tau"] if v.operating_point == "native" else [v.name]
    return names


def check_export_method(cfg: Any) -> None:
    """Refuse an ``export.method`` that a run of ``cfg`` cannot export, in one line, before any work.

    Raises:
        JeidnnError: naming the method and the valid ones.
    """
    method = cfg.export.method
    if method is not None and method not in (valid := exportable_names(learned_names(cfg))):
        raise JeidnnError(f"export.method {method!r} is not a method of this run; choose one of {valid}")


def plot_style(name: str, learned: list[str]) -> dict:
    """Matplotlib style of a method; learned methods are drawn thicker and on top."""
    if name in learned:
        colour, marker = LEARNED_COLOURS[learned.index(name) % len(LEARNED_COLOURS)], "o"
    else:
        spec = REGISTRY.get(name)
        colour, marker = spec.style if spec and spec.style else ("#17becf", "o")
    top = name in learned
    return {"color": colour, "marker": marker, "lw": 2.5 if top else 1.5, "ms": 5, "zorder": 5 if top else 2}
