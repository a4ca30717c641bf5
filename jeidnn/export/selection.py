"""Which operating point a run exports: ``export.selection`` (docs/usage.md, "Which model is exported").

* ``budget`` (the default): every exportable method, learned or baseline, plays the budgeted protocol's
  choice within ``export.cost_budget`` (:meth:`jeidnn.export.operating_point.Run.choice`: the configuration
  most accurate on calib half A within the budget), and the method whose choice is the most accurate on
  **val** is exported (ties: lower val cost, then report order). Val, not calib A: ``threshold_search``
  maximises calib-A accuracy directly, so on calib A it would win by construction; no threshold, τ or λ
  was chosen on val, and test stays unseen.
* ``method``: the method ``export.method`` (or ``--method``) names, at the budget
  (:func:`jeidnn.export.operating_point.choose`).
* ``guarantee``: the cheapest operating point certified for ``export.guarantee``
  (:func:`jeidnn.evaluate.certify.certify`); its conformal quantiles are fitted by the certificate.

Example:
    >>> point = select(Run.open("runs/default"))  # doctest: +SKIP
    >>> point.method, point.chosen_by, point.considered[0]["val_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

from jeidnn.config.schema import GuaranteeConfig, RunConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.methods import exportable_names
from jeidnn.evaluate.selection import Choice
from jeidnn.export.operating_point import OperatingPoint, OverBudget, Run, choose
from jeidnn.io import json_safe

__all__ = ["SELECTIONS", "best_on_val", "certified", "check_selection", "default_choice", "select"]

SELECTIONS = ("budget", "guarantee", "method")


def _certify_function() -> Any:
    """:func:`jeidnn.evaluate.certify.certify`, or a one-line error where this installation lacks it."""
    try:
        from jeidnn.evaluate.certify import certify
    except ModuleNotFoundError as exc:
        if exc.name != "jeidnn.evaluate.certify":
            raise
        raise JeidnnError(
            "export.selection guarantee needs jeidnn.evaluate.certify, which this installation lacks; "
            "use export.selection budget or method"
        ) from None
    return certify


def check_selection(cfg: RunConfig) -> None:
    """Refuse, before any work, a selection this installation cannot play."""
    if cfg.export.selection == "guarantee":
        _certify_function()


def _budget(run: Run, budget: float | None) -> float:
    budget = run.cfg.export.cost_budget if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise JeidnnError(f"the cost budget must be a positive number, got {budget}")
    return budget


def _cheapest(run: Run, name: str, budget: float) -> float | None:
    """The lowest calib-A cost ``name`` reaches (its floor where it offers nothing at ``budget``)."""
    m = run.methods[name]
    return min((c.calib_cost for c in m.candidates_at(budget)), default=m.floor_cost)


def _row(choice: Choice) -> dict:
    """What the selection saw of one method's choice: its configuration, calib-A and val outcomes."""
    val = choice.candidate.val_outcome() or {"accuracy": None, "cost": None}
    return {
        "method": choice.method,
        "label": choice.spec.label,
        "param": json_safe(choice.param),
        "calib_accuracy": choice.calib_accuracy,
        "calib_cost": choice.calib_cost,
        "val_accuracy": val["accuracy"],
        "val_cost": val["cost"],
    }


def _why(rows: list[dict], best: int, budget: float) -> str:
    """The chosen-by line of a ``budget`` selection: the rule, the winner's val numbers, the runner-up."""
    won = rows[best]
    line = (
        f"most accurate on val ({won['val_accuracy']:.4f} at val cost {won['val_cost']:.4f}) among the "
        f"calib-A choices of {len(rows)} methods within calib cost <= {budget:g}"
    )
    others = [r for i, r in enumerate(rows) if i != best]
    if others:
        second = max(others, key=lambda r: (r["val_accuracy"], -r["val_cost"]))
        line += f"; next: {second['method']} ({second['val_accuracy']:.4f})"
        if second["val_accuracy"] == won["val_accuracy"]:
            tie = "lower val cost" if second["val_cost"] != won["val_cost"] else "earlier in report order"
            line += f", a tie broken by {tie}"
    return line


def best_on_val(run: Run, budget: float | None = None) -> OperatingPoint:
    """``selection: budget``: of every exportable method's calib-A choice within ``budget`` (default
    ``export.cost_budget``), the one most accurate on val (ties: lower val cost, then report order).

    Raises:
        JeidnnError: a run folder without val predictions; :class:`OverBudget` when no method meets the
            budget on calib half A.
    """
    budget = _budget(run, budget)
    considered: list[dict] = []
    choices: list[Choice] = []
    for name in exportable_names(run.learned):
        choice = run.choice(name, budget)
        if choice is None:
            label, cheapest = run.methods.specs[name].label, _cheapest(run, name, budget)
            why = f"no calib-A cost <= {budget:g}" + (f" (cheapest {cheapest:.4f})" if cheapest else "")
            considered.append({"method": name, "label": label, "skipped": why})
            continue
        row = _row(choice)
        if row["val_accuracy"] is None:
            raise JeidnnError(
                f"{run.folder} has no val predictions (written by an older jeidnn), so export.selection "
                "budget cannot compare methods on val; re-run training, or export one method with --method "
                "NAME (export.selection: method)"
            )
        considered.append(row)
        choices.append(choice)
    rows = [r for r in considered if "skipped" not in r]
    if not rows:
        reach = [_cheapest(run, name, budget) for name in exportable_names(run.learned)]
        cheapest = min((c for c in reach if c is not None), default=math.nan)
        raise OverBudget(
            f"no method meets cost budget {budget:g} on calib half A (the cheapest configuration costs "
            f"{cheapest:.4f}); raise export.cost_budget (--budget)"
        )
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_cost"], i))
    return OperatingPoint(choices[best], _why(rows, best, budget), selection="budget", considered=considered)


def certified(run: Run, guarantee: GuaranteeConfig) -> OperatingPoint:
    """``selection: guarantee``: the cheapest operating point of any exportable method certified for
    ``guarantee``; the certificate also fits its conformal quantiles (:meth:`OperatingPoint.conformal`).

    Raises:
        JeidnnError: from the certification, when no candidate can be certified.
    """
    certify = _certify_function()
    cert = certify(run.methods, guarantee, names=exportable_names(run.learned))
    if cert.choice is None:
        raise JeidnnError(f"no operating point is certified for {cert.proof}; loosen export.guarantee")
    return OperatingPoint(cert.choice, cert.proof, selection="guarantee", certificate=cert)


def select(
    run: Run,
    selection: str | None = None,
    *,
    method: str | None = None,
    budget: float | None = None,
    lam: float | None = None,
) -> OperatingPoint:
    """The operating point ``selection`` exports (default: ``--method`` given → ``method``, else the run's
    ``export.selection``).

    Args:
        method: ``selection: method`` only: the method (default the run's ``export.method``).
        budget: the calib-A cost budget of ``budget`` and ``method`` (default ``export.cost_budget``).
        lam: ``selection: method``, learned methods: the λ of the model (see :func:`choose`).

    Raises:
        JeidnnError: contradictory arguments, an unknown selection or method, or what the selection
            raises; nothing is chosen then.
    """
    if method is not None and selection not in (None, "method"):
        raise JeidnnError(
            f"--method {method} names the one method to export, which is --selection method, not "
            f"{selection}; drop --method or --selection"
        )
    selection = selection or ("method" if method is not None else run.cfg.export.selection)
    if selection not in SELECTIONS:
        raise JeidnnError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if lam is not None and selection != "method":
        raise JeidnnError("--lam picks a model of one learned method: name it with --method")
    if selection == "guarantee":
        if budget is not None:
            raise JeidnnError(
                "--budget does not apply to --selection guarantee: it exports the cheapest operating point "
                "certified for export.guarantee"
            )
        return certified(run, run.cfg.export.guarantee)
    if selection == "budget":
        return best_on_val(run, budget)
    named_by = "--method" if method is not None else "export.method"
    method = method if method is not None else run.cfg.export.method
    if method is None:
        raise JeidnnError("--selection method needs --method NAME (this run's export.method is not set)")
    point = choose(run, method, budget, lam)
    point.chosen_by = f"named by {named_by}; {point.chosen_by}"
    point.considered = [_row(point.choice)]
    return point


def default_choice(run: Run, budget: float | None = None) -> OperatingPoint:
    """What ``python train.py`` exports: the run's ``export.selection`` at ``budget`` (default
    ``export.cost_budget``)."""
    return select(run, budget=budget)
