"""Risks against the full model, p-values for "risk > ε", and the two certification rules (docs/evaluation.md,
"Guarantees").

Every test here reads sufficient statistics only: how many samples of the certification data have loss +1
(``plus``) and, for the accuracy gap, loss −1 (``minus``), out of ``n``. So one call scores every candidate of
a method, and every re-split of the check in :mod:`jeidnn.evaluate.guarantees`, at once.

* **Risks** (:func:`sample_losses`): ``consistency`` = 1[prediction at the exit taken ≠ the full model's];
  ``accuracy_gap`` = 1[exit wrong] − 1[full model wrong] ∈ {−1, 0, 1}. Its clipped version max(gap, 0) is a
  0/1 loss whose mean bounds the gap's from above.
* **p-values** for H0 "risk > ε" (:data:`PVALUES`): ``binomial`` (exact tail of the count of +1 losses),
  ``hoeffding_bentkus`` (the same count), ``hoeffding`` (CALM's, on the mean of the 0/1 or clipped loss) and
  ``betting`` (a capital process on the signed gap, its bet sized on data independent of the test).
* **Rules**: :func:`fixed_sequence` (Learn-Then-Test: walk the candidates from the most conservative while
  p ≤ δ) and :func:`conformal_risk_control` (the last candidate along the sequence whose monotonised
  empirical risk passes ``(n R̂ + B) / (n + 1) ≤ ε``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PVALUES",
    "RISKS",
    "Counts",
    "binomial_pvalue",
    "betting_pvalue",
    "conformal_risk_control",
    "fixed_sequence",
    "hoeffding_bentkus_pvalue",
    "hoeffding_pvalue",
    "kelly_bet",
    "monotone_losses",
    "sample_losses",
    "smallest_epsilon",
]

RISKS = ("consistency", "accuracy_gap")
BET_CAP = 0.9
"""Largest bet, as a fraction of the largest bet that keeps the capital positive: a bet sized on one split
must survive a worse one."""


def sample_losses(
    risk: str, pred: Tensor, correct: Tensor, full_pred: Tensor, full_correct: Tensor
) -> Tensor:
    """Per-sample loss of an exit assignment against the full model.

    Args:
        risk: ``consistency`` or ``accuracy_gap``.
        pred, correct: (..., N) prediction at the exit each sample takes, and whether it is right.
        full_pred, full_correct: (N,) the full model's prediction and whether it is right.

    Returns:
        (..., N) int8: 0/1 for ``consistency``, −1/0/1 for ``accuracy_gap``.

    Example:
        >>> sample_losses("accuracy_gap", torch.tensor([0, 1, 2]), torch.tensor([True, False, True]),
        ...               torch.tensor([0, 1, 1]), torch.tensor([True, True, False])).tolist()
        [0, 1, -1]
    """
    if risk == "consistency":
        return (pred != full_pred).to(torch.int8)
    if risk == "accuracy_gap":
        return (~correct).to(torch.int8) - (~full_correct).to(torch.int8)
    raise ValueError(f"Expected `risk` to be one of {RISKS} but got {risk!r}")


@dataclass(frozen=True)
class Counts:
    """How many certification samples had loss +1 and −1, per candidate (any leading shape)."""

    n: int
    plus: Tensor  # (..., K)
    minus: Tensor  # (..., K); zeros for a 0/1 loss

    @classmethod
    def of(cls, losses: Tensor) -> Counts:
        """From a (K, N) loss matrix."""
        return cls(losses.shape[-1], (losses == 1).sum(-1), (losses == -1).sum(-1))

    @property
    def mean(self) -> Tensor:
        """The empirical risk (signed for the gap)."""
        return (self.plus - self.minus).double() / self.n


def _log_binomial_cdf(n: int, eps: float) -> Tensor:
    """(n + 1,) log P(Bin(n, eps) <= k) for k = 0 .. n, in float64."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + k * math.log(eps)
        + (n - k) * math.log1p(-eps)
    )
    return torch.logcumsumexp(log_pmf, 0)


def binomial_pvalue(k: Tensor, n: int, eps: float) -> Tensor:
    """Exact p-value of H0 "P(loss = 1) > eps" for a 0/1 loss with ``k`` ones in ``n``: P(Bin(n, eps) <= k).

    Under H0 the count is stochastically larger than Bin(n, eps), so this tail bounds the probability of
    seeing ``k`` or fewer ones: valid, and the smallest such p-value based on the count.
    """
    table = _log_binomial_cdf(n, eps).exp().clamp(max=1.0)
    return table[k.long().clamp(0, n)]


def hoeffding_pvalue(mean: Tensor, n: int, eps: float, span: float = 1.0) -> Tensor:
    """Hoeffding's p-value exp(−2n (eps − mean)₊² / span²) for a loss with range ``span`` (CALM's test)."""
    gap = (eps - mean.double()).clamp(min=0)
    return torch.exp(-2 * n * gap**2 / span**2)


def _kl_bernoulli(a: Tensor, b: float) -> Tensor:
    a = a.clamp(1e-300, 1 - 1e-16)
    return a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b))


def hoeffding_bentkus_pvalue(mean: Tensor, n: int, eps: float) -> Tensor:
    """Hoeffding–Bentkus p-value for a loss in [0, 1] (Bates et al., RCPS): the smaller of
    exp(−n KL(min(mean, eps) ‖ eps)) and e · P(Bin(n, eps) <= ⌈n mean⌉)."""
    mean = mean.double()
    hoeffding = torch.exp(-n * _kl_bernoulli(torch.minimum(mean, torch.tensor(eps)), eps))
    hoeffding = torch.where(mean >= eps, torch.ones_like(mean), hoeffding)
    k = torch.ceil(n * mean - 1e-9)
    bentkus = math.e * binomial_pvalue(k, n, eps)
    return torch.minimum(hoeffding, bentkus).clamp(max=1.0)


def _log_capital(plus: Tensor, minus: Tensor, n: int, eps: float, bet: Tensor) -> Tensor:
    """log of Π (1 + bet (eps − loss_i)) over n losses in {−1, 0, 1}: it depends on the counts only."""
    zero = n - plus - minus
    return (
        minus * torch.log1p(bet * (1 + eps))
        + zero * torch.log1p(bet * eps)
        + plus * torch.log1p(-bet * (1 - eps))
    )


def kelly_bet(plus: Tensor, minus: Tensor, n: int, eps: float, iters: int = 60) -> Tensor:
    """The bet that maximises the expected log-capital if the losses were distributed as these counts say.

    The counts come from data the test does not see (calib half A); one pseudo-sample of loss +1 is added so
    that a split without any +1 loss does not bet everything. The bet lies in [0, BET_CAP / (1 − eps)]; it
    is 0 when the estimated risk is not below ``eps`` (no evidence to gain).
    """
    p_plus = (plus.double() + 1) / (n + 1)
    p_minus = minus.double() / (n + 1)
    p_zero = 1 - p_plus - p_minus

    def slope(bet: Tensor) -> Tensor:  # derivative of the expected log-capital; decreasing in bet
        return (
            p_minus * (1 + eps) / (1 + bet * (1 + eps))
            + p_zero * eps / (1 + bet * eps)
            - p_plus * (1 - eps) / (1 - bet * (1 - eps))
        )

    lo = torch.zeros_like(p_plus)
    hi = torch.full_like(p_plus, BET_CAP / (1 - eps))
    at_cap = slope(hi) >= 0
    for _ in range(iters):
        mid = (lo + hi) / 2
        up = slope(mid) > 0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    bet = torch.where(at_cap, hi, lo)
    return torch.where(slope(torch.zeros_like(bet)) <= 0, torch.zeros_like(bet), bet)


def betting_pvalue(plus: Tensor, minus: Tensor, n: int, eps: float, bet: Tensor) -> Tensor:
    """p-value of H0 "mean loss > eps" for losses in {−1, 0, 1}: 1 / capital after betting ``bet`` against H0
    on every sample (a capital process in the manner of Waudby-Smith and Ramdas).

    Under H0 each factor 1 + bet (eps − loss) has mean <= 1, so the capital has mean <= 1 and Markov's
    inequality makes 1 / capital a valid p-value, provided ``bet`` was fixed without these samples.
    """
    return torch.exp(-_log_capital(plus.double(), minus.double(), n, eps, bet.double())).clamp(max=1.0)


PValue = Callable[[Counts, float, Tensor | None], Tensor]
PVALUES: dict[str, PValue] = {
    "binomial": lambda c, eps, bet: binomial_pvalue(c.plus, c.n, eps),
    "hoeffding_bentkus": lambda c, eps, bet: hoeffding_bentkus_pvalue(c.plus.double() / c.n, c.n, eps),
    "hoeffding": lambda c, eps, bet: hoeffding_pvalue(c.plus.double() / c.n, c.n, eps),
    "betting": lambda c, eps, bet: betting_pvalue(c.plus, c.minus, c.n, eps, bet),
    "binomial_or_betting": lambda c, eps, bet: (
        2 * torch.minimum(binomial_pvalue(c.plus, c.n, eps), betting_pvalue(c.plus, c.minus, c.n, eps, bet))
    ).clamp(max=1.0),
}
"""p-value of H0 "risk > eps" from the counts. ``binomial``, ``hoeffding_bentkus`` and ``hoeffding`` read the
+1 losses only: the 0/1 loss itself (``consistency``) or the clipped gap, whose mean bounds the gap's;
``betting`` reads the signed gap and needs a bet fixed on independent data (:func:`kelly_bet`);
``binomial_or_betting`` is twice the smaller of the two (a union bound over both tests)."""
BETTING = ("betting", "binomial_or_betting")
"""The p-values that need a bet."""


def fixed_sequence(pvalues: Tensor, delta: float) -> Tensor:
    """How many candidates Learn-Then-Test fixed-sequence testing rejects: the length of the leading run of
    p-values <= ``delta`` along the last dimension (the sequence, most conservative first).

    Every rejected candidate has risk <= eps simultaneously with probability >= 1 − delta, so any of them,
    chosen in any way, may be played.

    Example:
        >>> fixed_sequence(torch.tensor([0.01, 0.05, 0.2, 0.01]), delta=0.1).item()
        2
    """
    return (pvalues <= delta).long().cumprod(-1).sum(-1)


def conformal_risk_control(losses_sum: Tensor, n: int, eps: float, bound: float = 1.0) -> Tensor:
    """How many candidates pass conformal risk control: the length of the leading run along the sequence with
    ``(losses_sum + bound) / (n + 1) <= eps``. The last of them is played; its expected risk is <= eps.

    ``losses_sum`` must be the sums of losses made monotone along the sequence (each sample's running maximum,
    see :func:`monotone_losses`), which is what the guarantee needs; they are then non-decreasing and the
    passing candidates form a prefix.
    """
    return ((losses_sum.double() + bound) / (n + 1) <= eps + 1e-12).long().cumprod(-1).sum(-1)


def monotone_losses(losses: Tensor) -> Tensor:
    """(K, N) losses replaced by their running maximum along the sequence (dim 0): non-decreasing in the
    candidate, and never below the loss itself, so a risk bound on them bounds the real risk."""
    return torch.cummax(losses, dim=0).values


def smallest_epsilon(passes: Callable[[float], bool], lo: float = 1e-6, hi: float = 1 - 1e-6) -> float | None:
    """The smallest eps in (0, 1) at which ``passes(eps)`` holds, by bisection (``passes`` is monotone in
    eps); None when it fails even at ``hi``."""
    if not passes(hi):
        return None
    if passes(lo):
        return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi
