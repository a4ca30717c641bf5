"""The certification math (jeidnn/evaluate/risk.py): p-values against brute-force references, their validity
by simulation, fixed-sequence testing, conformal risk control."""

from __future__ import annotations

import math

import pytest
import torch

from jeidnn.evaluate.risk import (
    PVALUES,
    Counts,
    betting_pvalue,
    binomial_pvalue,
    conformal_risk_control,
    fixed_sequence,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    kelly_bet,
    monotone_losses,
    sample_losses,
    smallest_epsilon,
)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k) as a plain sum of math.comb terms."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(("n", "eps"), [(10, 0.3), (50, 0.05), (300, 0.01), (1000, 0.02)])
def test_binomial_pvalue_is_the_exact_binomial_tail(n, eps):
    ks = torch.tensor([0, 1, 2, n // 10, n // 2, n])
    got = binomial_pvalue(ks, n, eps)
    want = torch.tensor([min(1.0, _binomial_cdf(int(k), n, eps)) for k in ks], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-300)
    assert binomial_pvalue(torch.tensor([0]), 299, 0.01).item() == pytest.approx(0.99**299)


def test_hoeffding_pvalue_by_hand():
    # exp(-2 * 100 * (0.1 - 0.05)^2) = exp(-0.5); at or above eps: no evidence, p = 1
    assert hoeffding_pvalue(torch.tensor([0.05]), 100, 0.1).item() == pytest.approx(math.exp(-0.5))
    assert hoeffding_pvalue(torch.tensor([0.1, 0.3]), 100, 0.1).tolist() == [1.0, 1.0]
    # a loss in [-1, 1] has span 2: exp(-2 n d^2 / 4)
    assert hoeffding_pvalue(torch.tensor([0.0]), 100, 0.1, span=2).item() == pytest.approx(math.exp(-0.5))


def test_hoeffding_bentkus_pvalue_by_hand():
    n, eps, k = 200, 0.1, 8  # mean 0.04
    a = k / n
    kl = a * math.log(a / eps) + (1 - a) * math.log((1 - a) / (1 - eps))
    want = min(math.exp(-n * kl), math.e * _binomial_cdf(k, n, eps))
    assert hoeffding_bentkus_pvalue(torch.tensor([a]), n, eps).item() == pytest.approx(want, rel=1e-9)
    # never below the exact binomial tail, which is the sharper p-value for a 0/1 loss
    for k in range(0, 30, 3):
        exact = binomial_pvalue(torch.tensor([k]), n, eps).item()
        assert hoeffding_bentkus_pvalue(torch.tensor([k / n]), n, eps).item() >= exact - 1e-12


def test_betting_pvalue_is_one_over_the_capital():
    losses = [1, -1, -1, 0, 0]
    eps, bet = 0.1, 0.5
    capital = math.prod(1 + bet * (eps - x) for x in losses)  # 0.55 * 1.55^2 * 1.05^2 = 1.459
    got = betting_pvalue(torch.tensor([1]), torch.tensor([2]), len(losses), eps, torch.tensor([bet]))
    assert got.item() == pytest.approx(1 / capital)
    # a capital below 1 is no evidence: p = 1, not more
    assert betting_pvalue(torch.tensor([1]), torch.tensor([1]), 5, eps, torch.tensor([bet])).item() == 1.0
    # with no bet there is no evidence
    assert betting_pvalue(torch.tensor([0]), torch.tensor([0]), 5, eps, torch.tensor([0.0])).item() == 1.0


def test_kelly_bet_maximises_the_expected_log_capital():
    n, eps, plus, minus = 1000, 0.02, 10, 30
    bet = kelly_bet(torch.tensor([plus]), torch.tensor([minus]), n, eps).item()
    p_plus, p_minus = (plus + 1) / (n + 1), minus / (n + 1)  # with the pseudo-sample of loss +1

    def growth(b: float) -> float:
        p_zero = 1 - p_plus - p_minus
        return (
            p_minus * math.log(1 + b * (1 + eps))
            + p_zero * math.log(1 + b * eps)
            + p_plus * math.log(1 - b * (1 - eps))
        )

    grid = [i / 10000 * 0.9 / (1 - eps) for i in range(10001)]
    best = max(grid, key=growth)
    assert bet == pytest.approx(best, abs=2e-4)
    # an estimated risk at or above eps bets nothing
    assert kelly_bet(torch.tensor([50]), torch.tensor([10]), n, eps).item() == 0.0


def _rejection_rate(test: str, probs: tuple[float, float, float], n: int, eps: float, delta: float) -> float:
    """How often ``test`` rejects H0 "risk > eps" on n losses drawn with P(-1, 0, +1) = ``probs``."""
    gen = torch.Generator().manual_seed(1)
    trials = 4000
    draws = torch.multinomial(torch.tensor(probs), n * trials, replacement=True, generator=gen).view(
        trials, n
    )
    counts = Counts(n, (draws == 2).sum(1), (draws == 0).sum(1))
    # the bet is sized on an independent sample of the same law, as calib half A does
    side = torch.multinomial(torch.tensor(probs), n * trials, replacement=True, generator=gen).view(trials, n)
    bet = kelly_bet((side == 2).sum(1), (side == 0).sum(1), n, eps)
    return float((PVALUES[test](counts, eps, bet) <= delta).double().mean())


@pytest.mark.parametrize(
    "test", ["binomial", "hoeffding_bentkus", "hoeffding", "betting", "binomial_or_betting"]
)
@pytest.mark.parametrize("probs", [(0.0, 0.95, 0.05), (0.03, 0.89, 0.08)])
def test_pvalues_are_valid_at_the_boundary_of_the_null(test, probs):
    # risk exactly eps (the hardest null): a valid test rejects at most delta of the time, up to 3 Monte-Carlo
    # standard errors; the signed gap of the second law has mean 0.05 but a clipped mean of 0.08.
    eps, delta = probs[2] - probs[0], 0.1
    if test != "betting" and test != "binomial_or_betting":
        eps = probs[2]  # the count-based tests bound the clipped loss, whose mean is P(+1)
    rate = _rejection_rate(test, probs, 300, eps, delta)
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / 4000)


def test_an_unbounded_rule_is_not_valid():
    # "reject when the empirical risk is below eps" rejects far more often than delta at the boundary
    gen = torch.Generator().manual_seed(2)
    losses = (torch.rand(4000, 300, generator=gen) < 0.05).double()
    assert (losses.mean(1) <= 0.05).double().mean() > 0.4


def test_fixed_sequence_stops_at_the_first_non_rejection():
    p = torch.tensor([[0.01, 0.05, 0.2, 0.01], [0.5, 0.01, 0.01, 0.01], [0.01, 0.01, 0.01, 0.1]])
    assert fixed_sequence(p, 0.1).tolist() == [2, 0, 4]
    assert fixed_sequence(p, 0.01).tolist() == [1, 0, 3]


def test_conformal_risk_control_hand_case():
    losses = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])  # (K = 4, n = 4)
    mono = monotone_losses(losses)  # running maximum along the sequence, per sample
    assert mono.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    sums = mono.sum(1)  # 0, 1, 2, 3: (sum + 1) / 5 = 0.2, 0.4, 0.6, 0.8
    assert conformal_risk_control(sums, 4, 0.4).item() == 2
    assert conformal_risk_control(sums, 4, 0.19).item() == 0
    assert conformal_risk_control(sums, 4, 0.8).item() == 4


def test_sample_losses_and_counts():
    pred, full_pred = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 2, 2, 1])
    correct, full_correct = torch.tensor([True, False, True, True]), torch.tensor([True, True, False, True])
    assert sample_losses("consistency", pred, correct, full_pred, full_correct).tolist() == [0, 1, 0, 1]
    gap = sample_losses("accuracy_gap", pred, correct, full_pred, full_correct)
    assert gap.tolist() == [0, 1, -1, 0]
    counts = Counts.of(gap[None])
    assert (counts.plus.item(), counts.minus.item(), counts.mean.item()) == (1, 1, 0.0)
    with pytest.raises(ValueError, match="risk"):
        sample_losses("error", pred, correct, full_pred, full_correct)


def test_smallest_epsilon_finds_the_binomial_threshold():
    # no loss in 300 samples passes at delta when (1 - eps)^300 <= delta: eps >= 1 - delta^(1/300)
    def passes(eps: float) -> bool:
        return binomial_pvalue(torch.tensor([0]), 300, eps).item() <= 0.1

    assert smallest_epsilon(passes) == pytest.approx(1 - 0.1 ** (1 / 300), rel=1e-6)
    assert smallest_epsilon(lambda eps: False) is None
