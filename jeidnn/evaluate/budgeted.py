"""The budgeted, test-blind protocol: every method picks its configuration without seeing test.

See docs/evaluation.md for the protocol and why each step is there. In short:

* The ``calib`` split is cut in two halves with the run's seed (:func:`split_calib`). Half A
  chooses operating points; half B fits temperatures and conformal quantiles.
* A method offers candidate configurations (:class:`Candidate`): exits on calib and on test,
  the predictions they read and the cost of each exit. For a budget ``B`` the method plays the
  candidate with the best calib-A accuracy among those with calib-A cost <= ``B``
  (:func:`select_config`; ties: lower cost, then the earlier candidate).
* The chosen configurations are scored on test (:func:`evaluate_config`), and each method's
  accuracy is compared with the reference baseline's (the baseline whose choice is the most accurate on
  val) and the test-best baseline's by a paired bootstrap (:func:`budgeted_rows`,
  :mod:`jeidnn.evaluate.comparator`).

The candidates come from :mod:`jeidnn.evaluate.candidates`; :mod:`jeidnn.evaluate.selection` keeps what was
chosen, which ``jeidnn export`` plays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jeidnn.evaluate.calibration import (
    ReliabilityDiagram,
    apply_temperatures,
    fit_temperatures,
    reliability_diagram,
)
from jeidnn.evaluate.comparator import Entry, compare
from jeidnn.evaluate.conformal import alpha_key, calib_at_exit, evaluate_sets, resplit_miss
from jeidnn.evaluate.metrics import exit_outcome
from jeidnn.model.policies import select_exit

__all__ = [
    "DEFAULT_BUDGETS",
    "CalibSplit",
    "Candidate",
    "Method",
    "Source",
    "evaluate_config",
    "make_candidate",
    "budgeted_rows",
    "select_config",
    "split_calib",
]

DEFAULT_BUDGETS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
_TOL = 1e-9  # cost <= budget up to float noise


@dataclass(frozen=True)
class CalibSplit:
    """Indices into the calib split of its two halves, each sorted."""

    a: Tensor  # (n_a,) chooses operating points
    b: Tensor  # (n_b,) fits temperatures and conformal quantiles
    seed: int

    def to_dict(self) -> dict:
        return {"a": len(self.a), "b": len(self.b), "seed": self.seed}


def split_calib(num_calib: int, seed: int) -> CalibSplit:
    """A seeded random half of calib is A (``num_calib // 2`` samples), the rest is B."""
    perm = torch.randperm(num_calib, generator=torch.Generator().manual_seed(seed))
    half = num_calib // 2
    return CalibSplit(perm[:half].sort().values, perm[half:].sort().values, seed)


@dataclass
class Source:
    """Per-exit predictions of one set of IMs on calib and test (the warm-up IMs or one learned model)."""

    name: str  # which predictions these are, for messages
    logits: dict[str, Tensor]  # split -> (N, L, C): calib, test and, where the run kept it, val
    labels: dict[str, Tensor]  # split -> (N,)
    scores: dict[str, Tensor] | None = None  # split -> (N, L - 1) exit scores of a learned model
    probs: dict[str, Tensor] = field(init=False)  # split -> (N, L, C)
    correct: dict[str, Tensor] = field(init=False)  # split -> (N, L) bool
    temperatures: Tensor | None = None  # (L,), fitted on calib B by fit_temperatures_on
    test_probs_ts: Tensor | None = None  # (N_test, L, C) temperature-scaled

    def __post_init__(self) -> None:
        self.probs = {s: x.softmax(dim=-1) for s, x in self.logits.items()}
        self.correct = {s: p.argmax(dim=-1) == self.labels[s][:, None] for s, p in self.probs.items()}

    def fit_temperatures_on(self, split: CalibSplit) -> None:
        self.temperatures = fit_temperatures(self.logits["calib"][split.b], self.labels["calib"][split.b])
        self.test_probs_ts = apply_temperatures(self.logits["test"], self.temperatures)


@dataclass
class Candidate:
    """One configuration of a method: where every calib and test sample exits, and at what cost."""

    param: Any  # JSON-able description (threshold, p, patience, {"model", "lambda", "tau"}, ...)
    source: Source
    costs: Tensor  # (L,) float64 normalised cost of each exit
    calib_exits: Tensor  # (N_calib,) int16, the whole calib split
    test_exits: Tensor  # (N_test,) int16
    calib_accuracy: float  # on calib A
    calib_cost: float  # on calib A
    uses: dict = field(default_factory=dict)
    """What gates need to play it: ``thresholds`` and ``measure``, ``patience`` or ``exit`` (baselines)."""
    val_exits: Tensor | None = None
    """(N_val,) int16: where val exits; None for predictions without a val split (older run folders)."""

    def val_outcome(self) -> dict[str, float] | None:
        """Accuracy and cost on val (a split no threshold, τ or λ was chosen on), or None without val."""
        if self.val_exits is None:
            return None
        exits = self.val_exits.long()
        correct = self.source.correct["val"].gather(1, exits[:, None]).squeeze(1)
        return {"accuracy": float(correct.double().mean()), "cost": float(self.costs[exits].mean())}


def make_candidate(
    param: Any,
    source: Source,
    costs: Tensor,
    calib_exits: Tensor,
    test_exits: Tensor,
    split: CalibSplit,
    uses: dict | None = None,
    val_exits: Tensor | None = None,
) -> Candidate:
    """Wrap exits with their calib-A accuracy and cost (int16: thousands of candidates stay small)."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    exits_a = calib_exits[split.a].long()
    correct_a = source.correct["calib"][split.a].gather(1, exits_a[:, None]).squeeze(1)
    return Candidate(
        param,
        source,
        costs,
        calib_exits.to(torch.int16),
        test_exits.to(torch.int16),
        float(correct_a.double().mean()),
        float(costs[exits_a].mean()),
        uses or {},
        None if val_exits is None else val_exits.to(torch.int16),
    )


def select_config(candidates: list[Candidate], budget: float) -> Candidate | None:
    """The most accurate candidate on calib A among those with calib-A cost <= budget (None if none).

    Ties: lower calib-A cost, then the earlier candidate.
    """
    feasible = [i for i, c in enumerate(candidates) if c.calib_cost <= budget + _TOL]
    if not feasible:
        return None
    best = min(feasible, key=lambda i: (-candidates[i].calib_accuracy, candidates[i].calib_cost, i))
    return candidates[best]


@dataclass
class Method:
    """A method's candidates, fixed or made per budget (``threshold_search``)."""

    name: str
    kind: str  # learned | threshold | patience | static | oracle
    label: str
    candidates: list[Candidate] | Callable[[float], list[Candidate]]
    extension: bool = False
    settings: dict | None = None
    floor_cost: float | None = None
    """The lowest calib-A cost the method reaches, for a method that may offer no candidate at a budget."""
    envelope_points: str = "all"
    """Which candidates the envelope views evaluate on test: ``all``, or ``chosen`` (those some budget
    chose), for a method whose grid is so large that its test envelope would be a maximum over hundreds."""

    def candidates_at(self, budget: float) -> list[Candidate]:
        return self.candidates(budget) if callable(self.candidates) else self.candidates


@dataclass
class Settings:
    """What the evaluation reads from ``eval`` in the run's config, plus the run's seed."""

    alphas: list[float]
    ece_bins: int
    min_samples: int
    budgets: list[float]
    bootstrap: int
    resplits: int
    seed: int
    gflops_full: float | None = None


def evaluate_config(
    cand: Candidate, split: CalibSplit, settings: Settings, cache: dict | None = None
) -> tuple[dict, ReliabilityDiagram, list[list[int]]]:
    """Test metrics of one candidate; temperatures and conformal quantiles come from calib B.

    Returns:
        The point (accuracy, cost, gflops, exit_fractions, ece, ece_temperature_scaled, conformal), its
        reliability diagram on test, and the exit groups of its conformal sets. With ``cache``, a
        candidate already evaluated (the same object) is not evaluated again.
    """
    if cache is not None:
        key = ("point", id(cand))
        if key not in cache:
            cache[key] = evaluate_config(cand, split, settings)
        return cache[key]
    src, test_exits = cand.source, cand.test_exits.long()
    num_exits = len(cand.costs)
    probs = select_exit(src.probs["test"], test_exits)  # (N, C) at the exit taken
    labels = src.labels["test"]
    outcome = exit_outcome(src.correct["test"], test_exits, cand.costs)
    diagram = reliability_diagram(probs, labels, settings.ece_bins)
    ece_ts = None
    if src.test_probs_ts is not None:
        ece_ts = reliability_diagram(
            select_exit(src.test_probs_ts, test_exits), labels, settings.ece_bins
        ).ece
    groups, calib_b = calib_at_exit(
        src.probs["calib"],
        src.labels["calib"],
        cand.calib_exits,
        split.a,
        split.b,
        num_exits,
        settings.min_samples,
    )
    conformal = {
        alpha_key(a): evaluate_sets(*calib_b, probs, labels, test_exits, num_exits, a, groups=groups)
        for a in settings.alphas
    }
    cost = outcome["cost"]
    point = {
        "param": cand.param,
        "accuracy": outcome["accuracy"],
        "cost": cost,
        "gflops": cost * settings.gflops_full if settings.gflops_full is not None else None,
        "exit_fractions": outcome["exit_fractions"],
        "ece": diagram.ece,
        "ece_temperature_scaled": ece_ts,
        "conformal": conformal,
    }
    return point, diagram, groups


_COMPARISON_KEYS = (
    "val_accuracy", "val_cost", "reference_baseline", "delta_vs_reference", "best_baseline",
    "delta_vs_best_baseline",
)  # fmt: skip
"""Set by :func:`jeidnn.evaluate.comparator.compare`."""
_NULL_KEYS = (
    "param", "accuracy", "cost", "gflops", "calib_accuracy", "calib_cost", "ece", "ece_temperature_scaled",
    "exit_fractions", "coverage", "set_size", "merged_groups", "resplit_miss", *_COMPARISON_KEYS,
)  # fmt: skip


def _pool_b_and_test(cand: Candidate, split: CalibSplit) -> tuple[Tensor, Tensor, Tensor]:
    """Probabilities at the exit taken, labels and exits of calib B followed by test."""
    src = cand.source
    exits = torch.cat([cand.calib_exits[split.b], cand.test_exits]).long()
    probs = torch.cat([src.probs["calib"][split.b], src.probs["test"]])
    labels = torch.cat([src.labels["calib"][split.b], src.labels["test"]])
    return select_exit(probs, exits), labels, exits


def budgeted_rows(
    methods: list[Method], split: CalibSplit, settings: Settings, cache: dict | None = None
) -> tuple[dict, dict[tuple[float, str], tuple[Candidate, ReliabilityDiagram]]]:
    """``summary.budgeted`` of report.json: one row per (budget, method), oracle excluded, and the headline.

    Each row is compared with the reference baseline at its budget (the non-learned method whose choice is
    the most accurate on val) and with the test-best baseline (favours the baselines); a reference's own
    row has delta 0 [0, 0]. ``headline`` compares the best learned method (by val) with the reference
    (:func:`jeidnn.evaluate.comparator.compare`). Bootstrap resamples use seed ``settings.seed + 1``,
    conformal re-splits ``settings.seed + 2``.

    Returns:
        The ``summary.budgeted`` dict and, per (budget, method name) with a chosen configuration, that
        candidate and its reliability diagram on test. ``cache`` (see :func:`evaluate_config`) lets a
        candidate chosen at several budgets, or evaluated again later, be evaluated once.
    """
    cache = {} if cache is None else cache
    rows: list[dict] = []
    chosen: dict[tuple[float, str], tuple[Candidate, ReliabilityDiagram]] = {}
    per_budget: list[tuple[float, list[Entry]]] = []
    for budget in settings.budgets:
        here: list[Entry] = []
        for m in methods:
            if m.kind == "oracle":
                continue
            row = {
                "budget": budget,
                "method": m.name,
                "kind": m.kind,
                "label": m.label,
                "extension": m.extension,
            }
            cands = m.candidates_at(budget)
            cand = select_config(cands, budget)
            if cand is None:
                cheapest = min((c.calib_cost for c in cands), default=m.floor_cost)
                why = (
                    "no configuration" if cheapest is None else f"cheapest configuration costs {cheapest:.3f}"
                )
                row.update(dict.fromkeys(_NULL_KEYS), reason=f"no calib-A cost <= {budget:g} ({why})")
                rows.append(row)
                continue
            point, diagram, groups = evaluate_config(cand, split, settings, cache)
            conformal = point["conformal"]
            if ("resplit", id(cand)) not in cache:
                cache[("resplit", id(cand))] = resplit_miss(
                    *_pool_b_and_test(cand, split),
                    num_exits=len(cand.costs),
                    groups=groups,
                    num_calib=len(split.b),
                    alphas=settings.alphas,
                    resplits=settings.resplits,
                    seed=settings.seed + 2,
                )
            row.update(
                param=cand.param,
                accuracy=point["accuracy"],
                cost=point["cost"],
                gflops=point["gflops"],
                calib_accuracy=cand.calib_accuracy,
                calib_cost=cand.calib_cost,
                ece=point["ece"],
                ece_temperature_scaled=point["ece_temperature_scaled"],
                exit_fractions=point["exit_fractions"],
                coverage={a: c["coverage"] for a, c in conformal.items()},
                set_size={a: c["mean_set_size"] for a, c in conformal.items()},
                merged_groups=[g for g in groups if len(g) > 1],
                resplit_miss=cache[("resplit", id(cand))],
                **dict.fromkeys(_COMPARISON_KEYS),
            )
            rows.append(row)
            chosen[(budget, m.name)] = (cand, diagram)
            test_exits = cand.test_exits.long()
            correct = cand.source.correct["test"].gather(1, test_exits[:, None]).squeeze(1)  # (N_test,)
            trained_on_val = (m.settings or {}).get("gate_data") == "val"
            here.append(Entry(row, correct, cand.val_outcome(), fitted_on_val=trained_on_val))
        per_budget.append((budget, here))
    headline = compare(per_budget, settings.bootstrap, settings.seed + 1)
    summary = {
        "budgets": list(settings.budgets),
        "calib_split": split.to_dict(),
        "bootstrap": settings.bootstrap,
        "resplits": settings.resplits,
        "rows": rows,
        "headline": headline,
    }
    return summary, chosen
