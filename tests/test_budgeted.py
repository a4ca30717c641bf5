"""The budgeted, test-blind protocol: calib halves, calib-A selection, bootstrap intervals, rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jeidnn.evaluate.budgeted import (
    Candidate,
    Method,
    Settings,
    Source,
    budgeted_rows,
    make_candidate,
    select_config,
    split_calib,
)
from jeidnn.evaluate.candidates import TAU_GRID
from jeidnn.evaluate.metrics import paired_bootstrap
from jeidnn.model.policies import static_exits


def test_split_calib_is_a_seeded_partition_into_halves():
    split = split_calib(11, seed=4)
    assert len(split.a) == 5 and len(split.b) == 6
    assert sorted(split.a.tolist() + split.b.tolist()) == list(range(11))
    assert split.a.tolist() == sorted(split.a.tolist())
    again = split_calib(11, seed=4)
    assert torch.equal(split.a, again.a) and torch.equal(split.b, again.b)
    assert not torch.equal(split_calib(100, 0).a, split_calib(100, 1).a)
    assert split.to_dict() == {"a": 5, "b": 6, "seed": 4}


def test_tau_grid():
    assert TAU_GRID[-1] == float("inf") and 0.5 in TAU_GRID and 0.001 in TAU_GRID and 0.999 in TAU_GRID
    assert (
        TAU_GRID == sorted(TAU_GRID) and len(TAU_GRID) == len(set(TAU_GRID)) == 102
    )  # 0.01 .. 0.99, 0.001, 0.999, inf


def _cand(acc: float, cost: float, name: str) -> Candidate:
    empty = torch.zeros(0, dtype=torch.int16)
    return Candidate(name, None, torch.zeros(1), empty, empty, acc, cost)  # type: ignore[arg-type]


def test_select_config_best_calib_accuracy_within_budget_ties_to_lower_cost():
    cands = [_cand(0.8, 0.6, "a"), _cand(0.8, 0.5, "b"), _cand(0.9, 0.71, "c"), _cand(0.7, 0.3, "d")]
    assert select_config(cands, 0.7).param == "b"  # a and b tie on accuracy: the cheaper one
    assert select_config(cands, 0.71).param == "c"  # cost == budget is allowed
    assert select_config(cands, 0.4).param == "d"
    assert select_config(cands, 0.2) is None
    assert select_config([_cand(0.8, 0.5, "x"), _cand(0.8, 0.5, "y")], 1.0).param == "x"  # then order
    assert select_config([], 1.0) is None


def test_paired_bootstrap_hand_cases_and_interval_contains_the_true_difference():
    const = paired_bootstrap(torch.full((50, 2), 0.25), resamples=200, seed=0)
    torch.testing.assert_close(const, torch.full((2, 3), 0.25, dtype=torch.float64))
    # Two classifiers with accuracies 0.80 and 0.75 on a large set of paired samples: true difference 0.05.
    gen = torch.Generator().manual_seed(0)
    n = 4000
    u = torch.rand(n, generator=gen)
    a, b = (u < 0.80).double(), (u < 0.75).double()  # paired: b right implies a right
    b = torch.where(torch.rand(n, generator=gen) < 0.1, 1 - b, b)  # some disagreement the other way
    ((mean, lo, hi),) = paired_bootstrap((a - b)[:, None], resamples=1000, seed=1).tolist()
    assert mean == pytest.approx(float((a - b).mean()))
    assert lo < mean < hi and hi - lo < 0.05
    truth = 0.80 - (0.75 * 0.9 + 0.25 * 0.1)  # E[a] - E[b] of the generating process
    assert lo <= truth <= hi
    # Over repeated experiments the 95 % interval covers the truth about 95 % of the time.
    hits = []
    for rep in range(200):
        g = torch.Generator().manual_seed(100 + rep)
        x = (torch.rand(300, generator=g) < 0.7).double() - (torch.rand(300, generator=g) < 0.6).double()
        _, lo, hi = paired_bootstrap(x[:, None], resamples=300, seed=rep)[0].tolist()
        hits.append(lo <= 0.1 <= hi)
    assert 0.88 <= np.mean(hits) <= 0.99
    # Same seed, same answer.
    assert torch.equal(paired_bootstrap((a - b)[:, None], 100, 5), paired_bootstrap((a - b)[:, None], 100, 5))


def _source(n_calib: int, n_test: int, num_exits: int, gen: torch.Generator) -> Source:
    """Exit l is right with probability 0.4 + 0.15 l (a deep exit is more accurate)."""
    logits, labels = {}, {}
    for split, n in (("calib", n_calib), ("test", n_test)):
        labels[split] = torch.randint(0, 3, (n,), generator=gen)
        right = torch.rand(n, num_exits, generator=gen) < (0.4 + 0.15 * torch.arange(num_exits))
        pred = torch.where(right, labels[split][:, None], (labels[split][:, None] + 1) % 3)  # (N, L)
        logits[split] = 3 * torch.nn.functional.one_hot(pred, 3).float() + 0.1 * torch.randn(n, num_exits, 3)
    return Source("synthetic", logits, labels)


def test_budgeted_rows_rules_on_a_synthetic_run():
    gen = torch.Generator().manual_seed(0)
    num_exits, costs = 4, torch.tensor([0.25, 0.5, 0.75, 1.0])
    src = _source(400, 500, num_exits, gen)
    split = split_calib(400, seed=0)
    src.fit_temperatures_on(split)

    def static(e: int) -> Candidate:
        return make_candidate(e, src, costs, static_exits(400, e), static_exits(500, e), split)

    # "learned": static depths with the costs shifted up a little (as if gates cost something).
    learned_cands = [
        make_candidate({"depth": e}, src, costs + 0.02, static_exits(400, e), static_exits(500, e), split)
        for e in range(num_exits)
    ]
    methods = [
        Method("learned_x", "learned", "X", learned_cands, extension=True),
        Method("static", "static", "static depth", [static(e) for e in range(num_exits)]),
        Method("deep_only", "static", "deep only", [static(2), static(3)]),
        Method("oracle", "oracle", "oracle", [static(3)]),
    ]
    settings = Settings([0.1], 15, 30, [0.25, 0.5, 0.6], 300, 4, seed=0)
    summary, chosen = budgeted_rows(methods, split, settings)
    assert summary["calib_split"] == {"a": 200, "b": 200, "seed": 0} and summary["bootstrap"] == 300
    rows = {(r["budget"], r["method"]): r for r in summary["rows"]}
    assert len(summary["rows"]) == 3 * 3  # oracle excluded
    # Budget 0.25: only exit 0 of static fits; the learned method's cheapest costs 0.27.
    assert rows[(0.25, "learned_x")]["accuracy"] is None and "0.270" in rows[(0.25, "learned_x")]["reason"]
    assert rows[(0.25, "deep_only")]["accuracy"] is None
    assert rows[(0.25, "static")]["param"] == 0 and rows[(0.25, "static")]["best_baseline"] == "static"
    # Budget 0.6: static plays exit 1 (cost 0.5 <= 0.6); the learned one also exit 1 (0.52).
    assert rows[(0.6, "static")]["param"] == 1 and rows[(0.6, "learned_x")]["param"] == {"depth": 1}
    for row in summary["rows"]:
        if row["accuracy"] is not None:
            assert row["calib_cost"] <= row["budget"]
    # Same exits as the best baseline: delta exactly 0 with a zero-width interval.
    assert rows[(0.6, "learned_x")]["delta_vs_best_baseline"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert rows[(0.6, "static")]["delta_vs_best_baseline"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    # The conformal groups come from calib-A exit counts: all samples at exit 1, exits 0..3 in one group.
    assert rows[(0.6, "static")]["merged_groups"] == [[0, 1, 2, 3]]
    assert rows[(0.5, "static")]["exit_fractions"] == [0.0, 1.0, 0.0, 0.0]
    assert rows[(0.5, "static")]["ece_temperature_scaled"] is not None
    assert set(chosen) == {(b, m) for (b, m), r in rows.items() if r["accuracy"] is not None}


def test_budgeted_rows_bootstrap_on_a_known_difference():
    """A "learned" method that is right on 60 more of 1000 test samples than the only baseline."""
    gen = torch.Generator().manual_seed(1)
    src = _source(200, 1000, 2, gen)
    labels = src.labels["test"]
    wrong = (labels + 1) % 3
    # Exit 0 right on samples 0..599, exit 1 right on samples 0..659.
    idx = torch.arange(1000)
    pred = torch.stack([torch.where(idx < 600, labels, wrong), torch.where(idx < 660, labels, wrong)], 1)
    src = Source("s", {**src.logits, "test": 3 * torch.nn.functional.one_hot(pred, 3).float()}, src.labels)
    split = split_calib(200, seed=0)

    def at(e: int) -> list[Candidate]:
        return [
            make_candidate(
                e, src, torch.tensor([0.5, 0.5]), static_exits(200, e), static_exits(1000, e), split
            )
        ]

    methods = [Method("l", "learned", "L", at(1)), Method("b", "static", "B", at(0))]
    summary, _ = budgeted_rows(methods, split, Settings([0.1], 15, 30, [0.5], 1000, 2, seed=0))
    delta = summary["rows"][0]["delta_vs_best_baseline"]
    assert delta["mean"] == pytest.approx(0.06)
    # Paired differences are 0 or +1 (60 of 1000): the interval is about 0.06 ± 1.96 * sqrt(.06 * .94 / 1000).
    assert delta["ci_low"] == pytest.approx(0.06 - 0.0147, abs=0.004)
    assert delta["ci_high"] == pytest.approx(0.06 + 0.0147, abs=0.004)


def test_learned_candidates_keep_the_counted_costs_in_float64():
    """Learned costs go from counting to the 1e-9 budget check in float64: a float32 copy of 1/3 is
    0.3333333433, which would put a candidate costing exactly a budget above it."""
    from jeidnn.evaluate.budgeted import split_calib
    from jeidnn.evaluate.candidates import learned_candidates

    gen = torch.Generator().manual_seed(0)
    src = _source(40, 10, 3, gen)
    src.scores = {"calib": torch.zeros(40, 2), "test": torch.zeros(10, 2)}  # never exit early: last exit
    costs = [1 / 9, 2 / 9, 1 / 3]
    entry = {"operating_point": "native", "costs": costs, "models": [{"lambda": 0.1}]}
    (cand,) = learned_candidates(entry, [src], split_calib(40, 0))
    assert cand.costs.dtype == torch.float64 and cand.costs.tolist() == costs
    assert cand.calib_cost == 1 / 3  # every calib-A sample at the last exit, exactly
    assert select_config([cand], 1 / 3) is cand


def test_candidates_play_val_as_they_play_test():
    """Every candidate also records where val exits: the same rule, fitted on calib A, applied to val. A run
    whose test split is this run's val split must give the same exits at test."""
    from types import SimpleNamespace

    from jeidnn.evaluate.candidates import Inputs, learned_candidates
    from jeidnn.evaluate.methods import run_baselines

    gen = torch.Generator().manual_seed(3)
    src = _source(200, 50, 4, gen)
    extra = _source(10, 60, 4, gen)  # its test split plays val
    split = split_calib(200, seed=0)
    with_val = Source(
        "v", {**src.logits, "val": extra.logits["test"]}, {**src.labels, "val": extra.labels["test"]}
    )
    as_test = Source(
        "t", {**src.logits, "test": extra.logits["test"]}, {**src.labels, "test": extra.labels["test"]}
    )
    cfg = SimpleNamespace(threshold_ps=[0.5, 1.0, 2.0], global_thresholds=[0.5, 0.9], patience_values=None)
    costs, layers = [0.25, 0.5, 0.75, 1.0], [1, 2, 3, 4]
    x_val, x_test = (Inputs(s, costs, layers, split, cfg) for s in (with_val, as_test))
    checked = 0
    for spec in run_baselines([]):
        a, b = spec.candidates(x_val), spec.candidates(x_test)
        a, b = (a(0.6), b(0.6)) if callable(a) else (a, b)
        assert len(a) == len(b) > 0
        for ca, cb in zip(a, b, strict=True):
            assert torch.equal(ca.val_exits, cb.test_exits), spec.name
            acc = ca.source.correct["val"][torch.arange(60), ca.val_exits.long()].double().mean()
            assert ca.val_outcome()["accuracy"] == pytest.approx(float(acc))
            assert ca.val_outcome()["cost"] == pytest.approx(
                float(torch.tensor(costs)[ca.val_exits.long()].mean())
            )
            checked += 1
    assert checked > 20
    scores = {"calib": torch.rand(200, 3, generator=gen), "test": torch.rand(50, 3, generator=gen)}
    val_scores = torch.rand(60, 3, generator=gen)
    with_val.scores, as_test.scores = {**scores, "val": val_scores}, {**scores, "test": val_scores}
    entry = {"operating_point": "calib_threshold", "costs": costs, "models": [{"lambda": 0.1}]}
    for ca, cb in zip(*(learned_candidates(entry, [s], split) for s in (with_val, as_test)), strict=True):
        assert torch.equal(ca.val_exits, cb.test_exits)
    # Predictions without val (older runs): no val exits, no val outcome.
    src.scores = scores
    (cand,) = learned_candidates({**entry, "operating_point": "native"}, [src], split)
    assert cand.val_exits is None and cand.val_outcome() is None
