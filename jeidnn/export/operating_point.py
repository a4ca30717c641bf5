"""Which configuration a method plays at a cost budget: the one the run's budgeted evaluation chose.

The evaluation (docs/evaluation.md) plays, for a budget ``B``, each method's candidate with the best accuracy
on calib half A among those whose calib-A cost is at most ``B``, and returns that choice
(:class:`jeidnn.evaluate.selection.Choice`). :func:`choose` hands it to export: from the evaluation in memory
after ``python train.py``, or, for a finished run folder, from the evaluation's own selection run once on the
run's predictions (:meth:`jeidnn.evaluate.predictions.RunPredictions.read`,
:func:`jeidnn.evaluate.selection.build_methods`). So an exported model leaves where the
method's row of report.md at that budget leaves.

Example:
    >>> run = Run.open("runs/default")  # doctest: +SKIP
    >>> point = choose(run, "threshold_search", budget=0.5)  # doctest: +SKIP
    >>> point.param, point.candidate.calib_cost  # doctest: +SKIP

Which method a run exports by default (``export.selection``) is :mod:`jeidnn.export.selection`'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from jeidnn.config.parser import config_from_dict, read_config_file
from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import CalibSplit, Candidate
from jeidnn.evaluate.methods import REGISTRY, exportable_names
from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.evaluate.selection import Choice, Evaluation, MethodSet, build_methods

__all__ = ["OperatingPoint", "OverBudget", "Run", "choose"]

_REL_TOL = 1e-9  # a λ matches a trained one up to float noise


class OverBudget(JeidnnError):
    """No configuration of the method meets the cost budget on calib half A."""


@dataclass
class Run:
    """A finished run as export reads it: its folder, report.json, config and what its evaluation chose."""

    folder: Path
    report: dict
    cfg: RunConfig
    evaluation: Evaluation | None = None
    """The evaluation in memory (the training run); without it the selection is run on the predictions."""

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
        data = read_config_file(folder / "config.yaml")
        export = data.get("export")
        if isinstance(export, dict) and export.get("method") and "selection" not in export:
            # Written before export.selection existed, when export.method alone named the exported method.
            data["export"] = {**export, "selection": "method"}
        return cls(folder, report, config_from_dict(data))

    @property
    def learned(self) -> dict[str, dict]:
        return self.report.get("learned") or {}

    @property
    def costs(self) -> list[float]:
        """``exits.cost``: what every non-learned method pays at each exit."""
        return list(self.report["exits"]["cost"])

    @cached_property
    def methods(self) -> MethodSet:
        """Every method's candidates: the evaluation's, or built once by the evaluation's own code."""
        if self.evaluation is not None:
            return self.evaluation.methods
        predictions = RunPredictions.read(self.report, self.folder)
        return build_methods(self.report, predictions, self.cfg.eval, self.cfg.seed, temperatures=False)

    @property
    def split(self) -> CalibSplit:
        return self.methods.split

    def choice(self, method: str, budget: float) -> Choice | None:
        """What the evaluation plays for ``method`` at ``budget`` (None: nothing meets it on calib A)."""
        if self.evaluation is not None:
            return self.evaluation.choice(method, budget)
        return self.methods.choose(method, budget)


@dataclass
class OperatingPoint:
    """One configuration of one method of a run, and how it was chosen."""

    choice: Choice
    chosen_by: str
    by_lambda: bool = False
    """The model was fixed by λ, so this is not necessarily the evaluation's row at ``budget``."""
    selection: str = "method"
    """``export.selection`` that chose it: ``budget``, ``guarantee`` or ``method`` (one named method)."""
    considered: list[dict] = field(default_factory=list)
    """The methods the selection compared (``budget``: each one's calib-A choice and its val outcome)."""
    certificate: Any = None
    """``selection: guarantee``: the certificate (:mod:`jeidnn.evaluate.certify`) it was chosen by."""

    @property
    def method(self) -> str:
        return self.choice.method

    @property
    def kind(self) -> str:
        """``learned``, ``threshold``, ``patience`` or ``static`` (report.json's ``kind``)."""
        return self.choice.spec.report_kind

    @property
    def label(self) -> str:
        return self.choice.spec.label

    @property
    def candidate(self) -> Candidate:
        return self.choice.candidate

    @property
    def budget(self) -> float | None:
        """The calib-A cost budget it was chosen within; None for a ``native`` learned model fixed by λ."""
        return self.choice.budget

    @property
    def param(self) -> Any:
        return self.choice.param

    def test_metrics(self) -> dict[str, Any]:
        """Accuracy, cost and exit fractions on test, as the evaluation computes them."""
        return self.choice.test_outcome()

    def val_metrics(self) -> dict[str, float | None]:
        """``val_accuracy`` and ``val_cost`` (None for a run folder without val predictions)."""
        val = self.candidate.val_outcome() or {"accuracy": None, "cost": None}
        return {"val_accuracy": val["accuracy"], "val_cost": val["cost"]}

    def conformal(self, alphas: list[float], min_samples: int) -> tuple[dict[str, list[float]], list]:
        """Per-exit conformal quantiles and exit groups: the certificate's (fitted on val, since calib
        chose the operating point), else the evaluation's (calib half B, groups from calib half A)."""
        if self.certificate is not None:
            return self.certificate.conformal(alphas, min_samples)
        return self.choice.conformal(alphas, min_samples)

    @property
    def conformal_fit(self) -> str:
        """Where :meth:`conformal` fits the quantiles, in words."""
        if self.certificate is not None:
            return "val (calib chose and certified the operating point), exit groups from calib-A exit counts"
        return "calib half B, exit groups from the calib-A exit counts"


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


def _by_lambda(run: Run, method: str, lam: float, budget: float) -> tuple[OperatingPoint | None, list]:
    """A ``--lam`` choice and the candidates it chose among. Not an evaluation row (it fixes the model): the
    evaluation's candidates of that model, and the evaluation's selection among them."""
    if method not in run.learned:
        raise JeidnnError(
            f"--lam picks a trained model of a learned method; {method!r} is not one: use --budget"
        )
    entry = run.learned[method]
    k = _model_of_lambda(method, entry, lam)
    cands = [c for c in run.methods[method].candidates_at(budget) if c.param["model"] == k]
    if entry["operating_point"] == "native":
        (cand,) = cands  # a native method has one candidate per model: its own exit threshold
        choice = Choice(run.methods.specs[method], None, cand, run.split)
        return OperatingPoint(choice, f"λ = {lam!r} (--lam)", by_lambda=True), cands
    choice = run.methods.choose(method, budget, cands)
    chosen_by = (
        f"λ = {lam!r} (--lam), exit threshold most accurate on calib half A with calib-A cost <= {budget:g}"
    )
    return (None if choice is None else OperatingPoint(choice, chosen_by, by_lambda=True)), cands


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
    spec = REGISTRY.get(method)
    if spec is not None and not spec.exportable:
        raise JeidnnError(f"method {method!r} cannot be exported: {spec.note}")
    names = exportable_names(run.learned)
    if method not in names:
        raise JeidnnError(f"unknown method {method!r}; this run can export: {', '.join(names)}")
    budget = run.cfg.export.cost_budget if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise JeidnnError(f"the cost budget must be a positive number, got {budget}")
    m = run.methods[method]
    if lam is not None:
        point, cands = _by_lambda(run, method, lam, budget)
    else:
        choice, cands = run.choice(method, budget), m.candidates_at(budget)
        chosen_by = f"most accurate on calib half A with calib-A cost <= {budget:g}"
        point = None if choice is None else OperatingPoint(choice, chosen_by)
    if point is None:
        floor = m.floor_cost if m.floor_cost is not None else min(run.costs)
        cheapest = min((c.calib_cost for c in cands), default=floor)
        # With --lam the budget is the run's export.cost_budget (--budget and --lam exclude each other).
        fix = "pass another --lam, or --budget without --lam" if lam is not None else "raise --budget"
        raise OverBudget(
            f"{method!r} cannot meet cost budget {budget:g} on calib half A: its lowest reachable calib cost "
            f"is {cheapest:.4f}; {fix}"
        )
    return point
