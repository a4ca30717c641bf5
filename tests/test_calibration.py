"""ECE against independent NumPy references; temperature scaling recovers a known temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from jeidnn.evaluate.calibration import (
    TopLabelCalibrationError,
    apply_temperatures,
    ece,
    fit_temperatures,
    reliability_diagram,
)


def _numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Reference: equal-width bins [e_i, e_{i+1}) found with numpy.digitize, weighted |acc - conf|."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.digitize(conf, edges[1:-1])  # 0 .. n_bins - 1
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def _random_probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(n, c, generator=gen)).softmax(dim=1)
    # One row in ten is one-hot: a confidence of exactly 1, which belongs to the last bin.
    sure = torch.arange(n) % 10 == 0
    probs[sure] = torch.nn.functional.one_hot(probs[sure].argmax(1), c).float()
    # Labels drawn from a slightly sharpened version of probs: mildly miscalibrated, like a real model.
    labels = torch.multinomial(probs.pow(1.5), 1, generator=gen).squeeze(1)
    # In the top bin, the confidences below 1 are always right (underconfident) and the sure ones
    # wrong half the time (overconfident): whether 1.0 shares their bin changes the ECE.
    conf, pred = probs.max(1)
    labels = torch.where((conf >= 14 / 15) & ~sure, pred, labels)
    labels = torch.where(sure, torch.where(torch.arange(n) % 20 == 0, pred, (pred + 1) % c), labels)
    return probs, labels


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_matches_numpy_reference_and_is_whole_set(n_bins):
    probs, labels = _random_probs(3000, 5, seed=n_bins)
    expected = _numpy_ece(probs.double().numpy(), labels.numpy(), n_bins)
    assert ece(probs, labels, n_bins) == pytest.approx(expected, abs=1e-5)
    torchmetrics_ece = MulticlassCalibrationError(5, n_bins=n_bins, norm="l1")(probs, labels)
    assert abs(float(torchmetrics_ece) - expected) > 0.005  # the extra bin of confidence 1 is not ours

    # Fed in uneven batches, the metric still computes the whole-set value...
    metric = TopLabelCalibrationError(n_bins)
    for chunk_p, chunk_l in zip(probs.split(700), labels.split(700), strict=True):
        metric.update(chunk_p, chunk_l)
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-5)
    # ...which is not the mean of per-batch ECEs (what a batch-averaging logger would report: small
    # batches inflate it).
    per_batch = np.mean([ece(p, y, n_bins) for p, y in zip(probs.split(40), labels.split(40), strict=True)])
    assert per_batch - expected > 0.01


def test_a_confidence_of_one_shares_the_last_bin():
    # The example of the issue: a sure wrong prediction and a 0.95 correct one share bin [14/15, 1]:
    # |mean conf 0.975 - accuracy 0.5| = 0.475. torchmetrics gives 0.525 (1.0 in a 16th bin of its own).
    probs, labels = torch.tensor([[1.0, 0.0], [0.95, 0.05]]), torch.tensor([1, 0])
    assert ece(probs, labels, 15) == pytest.approx(0.475)
    diag = reliability_diagram(probs, labels, 15)
    assert diag.ece == pytest.approx(0.475)
    assert diag.bin_counts.tolist() == [0] * 14 + [2]
    assert float(diag.bin_confidence[-1]) == pytest.approx(0.975) and float(diag.bin_accuracy[-1]) == 0.5
    assert _numpy_ece(probs.double().numpy(), labels.numpy(), 15) == pytest.approx(0.475)


def test_ece_hand_example_and_input_check():
    # Two samples, conf 0.9 (correct) in bin [0.8667, 0.9333) and 0.6 (wrong) in [0.6, 0.6667).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert ece(probs, torch.tensor([0, 1])) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    with pytest.raises(ValueError, match="probabilities"):
        ece(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="`n_bins` to be a positive integer but got 0"):
        TopLabelCalibrationError(0)
    assert np.isnan(ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_reliability_diagram_counts_and_values():
    probs, labels = _random_probs(2000, 4, seed=1)
    diag = reliability_diagram(probs, labels, n_bins=10)
    conf = probs.max(1).values.numpy()
    bins = np.digitize(conf, np.linspace(0, 1, 11)[1:-1])
    assert diag.bin_counts.tolist() == np.bincount(bins, minlength=10).tolist()
    correct = (probs.argmax(1) == labels).numpy()
    for b in range(10):
        if diag.bin_counts[b] > 0:
            assert float(diag.bin_accuracy[b]) == pytest.approx(correct[bins == b].mean(), abs=1e-6)
            assert float(diag.bin_confidence[b]) == pytest.approx(conf[bins == b].mean(), abs=1e-6)
        else:
            assert torch.isnan(diag.bin_accuracy[b])
    assert diag.ece == pytest.approx(_numpy_ece(probs.double().numpy(), labels.numpy(), 10), abs=1e-5)


def test_temperature_scaling_recovers_known_temperatures():
    # Labels drawn from softmax(z): the calibrated logits are z, so logits z * T have optimal temperature T.
    gen = torch.Generator().manual_seed(0)
    true_t = torch.tensor([0.5, 1.0, 2.5, 6.0])
    z = 1.5 * torch.randn(8000, 1, 6, generator=gen)  # (N, 1, C) shared by all exits
    labels = torch.multinomial(z[:, 0].softmax(-1), 1, generator=gen).squeeze(1)
    logits = z * true_t[None, :, None]  # (N, L, C)
    fitted = fit_temperatures(logits, labels)
    assert fitted.shape == (4,)
    torch.testing.assert_close(fitted, true_t, rtol=0.05, atol=0)

    # Scaling does what it should: calibrated probabilities, lower NLL and ECE than the raw ones.
    scaled = apply_temperatures(logits, fitted)
    raw = logits.softmax(-1)
    for exit_ in (0, 3):
        assert ece(scaled[:, exit_], labels) < ece(raw[:, exit_], labels)
        assert ece(scaled[:, exit_], labels) < 0.02


def test_temperature_scaling_degenerate_inputs():
    assert fit_temperatures(torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long)).tolist() == [1.0] * 3
    # Constant logits: every temperature gives the same NLL; the result must stay finite and positive.
    t = fit_temperatures(torch.zeros(50, 2, 3), torch.randint(0, 3, (50,)))
    assert torch.isfinite(t).all() and (t > 0).all()
    # Perfectly separable logits: NLL keeps falling as T -> 0; the search stops at its bound.
    labels = torch.arange(30) % 3
    logits = 5 * torch.nn.functional.one_hot(labels, 3).float()[:, None, :]
    assert 0 < float(fit_temperatures(logits, labels)[0]) <= 0.05
