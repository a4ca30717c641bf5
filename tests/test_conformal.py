"""Per-exit split conformal: the quantile and grouping rules by hand, coverage >= 1 - alpha over re-splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jeidnn.evaluate.conformal import (
    ConformalCoverage,
    ConformalSetSize,
    conformal_quantile,
    evaluate_sets,
    fit_conformal,
    group_exits,
    prediction_sets,
    resplit_miss,
)
from jeidnn.model.policies import confidence, global_threshold_exits, select_exit


def _probs_with_true_prob(p_true: list[float], num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose true class 0 has probability p_true; the rest spread evenly."""
    p = torch.tensor(p_true, dtype=torch.float64)[:, None]
    probs = torch.cat([p, ((1 - p) / (num_classes - 1)).expand(-1, num_classes - 1)], dim=1)
    return probs, torch.zeros(len(p_true), dtype=torch.long)


def test_conformal_quantile_rank_rule():
    scores = torch.tensor([0.4, 0.1, 0.3, 0.2])
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.4)  # rank ceil(5 * 0.8) = 4
    assert conformal_quantile(scores, 0.4) == pytest.approx(0.3)  # rank ceil(5 * 0.6) = 3
    assert conformal_quantile(scores, 0.1) == 1.0  # rank ceil(4.5) = 5 > 4: full label set
    assert conformal_quantile(torch.tensor([]), 0.1) == 1.0
    # (n + 1)(1 - alpha) = 19 exactly: rank 19 <= 19, not 20 (floating-point round-up guard).
    nineteen = torch.arange(1, 20, dtype=torch.float64) / 100
    assert conformal_quantile(nineteen, 0.05) == pytest.approx(0.19)
    assert conformal_quantile(nineteen[:18], 0.05) == 1.0  # rank ceil(18.05) = 19 > 18


def test_group_exits_hand_cases():
    assert group_exits([40, 35, 31], 30) == [[0], [1], [2]]  # every exit large enough: no merging
    assert group_exits([0, 0, 50, 3, 40, 5], 30) == [[0, 1, 2], [3, 4, 5]]  # short tail joins the previous
    assert group_exits([10, 10, 10, 40], 30) == [[0, 1, 2], [3]]
    assert group_exits([50, 10, 10], 30) == [[0, 1, 2]]  # the short tail [1, 2] joins [0]
    assert group_exits([5, 5], 30) == [[0, 1]]  # too few in total: one pooled group
    assert group_exits([3, 0, 2], 0) == [[0], [1], [2]]


def test_fit_conformal_hand_example_with_full_set_and_merged_group():
    # exit 0: scores 0.1 .. 0.4; exit 1: scores 0.05, 0.5; exit 2: score 0.25; exit 3: none.
    probs, labels = _probs_with_true_prob([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.75])
    exits = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    fitted = fit_conformal(probs, labels, exits, num_exits=4, alpha=0.5, min_samples=3)
    # Groups [0] (4 samples) and [1, 2] (3 samples); exit 3 (none) is a short tail and joins [1, 2].
    assert fitted.groups == [[0], [1, 2, 3]] and fitted.merged_groups == [[1, 2, 3]]
    # exit 0: rank ceil(5 * 0.5) = 3 -> 0.3; group {0.05, 0.5, 0.25}: rank ceil(4 * 0.5) = 2 -> 0.25.
    torch.testing.assert_close(fitted.quantiles, torch.tensor([0.3, 0.25, 0.25, 0.25], dtype=torch.float64))
    assert fitted.calib_counts.tolist() == [4, 2, 1, 0]
    # alpha 0.2: the group's rank ceil(4 * 0.8) = 4 > 3: the full label set for exits 1 .. 3.
    strict = fit_conformal(probs, labels, exits, num_exits=4, alpha=0.2, min_samples=3)
    assert strict.quantiles[1:].tolist() == [1.0, 1.0, 1.0]
    # A partition given from outside (e.g. from another split's counts) is used as is.
    given = fit_conformal(probs, labels, exits, 4, 0.5, groups=[[0, 1], [2, 3]])
    # [0, 1]: six scores, rank ceil(7 * 0.5) = 4 -> 0.3; [2, 3]: one score, rank ceil(2 * 0.5) = 1 -> 0.25.
    assert given.groups == [[0, 1], [2, 3]]
    torch.testing.assert_close(given.quantiles, torch.tensor([0.3, 0.3, 0.25, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="partition"):
        fit_conformal(probs, labels, exits, 4, 0.5, groups=[[0, 1], [3]])

    test = torch.tensor(
        [[0.75, 0.2, 0.05], [0.8, 0.15, 0.05], [0.5, 0.45, 0.05], [0.6, 0.3, 0.1]], dtype=torch.float64
    )
    sets = prediction_sets(test, torch.tensor([0, 1, 3, 0]), fitted.quantiles)
    assert sets.tolist() == [
        [True, False, False],  # p >= 0.7
        [True, False, False],  # p >= 0.75
        [False, False, False],  # p >= 0.75: empty set
        [False, False, False],  # p >= 0.7: empty set
    ]
    # A calibration sample whose score is exactly q is in its own set despite 1 - (1 - p) != p in floats.
    assert prediction_sets(probs, exits, fitted.quantiles)[2, 0]


def test_evaluate_sets_and_metric_classes_accumulate_over_batches():
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 4, generator=gen).mul(2).softmax(-1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    exits = torch.randint(0, 3, (500,), generator=gen)
    out = evaluate_sets(
        probs[:200], labels[:200], exits[:200], probs[200:], labels[200:], exits[200:], 3, 0.1, 10
    )
    q = torch.tensor(out["quantiles"])
    coverage, size = ConformalCoverage(q), ConformalSetSize(q)
    for chunk in torch.arange(200, 500).split(70):
        coverage.update(probs[chunk], exits[chunk], labels[chunk])
        size.update(probs[chunk], exits[chunk], labels[chunk])
    sets = prediction_sets(probs[200:], exits[200:], q)
    assert float(coverage.compute()) == pytest.approx(out["coverage"])
    assert out["coverage"] == pytest.approx(sets[torch.arange(300), labels[200:]].double().mean().item())
    assert float(size.compute()) == pytest.approx(out["mean_set_size"])
    assert out["mean_set_size"] == pytest.approx(sets.sum(1).double().mean().item())
    assert out["merged_groups"] == []


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_per_exit_coverage_holds_on_average_over_random_splits(alpha):
    """Exchangeable synthetic data, a label-independent exit rule, small per-exit calib sets.

    With ~30 calib samples per exit the finite-sample correction ((n + 1) instead of n) is worth
    ~3 points of coverage, so an implementation without it fails this test.
    """
    gen = torch.Generator().manual_seed(1)
    n, num_exits, num_classes = 4000, 3, 5
    logits = torch.randn(n, 1, num_classes, generator=gen) * torch.tensor([1.0, 2.0, 3.0])[None, :, None]
    probs = (logits + 0.7 * torch.randn(n, num_exits, num_classes, generator=gen)).softmax(-1)  # (N, L, C)
    labels = torch.multinomial(logits[:, -1].softmax(-1), 1, generator=gen).squeeze(1)
    exits = global_threshold_exits(confidence(probs, "maxprob"), 0.6)  # depends on x only, never on y
    taken = select_exit(probs, exits)  # (N, C)
    assert torch.bincount(exits, minlength=num_exits).min() > n / 10  # every exit gets samples

    coverages, per_exit_miss = [], []
    for _ in range(200):
        perm = torch.randperm(n, generator=gen)
        cal, test = perm[:100], perm[100:]
        fitted = fit_conformal(taken[cal], labels[cal], exits[cal], num_exits, alpha, min_samples=5)
        assert not fitted.merged_groups
        sets = prediction_sets(taken[test], exits[test], fitted.quantiles)
        covered = sets[torch.arange(len(test)), labels[test]]
        coverages.append(covered.double().mean().item())
        per_exit_miss.append([(~covered[exits[test] == e]).double().mean().item() for e in range(num_exits)])
    coverages = np.asarray(coverages)
    stderr = coverages.std() / np.sqrt(len(coverages))
    assert coverages.mean() >= 1 - alpha - 3 * stderr
    assert coverages.mean() <= 1 - alpha + 0.06  # and not trivially conservative
    # The guarantee holds per exit, not just pooled.
    assert (np.mean(per_exit_miss, axis=0) <= alpha + 0.01).all()


def _pooled_fallback_quantiles(scores, exits, num_exits, alpha, min_samples):
    """The rule this module used to have: small exits take the pooled quantile, large ones their own."""
    pooled = conformal_quantile(scores, alpha)
    return torch.tensor(
        [
            conformal_quantile(scores[exits == e], alpha) if (exits == e).sum() >= min_samples else pooled
            for e in range(num_exits)
        ],
        dtype=torch.float64,
    )


def test_merged_groups_cover_where_a_pooled_fallback_for_hard_small_exits_does_not():
    """Exits 1 and 2 are rare and hard. A pooled quantile, dominated by the easy exits, is far too small
    for them; merging them into one group with its own quantile restores coverage."""
    gen = torch.Generator().manual_seed(0)
    n, num_exits, num_classes, alpha, min_samples = 20000, 4, 10, 0.05, 30
    exits = torch.multinomial(torch.tensor([0.6, 0.02, 0.02, 0.36]), n, replacement=True, generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    signal = torch.tensor([4.0, 0.5, 0.5, 3.0])[exits]  # hard exits: little signal
    logits = signal[:, None] * torch.nn.functional.one_hot(labels, num_classes) + torch.randn(
        n, num_classes, generator=gen
    )
    probs = logits.softmax(-1).double()
    scores = 1 - probs[torch.arange(n), labels]
    old, new = [], []
    for _ in range(100):
        perm = torch.randperm(n, generator=gen)
        cal, test = perm[:1000], perm[1000:]
        q_old = _pooled_fallback_quantiles(scores[cal], exits[cal], num_exits, alpha, min_samples)
        fitted = fit_conformal(probs[cal], labels[cal], exits[cal], num_exits, alpha, min_samples)
        for q, out in ((q_old, old), (fitted.quantiles, new)):
            out.append((scores[test] > q[exits[test]]).double().mean().item())
    assert np.mean(old) > alpha + 0.02  # the old rule under-covers badly
    assert np.mean(new) <= alpha + 0.005  # merged groups do not


def test_resplit_miss_matches_a_manual_resplit_and_is_valid():
    gen = torch.Generator().manual_seed(2)
    n, num_exits = 3000, 3
    probs = (2 * torch.randn(n, 4, generator=gen)).softmax(-1).double()
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    exits = torch.randint(0, num_exits, (n,), generator=gen)
    groups = [[0], [1, 2]]
    one = resplit_miss(probs, labels, exits, num_exits, groups, 500, [0.1], resplits=1, seed=7)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    cal, test = perm[:500], perm[500:]
    fitted = fit_conformal(probs[cal], labels[cal], exits[cal], num_exits, 0.1, groups=groups)
    sets = prediction_sets(probs[test], exits[test], fitted.quantiles)
    manual = 1 - sets[torch.arange(len(test)), labels[test]].double().mean().item()
    assert one["0.1"]["mean"] == pytest.approx(manual) and one["0.1"]["std"] == 0
    many = resplit_miss(probs, labels, exits, num_exits, groups, 500, [0.05, 0.1], resplits=100, seed=0)
    for alpha in (0.05, 0.1):
        stats = many[format(alpha, "g")]
        assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] > 0
        assert stats["mean"] <= alpha + 0.005
