"""Exit policies of the baselines: budgeted-batch thresholds, confidence measures, patience, oracle."""

from __future__ import annotations

import math

import pytest
import torch

from jeidnn.model.policies import (
    _threshold_batch_stats,
    _vary_one_exit,
    apply_thresholds,
    confidence,
    fit_budgeted_thresholds,
    geometric_exit_distribution,
    global_threshold_exits,
    oracle_exits,
    patience_exits,
    score_exits,
    search_thresholds,
    select_exit,
    static_exits,
)


def test_geometric_exit_distribution():
    q = geometric_exit_distribution(0.5, 4)
    torch.testing.assert_close(q, torch.tensor([8, 4, 2, 1], dtype=torch.float64) / 15)
    torch.testing.assert_close(
        geometric_exit_distribution(1.0, 5), torch.full((5,), 0.2, dtype=torch.float64)
    )
    assert torch.isfinite(geometric_exit_distribution(50.0, 24)).all()  # no overflow for large p


@pytest.mark.parametrize("p", [0.3, 0.8, 1.0, 1.5, 3.0])
def test_budgeted_thresholds_realise_target_fractions_on_calib(p):
    gen = torch.Generator().manual_seed(0)
    n, num_exits = 1001, 6
    conf = torch.rand(n, num_exits, generator=gen)  # continuous: no ties
    target = geometric_exit_distribution(p, num_exits)
    thresholds = fit_budgeted_thresholds(conf, target)
    exits = apply_thresholds(conf, thresholds)
    realised = torch.bincount(exits, minlength=num_exits).double() / n
    # Cumulative rounding: every cumulative fraction is within half a sample of its target.
    assert (realised.cumsum(0) - target.cumsum(0)).abs().max() <= 0.5 / n + 1e-12
    assert (realised - target).abs().max() <= 1 / n + 1e-12
    # Independent check of the rule: the samples exiting at k are the most confident still running.
    running = torch.ones(n, dtype=torch.bool)
    for k in range(num_exits - 1):
        here = exits == k
        if here.any() and (running & ~here).any():
            assert conf[here, k].min() > conf[running & ~here, k].max()
        running &= ~here


def test_budgeted_thresholds_with_ties_overshoot_only_by_the_ties():
    # 10 samples, exit 0 confidences with a 4-way tie at the 3rd-largest value.
    conf0 = torch.tensor([0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.3, 0.2, 0.1, 0.0])
    conf = torch.stack([conf0, torch.linspace(1, 0, 10), torch.zeros(10)], dim=1)  # (10, 3)
    target = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    thresholds = fit_budgeted_thresholds(conf, target)
    exits = apply_thresholds(conf, thresholds)
    counts = torch.bincount(exits, minlength=3).tolist()
    # Target 3 at exit 0, but the 3rd place is tied with 3 more samples: all 4 exit (6 in total).
    assert thresholds[0] == 0.5 and counts[0] == 6
    # Exit 1 only tops the cumulative count up to round(10 * 0.7) = 7; the rest goes to the last exit.
    assert counts == [6, 1, 3]


def test_threshold_edge_cases():
    conf = torch.rand(20, 3)
    assert (apply_thresholds(conf, fit_budgeted_thresholds(conf, torch.tensor([1.0, 0, 0]))) == 0).all()
    assert (apply_thresholds(conf, fit_budgeted_thresholds(conf, torch.tensor([0.0, 0, 1]))) == 2).all()
    assert apply_thresholds(conf, torch.tensor([2.0, -1.0])).tolist() == [1] * 20
    assert apply_thresholds(torch.rand(5, 1), torch.zeros(0)).tolist() == [0] * 5  # a single exit
    assert global_threshold_exits(
        torch.tensor([[0.2, 0.7, 0.9], [0.95, 0.1, 0.1], [0.1, 0.1, 0.1]]), 0.7
    ).tolist() == [
        1,
        0,
        2,
    ]


def test_confidence_measures():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(confidence(probs, "maxprob"), torch.tensor([0.7, 1.0, 1 / 3]))
    torch.testing.assert_close(confidence(probs, "margin"), torch.tensor([0.5, 1.0, 0.0]))
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    torch.testing.assert_close(confidence(probs, "entropy"), torch.tensor([-entropy, 0.0, -math.log(3)]))
    assert confidence(probs[None], "maxprob").shape == (1, 3)  # works on (N, L, C)
    with pytest.raises(ValueError, match="measure"):
        confidence(probs, "variance")


def test_patience_rule_hand_cases():
    preds = torch.tensor(
        [
            [1, 1, 1, 1, 1],  # stable from the start
            [0, 1, 1, 2, 2],  # agrees at exit 2 (once) and exit 4 (once)
            [0, 1, 1, 1, 2],  # agrees at exits 2 and 3: a run of 2 ending at exit 3
            [0, 1, 2, 3, 4],  # never agrees
        ]
    )
    assert patience_exits(preds, 0).tolist() == [0, 0, 0, 0]
    assert patience_exits(preds, 1).tolist() == [1, 2, 2, 4]
    assert patience_exits(preds, 2).tolist() == [2, 4, 3, 4]
    assert patience_exits(preds, 3).tolist() == [3, 4, 4, 4]
    assert patience_exits(preds, 4).tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="patience"):
        patience_exits(preds, -1)


def test_static_oracle_and_select():
    preds = torch.tensor([[0, 1, 2], [2, 2, 2], [1, 1, 1]])
    labels = torch.tensor([1, 2, 0])
    assert oracle_exits(preds, labels).tolist() == [1, 0, 2]  # the last sample is never right: last exit
    assert static_exits(3, 1).tolist() == [1, 1, 1]
    values = torch.arange(3 * 3 * 2).view(3, 3, 2)
    assert select_exit(values, torch.tensor([2, 0, 1])).tolist() == [[4, 5], [6, 7], [14, 15]]
    assert select_exit(values[..., 0], torch.tensor([2, 0, 1])).tolist() == [4, 6, 14]


def test_score_exits_is_the_first_score_at_or_above_tau():
    scores = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.1, 0.9], [0.1, 0.1, 0.1], [0.49, 0.5, 1.0]])
    assert score_exits(scores, 0.5).tolist() == [1, 0, 3, 1]  # >= tau exits; nobody passing -> last exit
    assert score_exits(scores, 0.8).tolist() == [3, 2, 3, 2]
    assert score_exits(scores, float("inf")).tolist() == [3, 3, 3, 3]  # nobody exits early
    assert score_exits(scores, 0.0).tolist() == [0, 0, 0, 0]
    assert score_exits(torch.zeros(2, 0), 0.5).tolist() == [0, 0]  # a single exit
    assert score_exits(scores, 0.5).dtype == torch.long


def _search_case() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    conf = torch.tensor(
        [[0.9, 0.9, 1.0], [0.8, 0.95, 1.0], [0.6, 0.7, 1.0], [0.3, 0.6, 1.0]], dtype=torch.float64
    )
    correct = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 1]]).bool()
    return conf, correct, [0.2, 0.5, 1.0]


def test_search_thresholds_hand_case():
    """Worked by hand (costs 0.2, 0.5, 1.0; global grid 0, 0.5, 0.85, inf).

    Global thresholds: t=0 -> acc 0.5, cost 0.2; t=0.5 -> 0.5, 0.275; t=0.85 -> 1.0, 0.675; inf -> 1.0, 1.0.
    Budget 0.5: starts t=0 and t=0.5. From t=0 everyone leaves at exit 0 and no single threshold helps.
    From t=0.5, raising exit 1's threshold to 0.7 (the smallest grid value that works) sends the last
    sample to the final exit: accuracy 0.75 at cost 0.4. Nothing else beats it within the budget.
    """
    conf, correct, costs = _search_case()
    grid = [0.0, 0.5, 0.85, float("inf")]
    found = search_thresholds(conf, correct, costs, 0.5, grid, num_quantiles=4)
    assert found.tolist() == [0.5, 0.7]
    exits = apply_thresholds(conf, found)
    assert exits.tolist() == [0, 0, 0, 2]
    assert correct[torch.arange(4), exits].double().mean() == 0.75
    assert torch.tensor(costs)[exits].mean() == pytest.approx(0.4)
    # One start (t=0) is stuck at the global optimum's accuracy of 0.5.
    assert search_thresholds(conf, correct, costs, 0.5, grid, num_quantiles=4, starts=1).tolist() == [0, 0]
    # A budget that affords the best global threshold keeps it; one below every start gives None.
    assert search_thresholds(conf, correct, costs, 0.7, grid, num_quantiles=4).tolist() == [0.85, 0.85]
    assert search_thresholds(conf, correct, costs, 0.1, grid) is None


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.7])
def test_search_thresholds_never_exceeds_budget_and_beats_the_global_threshold(budget):
    gen = torch.Generator().manual_seed(0)
    n, num_exits = 600, 5
    conf = torch.rand(n, num_exits, generator=gen)
    # correctness more likely with confidence and depth
    correct = torch.rand(n, num_exits, generator=gen) < (0.3 + 0.4 * conf + 0.05 * torch.arange(num_exits))
    costs = torch.linspace(0.2, 1.0, num_exits)
    grid = [i / 20 for i in range(21)] + [float("inf")]
    found = search_thresholds(conf, correct, costs, budget, grid)
    exits = apply_thresholds(conf, found)
    acc = correct[torch.arange(n), exits].double().mean()
    assert costs.double()[exits].mean() <= budget + 1e-9
    best_global = max(
        correct[torch.arange(n), e].double().mean()
        for e in (global_threshold_exits(conf, t) for t in grid)
        if costs.double()[e].mean() <= budget + 1e-9
    )
    assert acc > best_global  # strictly: the per-exit search finds something the global grid cannot
    assert torch.equal(found, search_thresholds(conf, correct, costs, budget, grid))  # deterministic
    # The fast one-exit update agrees with applying every trial threshold vector in full.
    thresholds = torch.tensor([0.7, 0.2, 0.9, 0.5], dtype=torch.float64)
    grid_k = torch.tensor([0.0, 0.3, 0.6, float("inf")], dtype=torch.float64)
    for k in range(num_exits - 1):
        fast = _vary_one_exit(conf.double(), correct, costs.double(), thresholds, k, grid_k)
        trials = thresholds.repeat(len(grid_k), 1)
        trials[:, k] = grid_k
        full = _threshold_batch_stats(conf.double(), correct, costs.double(), trials)
        torch.testing.assert_close(fast, full)
