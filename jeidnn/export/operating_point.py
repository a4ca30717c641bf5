"""Which configuration a method plays at a cost budget, chosen as the budgeted evaluation chooses it.

The evaluation (docs/evaluation.md) builds each method's candidate configurations from a run's cached
predictions and plays, for a budget ``B``, the one with the best accuracy on calib half A among those whose
calib-A cost is at most ``B`` (:func:`jeidnn.evaluate.budgeted.select_config`). :func:`choose` makes that same
choice for one method of a finished run, from the evaluation's own candidate builders, so an exported
model leaves where the method's row of report.md at that budget leaves. :meth:`OperatingPoint.rule_gates`
turns a baseline's chosen parameter back into the gates that play it, and
:meth:`OperatingPoint.conformal_quantiles` fits its quantiles on calib half B as the evaluation does.

Example:
    >>> run = Run.open("runs/default")  # doctest: +SKIP
    >>> point = choose(run, "threshold_search", budget=0.5)  # doctest: +SKIP
    >>> point.param, point.candidate.calib_cost  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from jeidnn.config.parser import load_config
from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import (
    CalibSplit,
    Candidate,
    Method,
    Source,
    conformal_groups,
    learned_candidates,
    load_learned_sources,
    load_source,
    select_config,
    split_calib,
)
from jeidnn.evaluate.conformal import alpha_key, fit_conformal
from jeidnn.evaluate.metrics import ExitHistogram, ExpectedCost
from jeidnn.model import policies as bl

__all__ = ["NOT_EXPORTABLE", "OperatingPoint", "OverBudget", "Run", "choose", "default_choice"]

NOT_EXPORTABLE = {"oracle": "it picks each sample's exit by reading its label (an upper bound, not a method)"}
DERIVED, DERIVED_FROM = "jeidnn_ims_threshold_maxprob", "jeidnn_paper"
"""The baseline that puts max-prob thresholds on the IMs of the learned method ``jeidnn_paper``."""
_REL_TOL = 1e-9  # a λ matches a trained one up to float noise


class OverBudget(JeidnnError):
    """No configuration of the method meets the cost budget on calib half A."""


@dataclass
class Run:
    """A finished run as the choice reads it: its folder, report.json and config."""

    folder: Path
    report: dict
    cfg: RunConfig
    tensors: Mapping[str, Mapping[str, Tensor]] | None = None
    """Predictions already in memory (the training run), keyed by file relative to ``folder``."""

    @classmethod
    def open(cls, folder: str | Path) -> Run:
        """Read ``runs/<name>/``; a missing or unfinished run folder is a one-line JeidnnError."""
        folder = Path(folder)
        if not folder.is_dir():
            raise JeidnnError(f"run folder {folder} does not exist; pass the folder a training run wrote")
        report_path = folder / "report.json"
        if not report_path.is_file():
            raise JeidnnError(f"{folder} is not a finished run (no report.json); re-run training for it")
        try:
            report = json.loads(report_path.read_text())
            report["exits"]["cost"], report["exits"]["layers"], report["dataset"]["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise JeidnnError(f"{report_path} is malformed ({exc!r}); re-run training for this run") from None
        if not (folder / "config.yaml").is_file():
            raise JeidnnError(f"{folder / 'config.yaml'} not found; re-run training for this run")
        return cls(folder, report, load_config(folder / "config.yaml"))

    @property
    def learned(self) -> dict[str, dict]:
        return self.report.get("learned") or {}

    @property
    def costs(self) -> list[float]:
        """``exits.cost``: what every non-learned method pays at each exit."""
        return list(self.report["exits"]["cost"])

    @cached_property
    def warm(self) -> Source:
        """The warm-up IMs' predictions, which the baselines read."""
        rel = "predictions/warmup.safetensors"
        return load_source(self.folder, rel, len(self.costs), False, self.tensors)

    @cached_property
    def split(self) -> CalibSplit:
        return split_calib(len(self.warm.labels["calib"]), self.cfg.seed)

    def method_names(self) -> list[str]:
        """Every method a model can be exported for, in report order."""
        from jeidnn.evaluate.evaluation import METHODS

        derived_ok = DERIVED_FROM in self.learned
        baselines = [m for m in METHODS if m not in NOT_EXPORTABLE and (m != DERIVED or derived_ok)]
        return [*self.learned, *baselines]

    def method(self, name: str) -> Method:
        """The method's candidates, built by the evaluation's own code on this run's predictions."""
        # Reused rather than repeated, so the choice here cannot drift from the evaluation's.
        from jeidnn.evaluate.evaluation import METHODS, baseline_methods, geometric_candidates, model_tag

        if name in self.learned:
            entry = self.learned[name]
            sources = load_learned_sources(self.report, self.folder, name, self.tensors)
            cands = learned_candidates(entry, sources, self.split)
            return Method(name, "learned", entry.get("label", name), cands, settings=entry.get("settings"))
        if name == DERIVED:
            entry, ps = self.learned[DERIVED_FROM], list(self.cfg.eval.threshold_ps)
            sources = load_learned_sources(self.report, self.folder, DERIVED_FROM, self.tensors)
            cands = []
            for k, (model, src) in enumerate(zip(entry["models"], sources, strict=True)):
                cands += geometric_candidates(
                    src, self.costs, self.split, "maxprob", ps, model_tag(k, model.get("lambda"))
                )
            return Method(name, *METHODS[name], cands)
        layers = list(self.report["exits"]["layers"])
        methods, _ = baseline_methods(self.warm, self.costs, layers, self.split, self.cfg.eval)
        return next(m for m in methods if m.name == name)


@dataclass
class OperatingPoint:
    """One configuration of one method of a run, and how it was chosen."""

    method: str
    kind: str
    """``learned``, ``threshold``, ``patience`` or ``static``."""
    label: str
    candidate: Candidate
    """Its exits on calib and test, the predictions they read, calib-A accuracy and cost."""
    budget: float | None
    """The calib-A cost budget it was chosen within; None for a ``native`` learned model fixed by λ."""
    chosen_by: str
    by_lambda: bool = False
    """The model was fixed by λ, so this is not necessarily the evaluation's row at ``budget``."""

    @property
    def param(self) -> Any:
        """As in report.json: p, threshold, patience, layer, ``{"model", "lambda", "tau"}``..."""
        return self.candidate.param

    def test_metrics(self) -> dict[str, Any]:
        """Accuracy, cost and exit fractions on test, computed as the evaluation computes them."""
        cand = self.candidate
        exits = cand.test_exits.long()
        cost, hist = ExpectedCost(cand.costs), ExitHistogram(len(cand.costs))
        cost.update(exits)
        hist.update(exits)
        correct = cand.source.correct["test"].gather(1, exits[:, None]).squeeze(1)
        return {
            "test_accuracy": float(correct.double().mean()),
            "test_cost": float(cost.compute()),
            "test_exit_fractions": hist.compute().tolist(),
        }

    def rule_gates(self, split: CalibSplit, num_exits: int, layers: list[int]) -> nn.Module:
        """The parameter-free gates of a baseline that take exactly this candidate's exits."""
        from jeidnn.model.early_exit import PatienceGates, StaticGates, ThresholdGates

        name, param = self.method, self.param
        if name == DERIVED:
            return ThresholdGates(self._budgeted_thresholds(split, "maxprob", param["p"]), "maxprob")
        if name in ("threshold_maxprob", "threshold_entropy", "threshold_margin"):
            measure = name.removeprefix("threshold_")
            return ThresholdGates(self._budgeted_thresholds(split, measure, param), measure)
        if name == "global_maxprob":
            return ThresholdGates([float(param)] * (num_exits - 1), "maxprob")
        if name == "threshold_search":
            return ThresholdGates(param["thresholds"], "maxprob")
        if name == "patience":
            return PatienceGates(int(param))
        if name == "static":
            return StaticGates(layers.index(param))  # param: the 1-based backbone layer
        raise AssertionError(f"{name!r} has no rule gates")

    def _budgeted_thresholds(self, split: CalibSplit, measure: str, p: float) -> Tensor:
        # The evaluation's budgeted-batch fit for this p, on the same calib-A confidences.
        conf = bl.confidence(self.candidate.source.probs["calib"], measure)[split.a]  # (N_a, L)
        return bl.fit_budgeted_thresholds(conf, bl.geometric_exit_distribution(p, conf.shape[1]))

    def conformal_quantiles(
        self, split: CalibSplit, alphas: list[float], min_samples: int
    ) -> tuple[dict[str, list[float]], list[list[int]]]:
        """Per-exit quantiles ``{alpha_key: [q_1 .. q_L]}`` fitted on calib half B and the exit groups
        (from the calib-A exit counts), as the evaluation fits them for this configuration."""
        cand = self.candidate
        num_exits = len(cand.costs)
        groups = conformal_groups(cand, split, num_exits, min_samples)
        exits_b = cand.calib_exits[split.b].long()
        probs_b = bl.select_exit(cand.source.probs["calib"][split.b], exits_b)  # (N_b, C) at the exit taken
        labels_b = cand.source.labels["calib"][split.b]
        quantiles = {}
        for a in alphas:
            fitted = fit_conformal(probs_b, labels_b, exits_b, num_exits, a, groups=groups)
            quantiles[alpha_key(a)] = fitted.quantiles.tolist()
        return quantiles, groups


def _model_of_lambda(method: str, entry: dict, lam: float) -> int:
    if not math.isfinite(lam):
        raise JeidnnError(f"--lam must be a finite number, got {lam}")
    lams = [m.get("lambda") for m in entry["models"]]
    k = min(range(len(lams)), key=lambda i: math.inf if lams[i] is None else abs(lams[i] - lam))
    if lams[k] is None or abs(lams[k] - lam) > _REL_TOL * max(abs(lam), abs(lams[k])):
        raise JeidnnError(
            f"learned method {method!r} has no model trained with λ = {lam!r}; its λ values are "
            f"{', '.join(repr(x) for x in lams)}: pass one of them to --lam"
        )
    return k


def choose(run: Run, method: str, budget: float | None = None, lam: float | None = None) -> OperatingPoint:
    """The configuration ``method`` plays at ``budget`` (default ``export.cost_budget``) on calib half A.

    With ``lam`` (learned methods only, instead of a budget) the model trained with that λ is fixed: a
    ``native`` method plays it at its own exit threshold, a ``calib_threshold`` one at the threshold that is
    most accurate on calib half A within ``export.cost_budget``.

    Raises:
        JeidnnError: an unknown or unexportable method, ``budget`` and ``lam`` together, a λ no model was
            trained with; :class:`OverBudget` when no configuration meets the budget on calib half A.
    """
    if budget is not None and lam is not None:
        raise JeidnnError(
            "pass --budget or --lam, not both: --lam fixes the model and uses export.cost_budget"
        )
    if method in NOT_EXPORTABLE:
        raise JeidnnError(f"method {method!r} cannot be exported: {NOT_EXPORTABLE[method]}")
    names = run.method_names()
    if method not in names:
        raise JeidnnError(f"unknown method {method!r}; this run can export: {', '.join(names)}")
    budget = run.cfg.export.cost_budget if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise JeidnnError(f"the cost budget must be a positive number, got {budget}")
    m = run.method(method)
    cands = m.candidates_at(budget)
    chosen_by = f"most accurate on calib half A with calib-A cost <= {budget:g}"
    if lam is not None:
        if m.kind != "learned":
            raise JeidnnError(
                f"--lam picks a trained model of a learned method; {method!r} is not one: use --budget"
            )
        entry = run.learned[method]
        k = _model_of_lambda(method, entry, lam)
        cands = [c for c in cands if c.param["model"] == k]
        if entry["operating_point"] == "native":
            (cand,) = cands  # a native method has one candidate per model: its own exit threshold
            return OperatingPoint(method, m.kind, m.label, cand, None, f"λ = {lam!r} (--lam)", by_lambda=True)
        chosen_by = f"λ = {lam!r} (--lam), exit threshold {chosen_by}"
    chosen = select_config(cands, budget)
    if chosen is None:
        # threshold_search offers nothing below the cost of sending everyone to the first exit.
        cheapest = min((c.calib_cost for c in cands), default=min(run.costs))
        # With --lam the budget is the run's export.cost_budget (--budget and --lam exclude each other).
        fix = "pass another --lam, or --budget without --lam" if lam is not None else "raise --budget"
        raise OverBudget(
            f"{method!r} cannot meet cost budget {budget:g} on calib half A: its lowest reachable calib cost "
            f"is {cheapest:.4f}; {fix}"
        )
    return OperatingPoint(method, m.kind, m.label, chosen, budget, chosen_by, by_lambda=lam is not None)


def default_choice(run: Run, budget: float | None = None) -> OperatingPoint:
    """What ``python train.py`` exports: ``export.method`` at ``budget`` (default ``export.cost_budget``), or
    else the learned method whose choice is the most accurate on calib half A (ties: lower calib-A cost,
    then report order)."""
    budget = run.cfg.export.cost_budget if budget is None else budget
    names = [run.cfg.export.method] if run.cfg.export.method else list(run.learned)
    if not names:
        raise JeidnnError(f"{run.folder} has no learned methods (jeidnn was off); pass --method")
    points = []
    for name in names:
        try:
            points.append(choose(run, name, budget))
        except OverBudget:
            if run.cfg.export.method:
                raise
    if not points:
        raise JeidnnError(
            f"no learned method reaches calib cost <= {budget:g} on calib half A; raise the budget"
        )
    best = max(points, key=lambda p: (p.candidate.calib_accuracy, -p.candidate.calib_cost))
    if not run.cfg.export.method:
        best.chosen_by = (
            f"most accurate learned operating point on calib half A with calib cost <= {budget:g}"
        )
    return best
