"""`export.selection` on hand-made candidates: which method `budget` exports (the val-best, not the
calib-A-best), its ties, what it reports, and its one-line refusals. The whole-run checks are in
tests/test_export.py."""

from pathlib import Path

import pytest
import torch

from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import Method, Source, make_candidate, split_calib
from jeidnn.evaluate.methods import REGISTRY, exportable_names
from jeidnn.evaluate.selection import MethodSet
from jeidnn.export.operating_point import OverBudget, Run
from jeidnn.export.selection import select

COSTS = [0.5, 1.0]
N_CALIB = 8
SPLIT = split_calib(N_CALIB, seed=0)  # calib half A: 4 samples, half B: 4


def source(name: str, calib_a: list[bool], val: list[bool] | None) -> Source:
    """Predictions whose correctness on calib half A and val is given (the same at both exits); every other
    sample is right. Labels are 0; a right sample's logits favour class 0."""
    calib = torch.ones(N_CALIB, dtype=torch.bool)
    calib[SPLIT.a] = torch.tensor(calib_a)
    correct = {"calib": calib, "test": torch.ones(4, dtype=torch.bool)}
    if val is not None:
        correct["val"] = torch.tensor(val)
    logits = {s: torch.where(c[:, None, None], 1.0, -1.0) * torch.tensor([1.0, -1.0]).expand(len(c), 2, 2)
              for s, c in correct.items()}  # fmt: skip
    return Source(name, logits, {s: torch.zeros(len(c), dtype=torch.long) for s, c in correct.items()})


def method(name: str, calib_a: list[bool], val: list[bool] | None, exit: int = 0) -> Method:
    """One candidate: every sample leaves at ``exit`` (cost ``COSTS[exit]``)."""
    src = source(name, calib_a, val)
    exits = {s: torch.full((len(y),), exit) for s, y in src.labels.items()}
    cand = make_candidate(
        {"exit": exit}, src, COSTS, exits["calib"], exits["test"], SPLIT, {"exit": exit}, exits.get("val")
    )
    return Method(name, REGISTRY[name].report_kind, REGISTRY[name].label, [cand])


def fake_run(**special: tuple) -> Run:
    """A run without learned methods whose baselines are right on half of calib A and val at cost 0.5, but
    for ``special``: name -> (calib-A correctness, val correctness[, exit])."""
    half = ([True, True, False, False], [True, True, False, False])
    methods = [method(n, *special.get(n, half)) for n in exportable_names({})]
    specs = {m.name: REGISTRY[m.name] for m in methods}
    report = {"exits": {"cost": COSTS, "layers": [1, 2]}, "dataset": {"labels": ["a", "b"]}}
    run = Run(Path("runs/fake"), report, RunConfig())
    run.__dict__["methods"] = MethodSet(methods, specs, SPLIT, None, {})  # the cached_property's value
    return run


def test_budget_exports_the_val_best_not_the_calib_a_best():
    run = fake_run(
        threshold_search=([True] * 4, [True, False, False, False]),  # best on calib A, worst on val
        patience=([True, True, True, False], [True, True, True, False]),  # best on val
        static=([True] * 4, [True] * 4, 1),  # the best of all, but over the budget
    )
    by_calib = max(
        exportable_names({}), key=lambda n: run.choice(n, 0.6).calib_accuracy if run.choice(n, 0.6) else -1
    )
    assert by_calib == "threshold_search"

    point = select(run)

    assert (point.method, point.selection, point.budget) == ("patience", "budget", 0.6)
    assert point.chosen_by == (
        "most accurate on val (0.7500 at val cost 0.5000) among the calib-A choices of 8 methods within "
        "calib cost <= 0.6; next: threshold_maxprob (0.5000)"
    )
    rows = {r["method"]: r for r in point.considered}
    assert list(rows) == exportable_names({})  # report order
    assert rows["threshold_search"] == {
        "method": "threshold_search",
        "label": REGISTRY["threshold_search"].label,
        "param": {"exit": 0},
        "calib_accuracy": 1.0,
        "calib_cost": 0.5,
        "val_accuracy": 0.25,
        "val_cost": 0.5,
    }
    assert (rows["patience"]["val_accuracy"], rows["patience"]["calib_accuracy"]) == (0.75, 0.75)
    assert rows["static"] == {
        "method": "static",
        "label": "static depth",
        "skipped": "no calib-A cost <= 0.6 (cheapest 1.0000)",
    }
    # With room for it, the static depth (right on every val sample) wins.
    assert select(run, budget=1.0).method == "static"


def test_ties_go_to_the_lower_val_cost_then_report_order():
    right = ([True] * 4, [True] * 4)
    run = fake_run(patience=(*right, 0), global_maxprob=(*right, 1), static=(*right, 0))
    assert select(run, budget=1.0).method == "patience"  # patience comes before static, both at cost 0.5
    assert select(run, budget=1.0).chosen_by.endswith(
        "; next: static (1.0000), a tie broken by earlier in report order"
    )
    run = fake_run(patience=(*right, 1), static=(*right, 0))
    point = select(run, budget=1.0)
    assert point.method == "static"
    assert point.chosen_by.endswith("; next: patience (1.0000), a tie broken by lower val cost")


def test_method_selection_plays_the_named_method_and_reports_it():
    point = select(fake_run(), method="static", budget=0.6)
    assert (point.method, point.selection) == ("static", "method")
    assert point.chosen_by == "named by --method; most accurate on calib half A with calib-A cost <= 0.6"
    assert [r["method"] for r in point.considered] == ["static"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"budget": 0.3}, OverBudget, "no method meets cost budget 0.3 on calib half A (the cheapest "
         "configuration costs 0.5000); raise export.cost_budget (--budget)"),
        ({"selection": "budget", "method": "static"}, JeidnnError, "--method static names the one method to "
         "export, which is --selection method, not budget; drop --method or --selection"),
        ({"selection": "method"}, JeidnnError, "--selection method needs --method NAME (this run's "
         "export.method is not set)"),
        ({"selection": "guarantee", "budget": 0.5}, JeidnnError, "--budget does not apply to --selection "
         "guarantee"),
        ({"selection": "best"}, JeidnnError, "unknown selection 'best'; choose one of budget, guarantee, "
         "method"),
        ({"method": "fly"}, JeidnnError, "unknown method 'fly'; this run can export: threshold_maxprob"),
    ],
)  # fmt: skip
def test_bad_selections_are_one_line_errors(kwargs, error, message):
    with pytest.raises(error) as err:
        select(fake_run(), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_budget_selection_needs_val_predictions():
    run = fake_run(**{n: ([True] * 4, None) for n in exportable_names({})})
    with pytest.raises(
        JeidnnError, match=r"^runs/fake has no val predictions \(written by an older jeidnn\)"
    ):
        select(run)
    assert select(run, method="patience").val_metrics() == {"val_accuracy": None, "val_cost": None}
