"""The budgeted comparisons: the reference baseline and the best learned method picked on val (not on test,
not on calib A), the test-best baseline beside them, Δ against each baseline, and the calib-A fallback for
runs without val predictions."""

import pytest
import torch

from jeidnn.evaluate.budgeted import Method, Settings, Source, budgeted_rows, make_candidate, split_calib
from jeidnn.evaluate.comparator import Entry, pick

N_CALIB, N = 8, 20
SPLIT = split_calib(N_CALIB, seed=0)  # calib half A: 4 samples
COSTS = [0.5, 1.0]
SETTINGS = Settings([0.1], 15, 2, [0.6], 300, 2, seed=0)


def right_on(count: int, n: int = N) -> list[bool]:
    return [i < count for i in range(n)]


def source(name: str, calib_a: int, val: int | None, test: int) -> Source:
    """Predictions right on ``calib_a`` of the 4 calib-A samples, ``val`` of 20 val and ``test`` of 20 test
    samples (the same at both exits); labels are 0."""
    calib = torch.ones(N_CALIB, dtype=torch.bool)
    calib[SPLIT.a] = torch.tensor(right_on(calib_a, 4))
    correct = {"calib": calib, "test": torch.tensor(right_on(test))}
    if val is not None:
        correct["val"] = torch.tensor(right_on(val))
    logits = {s: torch.where(c[:, None, None], 1.0, -1.0) * torch.tensor([1.0, -1.0]).expand(len(c), 2, 2)
              for s, c in correct.items()}  # fmt: skip
    return Source(name, logits, {s: torch.zeros(len(c), dtype=torch.long) for s, c in correct.items()})


def method(name: str, kind: str, calib_a: int, val: int | None, test: int) -> Method:
    """One candidate: every sample leaves at exit 0 (cost 0.5)."""
    src = source(name, calib_a, val, test)
    exits = {s: torch.zeros(len(y), dtype=torch.long) for s, y in src.labels.items()}
    cand = make_candidate(name, src, COSTS, exits["calib"], exits["test"], SPLIT, {}, exits.get("val"))
    return Method(name, kind, name, [cand])


def methods(with_val: bool = True) -> list[Method]:
    """Test accuracies (of 20): learned_val 12, learned_test 16; base_val 10, base_test 14, base_calib 11.
    The val-best of each kind is not the test-best, and base_calib wins calib A (4 of 4)."""
    table = [
        ("learned_val", "learned", 2, 18, 12),
        ("learned_test", "learned", 3, 14, 16),
        ("base_val", "threshold", 2, 16, 10),
        ("base_test", "patience", 2, 12, 14),
        ("base_calib", "threshold", 4, 10, 11),
        ("oracle", "oracle", 4, 20, 20),
    ]
    return [method(n, k, a, v if with_val else None, t) for n, k, a, v, t in table]


def test_the_reference_is_the_val_best_baseline_and_the_headline_the_val_best_learned():
    summary, _ = budgeted_rows(methods(), SPLIT, SETTINGS)
    rows = {r["method"]: r for r in summary["rows"]}
    assert "oracle" not in rows  # never a reference, never a row
    (line,) = summary["headline"]
    assert (line["picked_on"], line["best_learned_picked_on"]) == ("val", "val")
    assert (line["best_learned"], line["reference_baseline"]) == ("learned_val", "base_val")
    assert line["test_best_baseline"] == "base_test"
    # Test accuracy differences, by hand: 12/20 - 10/20 and 12/20 - 14/20.
    assert line["delta"]["mean"] == pytest.approx(0.1)
    assert line["delta_vs_test_best"]["mean"] == pytest.approx(-0.1)
    assert {n: d["mean"] for n, d in line["vs_each_baseline"].items()} == pytest.approx(
        {"base_val": 0.1, "base_test": -0.1, "base_calib": 0.05}
    )
    for d in [line["delta"], line["delta_vs_test_best"], *line["vs_each_baseline"].values()]:
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    # learned_val is right on the first 12 samples, base_val on the first 10: the paired differences are +1 on
    # 2 samples of 20 and 0 elsewhere, never negative, and a resample draws those two more than 5 times in
    # about 4 % of resamples (binomial(20, 0.1)), so the 95 % interval lies within [0, 5 / 20].
    assert 0 <= line["delta"]["ci_low"] and line["delta"]["ci_high"] <= 0.25
    # The same difference in the headline and in the method's row (the same column of resamples).
    assert rows["learned_val"]["delta_vs_reference"] == line["delta"]
    assert rows["learned_val"]["delta_vs_best_baseline"] == line["delta_vs_test_best"]
    for name, row in rows.items():
        assert (row["reference_baseline"], row["best_baseline"]) == ("base_val", "base_test")
        assert row["val_accuracy"] == {"learned_val": 0.9, "learned_test": 0.7, "base_val": 0.8,
                                       "base_test": 0.6, "base_calib": 0.5}[name]  # fmt: skip
        assert row["val_cost"] == 0.5
    assert rows["base_val"]["delta_vs_reference"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert rows["base_test"]["delta_vs_best_baseline"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert rows["learned_test"]["delta_vs_reference"]["mean"] == pytest.approx(0.3)


def test_without_val_predictions_both_are_picked_on_calib_a():
    summary, _ = budgeted_rows(methods(with_val=False), SPLIT, SETTINGS)
    (line,) = summary["headline"]
    assert line["picked_on"] == "calib_a"
    # base_calib is right on all of calib A; learned_test on 3 of 4.
    assert (line["best_learned"], line["reference_baseline"]) == ("learned_test", "base_calib")
    assert line["delta"]["mean"] == pytest.approx(0.25)  # 16/20 - 11/20
    assert all(r["val_accuracy"] is None for r in summary["rows"])


def test_a_learned_method_trained_on_val_is_not_picked_on_val():
    """Gates trained on val (gate_data: val) fit the split the pick reads: the pick leaves them out, and picks
    on calib A when every learned method trained on val."""
    on_val = method("learned_on_val", "learned", 1, 20, 9)  # right on all of val: it was fitted there
    on_val.settings = {"gate_data": "val"}
    summary, _ = budgeted_rows([on_val, *methods()], SPLIT, SETTINGS)
    (line,) = summary["headline"]
    assert (line["best_learned"], line["best_learned_picked_on"]) == ("learned_val", "val")
    only = [on_val, *(m for m in methods() if m.kind != "learned")]
    (line,) = budgeted_rows(only, SPLIT, SETTINGS)[0]["headline"]
    assert (line["best_learned"], line["best_learned_picked_on"], line["picked_on"]) == (
        "learned_on_val",
        "calib_a",
        "val",
    )
    assert line["delta"]["mean"] == pytest.approx(-0.05)  # 9/20 - 10/20 (base_val, the reference)


def test_a_budget_without_learned_methods_has_a_reference_and_no_delta():
    only = [m for m in methods() if m.kind not in ("learned", "oracle")]
    summary, _ = budgeted_rows(only, SPLIT, SETTINGS)
    (line,) = summary["headline"]
    assert line["best_learned"] is None and line["delta"] is None and line["vs_each_baseline"] == {}
    assert line["reference_baseline"] == "base_val"


def test_pick_breaks_ties_by_lower_cost_then_order():
    def entry(name: str, acc: float, cost: float) -> Entry:
        row = {"method": name, "kind": "threshold", "accuracy": acc, "cost": cost}
        return Entry(row, torch.zeros(1, dtype=torch.bool), {"accuracy": acc, "cost": cost})

    a, b, c = entry("a", 0.8, 0.6), entry("b", 0.8, 0.5), entry("c", 0.8, 0.5)
    assert pick([a, b, c], "val") is b
    assert pick([a, entry("d", 0.81, 0.9)], "test").row["method"] == "d"
    assert pick([], "val") is None
