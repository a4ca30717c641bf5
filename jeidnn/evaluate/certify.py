"""Certified operating points: the cheapest configuration whose risk against the full model is at most ε, with
probability at least 1 − δ (or in expectation), proved on data that chose nothing (docs/evaluation.md,
"Guarantees").

Data roles. The budgeted-batch thresholds and ``threshold_search`` are fitted on calib half A; every other
method's candidates are fixed before calib. Each method's candidates form a sequence from the most
conservative to the cheapest by calib-A cost (:func:`jeidnn.evaluate.risk_data.sequence`); calib half A also
screens the methods that share δ; calib half B certifies; the played configuration's conformal quantiles are
fitted on val.

Example:
    >>> cert = certify(run.methods, GuaranteeConfig("accuracy_gap", 0.01, 0.1))  # doctest: +SKIP
    >>> cert.method, cert.choice.param, cert.test_risk  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jeidnn.config.schema import GuaranteeConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import Candidate
from jeidnn.evaluate.conformal import alpha_key, fit_conformal, group_exits
from jeidnn.evaluate.risk import (
    BETTING,
    PVALUES,
    RISKS,
    Counts,
    conformal_risk_control,
    fixed_sequence,
    kelly_bet,
    monotone_losses,
    smallest_epsilon,
)
from jeidnn.evaluate.risk_data import RiskData, check_names, sequence, signed_test
from jeidnn.evaluate.selection import Choice, MethodSet
from jeidnn.model.policies import select_exit

__all__ = [
    "ACROSS",
    "DEFAULT_PVALUE",
    "SCREENED",
    "Certificate",
    "certify",
    "check_guarantee",
    "method_points",
    "shared_methods",
]

DEFAULT_PVALUE = {"consistency": "binomial", "accuracy_gap": "binomial_or_betting"}
"""The p-value each risk is certified with by default (docs/evaluation.md, "Guarantees", says why)."""
ACROSS = ("screen_on_a", "bonferroni")
"""How several methods share delta: the SCREENED methods cheapest on calib A, Bonferroni over them (default),
or Bonferroni over all of them. ``expectation`` certifies the one method cheapest on calib A."""
SCREENED = 3
ANCHOR = "global_maxprob"
"""Always among the screened methods: its sequence starts at the full model (threshold ∞), so a guarantee the
full model meets stays certifiable whichever methods calib A favoured (thresholds fitted on calib A look
better there than they are)."""


@dataclass
class Walk:
    """One method's certification on one part of the data."""

    name: str
    cands: list[Candidate]
    played: int | None  # index into cands
    passed: int
    pvalue: float | None  # of the played candidate (expectation: its bound (n R + 1) / (n + 1))
    cost: float | None  # of the played candidate on the data walked on
    first_pvalue: float  # of the most conservative candidate


def walk(
    name: str,
    cands: list[Candidate],
    data: RiskData,
    g: GuaranteeConfig,
    part: list[tuple[str, Tensor | None]],
    level: float,
    test: str,
) -> Walk:
    """Fixed-sequence testing at ``level`` (high probability) or conformal risk control (expectation) of one
    method's sequence on ``part``; bets are sized on calib half A. An empty sequence certifies nothing."""
    if not cands:
        return Walk(name, cands, None, 0, None, None, 1.0)
    losses = data.losses(cands, g.risk, part)
    costs = data.costs(cands, part).mean(-1)
    n = losses.shape[-1]
    if g.kind == "expectation":
        sums = monotone_losses(losses).sum(-1).double()
        passed = int(conformal_risk_control(sums, n, g.epsilon))
        played = passed - 1 if passed else None  # CRC plays the last candidate that passes
        pvals = (sums + 1) / (n + 1)
    else:
        bet = None
        if test in BETTING:
            a = data.methods.split.a
            counts_a = Counts.of(data.losses(cands, g.risk, [("calib", a)]))
            bet = kelly_bet(counts_a.plus, counts_a.minus, len(a), g.epsilon)
        pvals = PVALUES[test](Counts.of(losses), g.epsilon, bet)
        passed = int(fixed_sequence(pvals, level))
        played = int(costs[:passed].argmin()) if passed else None  # every rejected one is valid: the cheapest
    return Walk(
        name,
        cands,
        played,
        passed,
        None if played is None else float(pvals[played]),
        None if played is None else float(costs[played]),
        float(pvals[0]),
    )


def shared_methods(
    methods: MethodSet, names: list[str], g: GuaranteeConfig, test: str, across: str, data: RiskData
) -> tuple[list[str], float]:
    """The methods certified on calib half B and the level each is tested at.

    ``screen_on_a``: the rule run on calib half A at delta ranks the methods by the cost they reach there
    (nothing certified: last, in report order); the ``SCREENED`` first, and ``ANCHOR``, share delta by
    Bonferroni (for ``expectation`` the first only: a union bound does not share an expectation). Calib A
    is independent of calib B, so the choice is fixed before the data that tests it, and val stays
    untouched for the conformal quantiles. ``bonferroni``: every method at delta / M.
    """
    expectation = g.kind == "expectation"
    if len(names) == 1 or (across == "bonferroni" and not expectation):
        return names, g.delta / len(names)
    signed = signed_test(test, g)
    part = [("calib", methods.split.a)]
    walks = [walk(n, sequence(methods, n, g.risk, data, signed), data, g, part, g.delta, test) for n in names]
    ranked = sorted(range(len(walks)), key=lambda i: (walks[i].cost is None, walks[i].cost or 0.0, i))
    chosen = [walks[i].name for i in ranked[: 1 if expectation else SCREENED]]
    if not expectation and ANCHOR in names and ANCHOR not in chosen:
        chosen.append(ANCHOR)
    return chosen, g.delta / len(chosen)


@dataclass
class Certificate:
    """The cheapest certified operating point across the methods asked for, and how it was proved."""

    guarantee: GuaranteeConfig
    method: str | None
    """The method played (None: nothing certified)."""
    choice: Choice | None
    """The played candidate (``budget`` None: chosen by the guarantee, not a budget)."""
    proof: str
    certified_risk: float
    """Its risk on the certification data (calib half B)."""
    test_risk: float
    """Its risk on test: reported, never used to choose."""
    per_method: dict = field(default_factory=dict)
    """Per method certified on calib B: the cheapest certified candidate (param, costs) or None, its p-value,
    how many candidates passed."""
    num_methods: int = 1
    """M, the methods asked for; ``per_method`` lists those that shared delta."""

    def conformal(
        self, alphas: list[float], min_samples: int
    ) -> tuple[dict[str, list[float]], list[list[int]]]:
        """Per-exit quantiles fitted on val at the exits taken, and the exit groups (from the calib-A exit
        counts, which are label-free and independent of val). Not calib: half A ordered the candidates and
        half B chose among them.

        Raises:
            JeidnnError: nothing was certified, or the run kept no val predictions.
        """
        if self.choice is None:
            raise JeidnnError("nothing was certified, so there are no conformal quantiles to fit")
        cand = self.choice.candidate
        if cand.val_exits is None:
            raise JeidnnError("this run kept no val predictions; re-run training to fit certified quantiles")
        src, num_exits = cand.source, len(cand.costs)
        counts = torch.bincount(cand.calib_exits[self.choice.split.a].long(), minlength=num_exits)
        groups = group_exits(counts, min_samples)
        exits = cand.val_exits.long()
        probs = select_exit(src.probs["val"], exits)
        quantiles = {
            alpha_key(x): fit_conformal(
                probs, src.labels["val"], exits, num_exits, x, groups=groups
            ).quantiles.tolist()
            for x in alphas
        }
        return quantiles, groups

    def test_outcome(self) -> dict[str, Any]:
        """``test_accuracy``, ``test_cost`` and ``test_exit_fractions`` of the played configuration."""
        return {} if self.choice is None else self.choice.test_outcome()

    def to_dict(self) -> dict:
        """JSON-safe (infinite thresholds stay floats: pass through ``jeidnn.io.json_safe``), for report.json
        and the model card."""
        cand = None if self.choice is None else self.choice.candidate
        g = self.guarantee
        return {
            "guarantee": {"risk": g.risk, "epsilon": g.epsilon, "delta": g.delta, "kind": g.kind},
            "method": self.method,
            "param": None if cand is None else cand.param,
            "proof": self.proof,
            "num_methods": self.num_methods,
            "certified_risk": self.certified_risk,
            "certified_cost": None if cand is None else self.per_method[self.method]["calib_b_cost"],
            "test_risk": self.test_risk,
            **self.test_outcome(),
            "per_method": self.per_method,
        }


def _proof(g: GuaranteeConfig, test: str, across: str, shared: list[str], m: int, n: int) -> str:
    if g.kind == "expectation":
        how = "conformal risk control on losses made monotone along the sequence by calib-A cost"
    else:
        how = f"Learn-Then-Test fixed-sequence by calib-A cost, {test.replace('_', '-')} p-values"
    if m == 1:
        share = "one method"
    elif g.kind == "expectation":
        share = f"{shared[0]} chosen on calib half A among {m} methods"
    elif across == "bonferroni":
        share = f"Bonferroni over {m} methods"
    else:
        share = f"Bonferroni over {len(shared)} of {m} methods screened on calib half A ({', '.join(shared)})"
    return f"{how}, {share}, certified on calib half B (n = {n})"


def certify(
    methods: MethodSet,
    guarantee: GuaranteeConfig,
    names: list[str] | None = None,
    *,
    pvalue: str | None = None,
    across: str = "screen_on_a",
    data: RiskData | None = None,
) -> Certificate:
    """Certify ``guarantee`` for the methods ``names`` (default: every method but the oracle) and play the
    cheapest certified operating point among them (by its cost on calib half B).

    Args:
        methods: a run's candidates (:func:`jeidnn.evaluate.selection.build_methods`).
        guarantee: risk, epsilon, delta and kind.
        names: the methods to certify.
        pvalue: one of :data:`jeidnn.evaluate.risk.PVALUES` (default per risk: :data:`DEFAULT_PVALUE`).
        across: how several methods share delta, one of :data:`ACROSS` (see :func:`shared_methods`).
        data: losses already computed for this run (the evaluation shares them with the re-split check).

    Raises:
        JeidnnError: a bad risk, epsilon or delta; an unknown method or the oracle; a guarantee no candidate
            meets (naming the smallest eps the most conservative candidate of some method passes at this
            delta).
    """
    test = check_guarantee(guarantee, pvalue, across)
    names = check_names(methods, names)
    data = data or RiskData(methods)
    shared, level = shared_methods(methods, names, guarantee, test, across, data)
    part = [("calib", methods.split.b)]
    signed = signed_test(test, guarantee)
    walks = [
        walk(n, sequence(methods, n, guarantee.risk, data, signed), data, guarantee, part, level, test)
        for n in shared
    ]
    per_method = {w.name: _method_entry(w) for w in walks}
    proof = _proof(guarantee, test, across, shared, len(names), len(methods.split.b))
    done = [w for w in walks if w.played is not None]
    if not done:
        raise JeidnnError(_nothing_certified(walks, data, guarantee, part, level, test))
    best = min(done, key=lambda w: w.cost)
    cand = best.cands[best.played]
    choice = Choice(methods.specs[best.name], None, cand, methods.split)
    risk_b = float(data.losses([cand], guarantee.risk, part).double().mean())
    risk_test = float(data.losses([cand], guarantee.risk, [("test", None)]).double().mean())
    return Certificate(guarantee, best.name, choice, proof, risk_b, risk_test, per_method, len(names))


def check_guarantee(g: GuaranteeConfig, pvalue: str | None = None, across: str = "screen_on_a") -> str:
    """Refuse a bad risk, epsilon, delta, kind, p-value or rule in one line; return the p-value's name."""
    if g.risk not in RISKS:
        raise JeidnnError(f"unknown risk {g.risk!r}; choose one of {', '.join(RISKS)}")
    for key in ("epsilon", "delta"):
        value = getattr(g, key)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 1):
            raise JeidnnError(f"{key} must lie in (0, 1), got {value!r}")
    if g.kind not in ("high_probability", "expectation"):
        raise JeidnnError(f"unknown guarantee kind {g.kind!r}; choose high_probability or expectation")
    test = pvalue or DEFAULT_PVALUE[g.risk]
    if test not in PVALUES:
        raise JeidnnError(f"unknown p-value {test!r}; choose one of {', '.join(PVALUES)}")
    if across not in ACROSS:
        raise JeidnnError(f"unknown rule across methods {across!r}; choose one of {', '.join(ACROSS)}")
    return test


def method_points(
    methods: MethodSet,
    guarantee: GuaranteeConfig,
    names: list[str] | None = None,
    *,
    pvalue: str | None = None,
    data: RiskData | None = None,
) -> dict[str, dict]:
    """Each method certified alone at delta on calib half B: its cheapest certified candidate (``param``,
    ``calib_a_cost``, ``calib_b_cost``, ``pvalue``; None where nothing passes), ``test_cost`` and
    ``test_risk``. Each line is a valid statement on its own; taken together they share no delta."""
    test = check_guarantee(guarantee, pvalue)
    names = check_names(methods, names)
    data = data or RiskData(methods)
    signed, part = signed_test(test, guarantee), [("calib", methods.split.b)]
    out = {}
    for name in names:
        w = walk(
            name,
            sequence(methods, name, guarantee.risk, data, signed),
            data,
            guarantee,
            part,
            guarantee.delta,
            test,
        )
        entry = {**_method_entry(w), "test_cost": None, "test_risk": None}
        if w.played is not None:
            cand = [w.cands[w.played]]
            entry["test_cost"] = float(data.costs(cand, [("test", None)]).mean())
            entry["test_risk"] = float(data.losses(cand, guarantee.risk, [("test", None)]).double().mean())
        out[name] = entry
    return out


def _method_entry(w: Walk) -> dict:
    entry: dict[str, Any] = {"candidates": len(w.cands), "passed": w.passed, "first_pvalue": w.first_pvalue}
    if w.played is None:
        return {**entry, "param": None, "calib_a_cost": None, "calib_b_cost": None, "pvalue": None}
    cand = w.cands[w.played]
    return {
        **entry,
        "param": cand.param,
        "calib_a_cost": cand.calib_cost,
        "calib_b_cost": w.cost,
        "pvalue": w.pvalue,
    }


def _nothing_certified(walks: list[Walk], data: RiskData, g: GuaranteeConfig, part, level, test) -> str:
    best_eps, best_name = None, None
    for w in walks:

        def passes(eps: float, first=w.cands[:1], name=w.name) -> bool:
            trial = GuaranteeConfig(g.risk, eps, g.delta, g.kind)
            return walk(name, first, data, trial, part, level, test).played is not None

        eps = smallest_epsilon(passes)
        if eps is not None and (best_eps is None or eps < best_eps):
            best_eps, best_name = eps, w.name
    at = f"at delta {g.delta:g}" if g.kind == "high_probability" else "in expectation"
    where = (
        "no candidate passes at any epsilon"
        if best_eps is None
        else f"the smallest epsilon certifiable {at} is {best_eps:.4f} ({best_name}'s most conservative "
        "configuration)"
    )
    return (
        f"nothing meets {g.risk} <= {g.epsilon:g} on calib half B for {', '.join(w.name for w in walks)}: "
        f"{where}; raise --epsilon"
    )
