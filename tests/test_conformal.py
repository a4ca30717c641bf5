"""Per-exit split conformal: the quantile rule by hand, and coverage >= 1 - alpha over random splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jeidnn.baselines import confidence, global_threshold_exits, select_exit
from jeidnn.conformal import (
    ConformalCoverage,
    ConformalSetSize,
    conformal_quantile,
    evaluate_sets,
    fit_conformal,
    prediction_sets,
)


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


def test_fit_conformal_hand_example_with_full_set_and_pooled_fallback():
    # exit 0: scores 0.1 .. 0.4; exit 1: two scores; exit 2: one score (below min_samples -> pooled).
    probs, labels = _probs_with_true_prob([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.75])
    exits = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    fitted = fit_conformal(probs, labels, exits, num_exits=4, alpha=0.2, min_samples=2)
    # exit 0: rank ceil(5 * 0.8) = 4 -> 0.4; exit 1: rank ceil(3 * 0.8) = 3 > 2 -> 1 (full set);
    # pooled over 7 scores {0.05, .1, .2, .25, .3, .4, .5}: rank ceil(8 * 0.8) = 7 -> 0.5 for exits 2 and 3.
    torch.testing.assert_close(fitted.quantiles, torch.tensor([0.4, 1.0, 0.5, 0.5], dtype=torch.float64))
    assert fitted.fallback_exits == [2, 3]
    assert fitted.calib_counts.tolist() == [4, 2, 1, 0]
    assert fitted.pooled_quantile == pytest.approx(0.5)

    test = torch.tensor(
        [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.5, 0.45, 0.05], [0.5, 0.45, 0.05]], dtype=torch.float64
    )
    sets = prediction_sets(test, torch.tensor([0, 1, 2, 0]), fitted.quantiles)
    assert sets.tolist() == [
        [True, False, False],  # p >= 0.6
        [True, True, True],  # q = 1: every label
        [True, False, False],  # p >= 0.5
        [False, False, False],  # p >= 0.6: empty set
    ]
    # A calibration sample whose score is exactly q is in its own set despite 1 - (1 - p) != p in floats.
    assert prediction_sets(probs, exits, fitted.quantiles)[3, 0]


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
    assert out["fallback_exits"] == []


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
        assert not fitted.fallback_exits
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
