"""What the evaluation chose: every method's candidates of a run, and its configuration at each budget.

:func:`build_methods` builds each method's candidates from a run's cached predictions, as the registry
(:mod:`jeidnn.evaluate.methods`) says; :meth:`MethodSet.choose` plays the budgeted protocol's choice for one
method and budget (:func:`jeidnn.evaluate.budgeted.select_config`); :class:`Evaluation` is what
:func:`jeidnn.evaluate.evaluation.evaluate` returns: the report dict and the :class:`Choice` of every
(budget, method) row. Export plays a :class:`Choice`; it never builds candidates itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import CalibSplit, Candidate, Method, select_config, split_calib
from jeidnn.evaluate.candidates import Inputs, learned_candidates
from jeidnn.evaluate.conformal import fit_at_exits
from jeidnn.evaluate.methods import MethodSpec, learned_spec, run_baselines
from jeidnn.evaluate.metrics import exit_outcome
from jeidnn.evaluate.predictions import RunPredictions

__all__ = ["Choice", "Evaluation", "MethodSet", "build_methods"]


@dataclass
class Choice:
    """The configuration one method plays at one budget, chosen on calib half A."""

    spec: MethodSpec
    budget: float | None
    """The calib-A cost budget it was chosen within; None when it was fixed otherwise (``--lam``)."""
    candidate: Candidate
    """Its exits on calib and test, the predictions they read, calib-A accuracy and cost, and ``uses``."""
    split: CalibSplit

    @property
    def method(self) -> str:
        return self.spec.name

    @property
    def param(self) -> Any:
        """As in report.json: p, threshold, patience, layer, ``{"model", "lambda", "tau"}``..."""
        return self.candidate.param

    @property
    def uses(self) -> dict:
        """What its gates need: ``thresholds`` and ``measure``, ``patience``, ``exit`` (learned: empty)."""
        return self.candidate.uses

    @property
    def model_index(self) -> int | None:
        """The learned model it reads (learned methods and thresholds on learned IMs), else None."""
        param = self.param
        return param["model"] if isinstance(param, dict) and "model" in param else None

    @property
    def lam(self) -> float | None:
        return self.param.get("lambda") if self.model_index is not None else None

    @property
    def tau(self) -> float | None:
        """A learned method's exit threshold, else None."""
        return float(self.param["tau"]) if self.spec.report_kind == "learned" else None

    @property
    def calib_accuracy(self) -> float:
        return self.candidate.calib_accuracy

    @property
    def calib_cost(self) -> float:
        return self.candidate.calib_cost

    def test_outcome(self) -> dict[str, Any]:
        """Accuracy, cost and exit fractions on test, as the evaluation computes them."""
        cand = self.candidate
        outcome = exit_outcome(cand.source.correct["test"], cand.test_exits, cand.costs)
        return {f"test_{k}": v for k, v in outcome.items()}

    def conformal(
        self, alphas: list[float], min_samples: int
    ) -> tuple[dict[str, list[float]], list[list[int]]]:
        """Per-exit quantiles fitted on calib half B and the exit groups (from calib A), as the evaluation
        fits them for this configuration."""
        cand, split = self.candidate, self.split
        src = cand.source
        calib = (src.probs["calib"], src.labels["calib"], cand.calib_exits)
        return fit_at_exits(*calib, split.a, split.b, len(cand.costs), alphas, min_samples)

    def rule_gates(self) -> Any:
        """The parameter-free gates that take exactly this configuration's exits (non-learned methods)."""
        return self.spec.rule_gates(self.uses)


@dataclass
class MethodSet:
    """Every method of a run with its candidates, in report order."""

    methods: list[Method]
    specs: dict[str, MethodSpec]
    split: CalibSplit
    inputs: Inputs
    temperatures: dict

    def __getitem__(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def choose(self, name: str, budget: float, candidates: list[Candidate] | None = None) -> Choice | None:
        """The budgeted protocol's choice of ``name`` at ``budget`` (among ``candidates``, default all of
        the method's); None when no candidate meets the budget on calib A."""
        cands = self[name].candidates_at(budget) if candidates is None else candidates
        cand = select_config(cands, budget)
        return None if cand is None else Choice(self.specs[name], budget, cand, self.split)


@dataclass
class Evaluation:
    """What :func:`jeidnn.evaluate.evaluation.evaluate` returns."""

    report: dict
    """The JSON-safe report dict (report.json's content)."""
    methods: MethodSet
    chosen: dict[tuple[float, str], Choice]
    """Per (budget, method) row of ``summary.budgeted`` with a configuration: what it played."""

    def choice(self, method: str, budget: float) -> Choice | None:
        """What ``method`` plays at ``budget``: the row's choice, or the same selection at another budget."""
        if (budget, method) in self.chosen:
            return self.chosen[(budget, method)]
        return self.methods.choose(method, budget)


def build_methods(
    report: dict,
    predictions: RunPredictions,
    cfg: Any,
    seed: int,
    temperatures: bool = True,
) -> MethodSet:
    """Every method's candidates on a run's cached predictions, learned methods first.

    Args:
        report: report.json's content (``exits``, optional ``learned``).
        predictions: the warm-up exits' and each learned model's predictions.
        cfg: the run's ``EvalConfig`` (``threshold_ps``, ``global_thresholds``, ``patience_values``).
        seed: the run's seed, which cuts calib into halves A and B.
        temperatures: fit each source's temperatures on calib B (the evaluation's ECE; not needed to choose).

    Raises:
        JeidnnError: a report entry is malformed, or the predictions do not fit it.
    """
    costs = list(report["exits"]["cost"])
    num_exits = len(costs)
    layers = report["exits"].get("layers") or list(range(1, num_exits + 1))
    warm = predictions.warmup_source(num_exits)
    split = split_calib(len(warm.labels["calib"]), seed)
    if temperatures:
        warm.fit_temperatures_on(split)
    learned = report.get("learned") or {}
    x = Inputs(warm, costs, layers, split, cfg, learned)
    fitted: dict[str, Any] = {"warmup": warm.temperatures.tolist() if temperatures else None, "learned": {}}
    methods, specs = [], {}
    for name, entry in learned.items():
        sources = predictions.learned_sources(report, name)
        for src in sources:
            if not torch.equal(src.labels["calib"], warm.labels["calib"]):
                raise JeidnnError(
                    f"{src.name}: calib labels differ from the warm-up predictions'; re-run training"
                )
            if temperatures:
                src.fit_temperatures_on(split)
        x.sources[name] = sources
        fitted["learned"][name] = [src.temperatures.tolist() for src in sources] if temperatures else None
        specs[name] = spec = learned_spec(name, entry)
        cands = learned_candidates(entry, sources, split)
        extension, settings = bool(entry.get("extension", False)), entry.get("settings")
        methods.append(Method(name, "learned", spec.label, cands, extension=extension, settings=settings))
    for spec in run_baselines(learned):
        specs[spec.name] = spec
        cands = spec.candidates(x)
        method = Method(spec.name, spec.report_kind, spec.label, cands, envelope_points=spec.envelope_points)
        if spec.name == "threshold_search":
            # The search starts from the global thresholds: it offers nothing cheaper than their cheapest.
            start = next(m for m in methods if m.name == "global_maxprob")
            method.floor_cost = min(c.calib_cost for c in start.candidates)
        methods.append(method)
    return MethodSet(methods, specs, split, x, fitted)
