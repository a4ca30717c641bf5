"""Upper envelope, AUC and matched-cost interpolation on hand cases; cost and exit-histogram metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jeidnn.evaluate.metrics import (
    ExitHistogram,
    ExpectedCost,
    common_cost_range,
    envelope_auc,
    exit_outcome,
    interpolate_envelope,
    upper_envelope,
)

# Four operating points; (0.6, 0.65) is dominated by (0.5, 0.7) and drops out of the envelope.
COSTS = [0.5, 0.2, 0.8, 0.6]
ACCS = [0.7, 0.6, 0.9, 0.65]


def test_upper_envelope_drops_dominated_points_and_cost_ties():
    assert upper_envelope(COSTS, ACCS) == [1, 0, 2]
    # Same cost twice: keep the more accurate one; a costlier point that is not better is dropped.
    assert upper_envelope([0.3, 0.3, 0.9], [0.5, 0.6, 0.6]) == [1]
    assert upper_envelope([0.3, float("nan"), 0.9], [0.5, 0.9, 0.7]) == [0, 2]
    assert upper_envelope([], []) == []


def test_interpolation_at_matched_cost():
    at = [0.2, 0.35, 0.6, 0.8, 0.1, 0.85]
    got = interpolate_envelope(COSTS, ACCS, at)
    # 0.35 is halfway from (0.2, 0.6) to (0.5, 0.7); 0.6 is a third of the way from 0.5 to 0.8 -> 0.7 + 0.2/3.
    np.testing.assert_allclose(got[:4], [0.6, 0.65, 0.7 + 0.2 / 3, 0.9])
    assert np.isnan(got[4]) and np.isnan(got[5])  # outside the method's cost range
    # Other quantities ride along the same envelope points (the dominated point's value is ignored).
    ece = [0.05, 0.10, 0.02, 0.5]
    np.testing.assert_allclose(interpolate_envelope(COSTS, ACCS, [0.35, 0.65], values=ece), [0.075, 0.035])


def test_envelope_auc_is_mean_accuracy_over_range():
    # Envelope: (0.2, 0.6) - (0.5, 0.7) - (0.8, 0.9). Over [0.2, 0.8]: trapezoids 0.3*0.65 + 0.3*0.8.
    assert envelope_auc(COSTS, ACCS, 0.2, 0.8) == pytest.approx((0.3 * 0.65 + 0.3 * 0.8) / 0.6)
    # Sub-range [0.35, 0.6]: from 0.65 to 0.7 then to 0.7667.
    expected = (0.15 * (0.65 + 0.7) / 2 + 0.1 * (0.7 + 0.7 + 0.2 / 3) / 2) / 0.25
    assert envelope_auc(COSTS, ACCS, 0.35, 0.6) == pytest.approx(expected)
    assert envelope_auc([0.0, 1.0], [0.5, 0.7], 0.0, 1.0) == pytest.approx(0.6)
    assert envelope_auc(COSTS, ACCS, 0.5, 0.5) == pytest.approx(0.7)  # degenerate range: the value there
    assert math.isnan(envelope_auc(COSTS, ACCS, 0.1, 0.8))  # not covered
    assert math.isnan(envelope_auc(COSTS, ACCS, 0.6, 0.4))  # empty range


def test_common_cost_range():
    lo, hi = common_cost_range({"a": [0.2, 0.9], "b": [0.3, 0.5, 1.0], "c": [0.25, 0.8, float("nan")]})
    assert (lo, hi) == (0.3, 0.8)
    assert all(math.isnan(v) for v in common_cost_range({}))


def test_expected_cost_and_exit_histogram_accumulate():
    costs = torch.tensor([0.25, 0.5, 1.0])
    exits = torch.tensor([0, 0, 1, 2, 2, 2, 2, 1])
    cost, hist = ExpectedCost(costs), ExitHistogram(3)
    for chunk in exits.split(3):
        cost.update(chunk)
        hist.update(chunk)
    assert float(cost.compute()) == pytest.approx((0.25 * 2 + 0.5 * 2 + 1.0 * 4) / 8)
    assert hist.compute().tolist() == [0.25, 0.25, 0.5]
    assert hist.counts.tolist() == [2, 2, 4]
    cost.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(cost.compute()))


def test_envelope_stays_flat_up_to_a_dominated_costlier_point():
    costs, accs = [0.2, 0.5, 0.8], [0.6, 0.7, 0.65]  # the last point is dominated
    out = interpolate_envelope(costs, accs, [0.1, 0.35, 0.8, 0.9])
    assert math.isnan(out[0]) and math.isnan(out[3])
    assert out[1] == pytest.approx(0.65) and out[2] == pytest.approx(0.7)
    # trapezoid 0.2..0.5 (mean 0.65) + flat 0.5..0.8 at 0.7, over a width of 0.6
    assert envelope_auc(costs, accs, 0.2, 0.8) == pytest.approx((0.3 * 0.65 + 0.3 * 0.7) / 0.6)


def test_exit_outcome_reads_each_sample_at_its_exit():
    # Sample 0 leaves at exit 0 (wrong there), 1 and 2 at exit 2 (right), 3 at exit 1 (wrong there).
    correct = torch.tensor(
        [[False, True, True], [True, False, True], [False, False, True], [True, False, True]]
    )
    out = exit_outcome(correct, torch.tensor([0, 2, 2, 1], dtype=torch.int16), [0.25, 0.5, 1.0])
    assert out == {"accuracy": 0.5, "cost": (0.25 + 1.0 + 1.0 + 0.5) / 4, "exit_fractions": [0.25, 0.25, 0.5]}
    # One exit (a pruned model cut to its first layer): still a list of fractions.
    assert exit_outcome(correct[:, :1], torch.zeros(4, dtype=torch.long), [0.3])["exit_fractions"] == [1.0]
