"""JEI-DNN losses on a 3-exit, 2-class toy batch whose values are worked out by hand.

Toy batch (logits chosen so that the softmax probabilities are simple fractions):

    sample 0, label 0: exit logits (0, 0), (ln 3, 0), (ln 9, 0) -> p_0 = 1/2, 3/4, 9/10
                       CE = ln 2, ln(4/3), ln(10/9)
    sample 1, label 1: exit logits (ln 3, 0), (0, 0), (0, ln 4) -> p_1 = 1/4, 1/2, 4/5
                       CE = ln 4, ln 2, ln(5/4)

Gates g = (0.6, 0.5) and (0.2, 0.5) give π = (0.6, 0.4, 0) and (0.2, 0.5, 0.3).
"""

import math

import pytest
import torch

from jeidnn.model.exit_rules import conditional_distribution, paper_distribution
from jeidnn.train.losses import (
    best_exit,
    expected_loss,
    gate_loss,
    gate_targets,
    im_loss,
    per_exit_ce,
    positive_weights,
    summed_exit_ce,
    warmup_loss,
)

LN = math.log
CE = [[LN(2), LN(4 / 3), LN(10 / 9)], [LN(4), LN(2), LN(5 / 4)]]
PI = [[0.6, 0.4, 0.0], [0.2, 0.5, 0.3]]
COSTS = torch.tensor([0.3, 0.6, 1.0])


def toy_logits() -> torch.Tensor:
    return torch.tensor(
        [
            [[0.0, 0.0], [LN(3), 0.0], [LN(9), 0.0]],
            [[LN(3), 0.0], [0.0, 0.0], [0.0, LN(4)]],
        ]
    )


LABELS = torch.tensor([0, 1])


def test_per_exit_ce_toy_batch():
    assert per_exit_ce(toy_logits(), LABELS).tolist() == [pytest.approx(row, abs=1e-6) for row in CE]


def test_pi_of_toy_gates():
    pi = paper_distribution(torch.tensor([[0.6, 0.5], [0.2, 0.5]]))
    assert pi.tolist() == [pytest.approx(row, abs=1e-6) for row in PI]


def test_im_loss_values():
    # weighted: r(x) · Σ π CE = Σ CE in value, so both modes give
    # mean(ln 2 + ln 4/3 + ln 10/9, ln 4 + ln 2 + ln 5/4) = mean(ln(80/27), ln 10) = (1.08619 + 2.30259) / 2
    expected = (LN(80 / 27) + LN(10)) / 2
    pi = torch.tensor(PI)
    assert im_loss(toy_logits(), LABELS, pi, "weighted").item() == pytest.approx(expected, abs=1e-5)
    assert im_loss(toy_logits(), LABELS, pi, "uniform").item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="weighted"):
        im_loss(toy_logits(), LABELS, pi, "mean")


def test_im_loss_weighted_gradient_by_hand():
    logits = toy_logits().requires_grad_(True)
    im_loss(logits, LABELS, torch.tensor(PI), "weighted").backward()
    # d/dz of r · π_l · CE_l / N with r constant is (r π_l / N)(softmax - onehot).
    r0 = LN(80 / 27) / (0.6 * LN(2) + 0.4 * LN(4 / 3))  # 1.08619 / 0.53096 = 2.0457
    r1 = LN(10) / (0.2 * LN(4) + 0.5 * LN(2) + 0.3 * LN(5 / 4))  # 2.30259 / 0.69078 = 3.3333
    # sample 0, exit 0: softmax (1/2, 1/2), label 0 -> (-1/2, 1/2)
    assert logits.grad[0, 0].tolist() == pytest.approx([r0 * 0.6 / 2 * -0.5, r0 * 0.6 / 2 * 0.5], abs=1e-5)
    # sample 0, exit 2 has π = 0: no gradient although its CE is not 0
    assert logits.grad[0, 2].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    # sample 1, exit 0: softmax (3/4, 1/4), label 1 -> (3/4, -3/4)
    assert logits.grad[1, 0].tolist() == pytest.approx([r1 * 0.2 / 2 * 0.75, r1 * 0.2 / 2 * -0.75], abs=1e-5)


def test_im_loss_normaliser_is_detached():
    pi = torch.tensor(PI)

    def grad_of(loss_fn):
        logits = toy_logits().requires_grad_(True)
        loss_fn(logits).backward()
        return logits.grad

    weighted = grad_of(lambda z: im_loss(z, LABELS, pi, "weighted"))
    plain_sum = grad_of(lambda z: im_loss(z, LABELS, pi, "uniform"))

    def attached(z):  # the authors' code: r keeps its graph, so r · Σ π CE is Σ CE identically
        ce = per_exit_ce(z, LABELS)
        expected = (pi * ce).sum(dim=1)
        return (ce.sum(dim=1) / expected * expected).mean()

    # sum mode: every exit gets (softmax - onehot) / N, e.g. sample 0 exit 2: (1/10, -1/10) / 2
    assert plain_sum[0, 2].tolist() == pytest.approx([-0.05, 0.05], abs=1e-6)
    torch.testing.assert_close(grad_of(attached), plain_sum)
    assert not torch.allclose(weighted, plain_sum, atol=1e-3)


def test_im_loss_pi_gets_no_gradient_and_tiny_expected_loss_is_safe():
    logits = torch.tensor([[[60.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    pi = torch.tensor([[1.0, 0.0], [0.5, 0.5]], requires_grad=True)
    # sample 0 exits where its CE is ~exp(-60): Σ π CE ≈ 0, so r falls back to 1 instead of exploding
    loss = im_loss(logits, torch.tensor([0, 0]), pi, "weighted")
    loss.backward()
    assert loss.item() == pytest.approx((0.0 + 2 * LN(2)) / 2, abs=1e-5)
    assert torch.isfinite(logits.grad).all()
    assert pi.grad is None


@pytest.mark.parametrize(
    ("lam", "targets"),
    [
        # scores CE + λc, sample 0 CE = (0.693, 0.288, 0.105), sample 1 CE = (1.386, 0.693, 0.223)
        (0.0, [[0, 0], [0, 0]]),  # plain argmin CE: the last exit for both
        (1.0, [[0, 1], [0, 0]]),  # s0: (0.993, 0.888, 1.105) -> 1;  s1: (1.686, 1.293, 1.223) -> 2
        (1.5, [[1, 1], [0, 1]]),  # s0: (1.143, 1.188, 1.605) -> 0;  s1: (1.836, 1.593, 1.723) -> 1
        (3.0, [[1, 1], [1, 1]]),  # s0: (1.593, 2.088, 3.105) -> 0;  s1: (2.286, 2.493, 3.223) -> 0
    ],
)
def test_gate_targets_toy_batch(lam, targets):
    assert gate_targets(torch.tensor(CE), COSTS, lam).tolist() == targets


def test_gate_targets_ties_pick_the_earlier_exit():
    # every score is 1.0: the cheaper exit wins, so every gate should open
    ce = torch.tensor([[1.0, 0.8, 0.6]])
    assert gate_targets(ce, torch.tensor([0.0, 0.2, 0.4]), 1.0).tolist() == [[1.0, 1.0]]


def test_positive_weights_count_the_exact_best_exit():
    # λ = 1.0: best exits (1, 2) (see test_gate_targets_toy_batch); exact counts n = (0, 1) of N = 2
    ce = torch.tensor(CE)
    assert best_exit(ce, COSTS, 1.0).tolist() == [1, 2]
    # w = min((N - n) / max(n, 0.1), 5): gate 0: 2 / 0.1 -> clipped to 5; gate 1: 1 / 1
    assert positive_weights(ce, COSTS, 1.0, "exact").tolist() == pytest.approx([5.0, 1.0])
    # cumulative counts (0, 1): the same here; λ = 1.5: best (0, 1): exact counts (1, 1) -> weights (1, 1),
    # cumulative counts (1, 2) -> weights (1, 0)
    assert positive_weights(ce, COSTS, 1.5, "exact").tolist() == pytest.approx([1.0, 1.0])
    assert positive_weights(ce, COSTS, 1.5, "cumulative").tolist() == pytest.approx([1.0, 0.0])
    assert positive_weights(ce, COSTS, 1.5, "none").tolist() == [1.0, 1.0]
    assert positive_weights(ce, COSTS, 1.0, "exact", max_weight=30).tolist() == pytest.approx([20.0, 1.0])
    with pytest.raises(ValueError, match="exact"):
        positive_weights(ce, COSTS, 1.0, "balanced")


def test_expected_loss_by_hand_and_its_gradient_reaches_the_gates():
    g = torch.tensor([[0.2, 0.5]], requires_grad=True)
    pi = conditional_distribution(g)  # (0.2, 0.4, 0.4)
    errors = torch.tensor([[1.0, 0.0, 0.0]])
    # Σ π (e + λ c) with λ = 0.5: 0.2 (1 + .15) + 0.4 (0 + .3) + 0.4 (0 + .5) = 0.23 + 0.12 + 0.2
    loss = expected_loss(pi, errors, COSTS, 0.5)
    assert loss.item() == pytest.approx(0.55, abs=1e-6)
    loss.backward()
    # d/dg1: π = (g1, (1-g1) g2, (1-g1)(1-g2)) -> 1.15 - 0.5 · 0.3 - 0.5 · 0.5 = 0.75
    assert g.grad[0, 0].item() == pytest.approx(0.75, abs=1e-6)


def test_gate_loss_by_hand():
    gate_logits = torch.tensor([[0.0, LN(3)], [LN(3), 0.0]])  # sigmoid = 1/2, 3/4 / 3/4, 1/2
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    pos_weight = torch.tensor([2.0, 0.5])
    # (0,0) t=1 w=2: 2 ln 2;  (0,1) t=1 w=.5: .5 ln(4/3);  (1,0) t=0 w=1: -ln(1/4) = ln 4;  (1,1): .5 ln 2
    expected = (2 * LN(2) + 0.5 * LN(4 / 3) + LN(4) + 0.5 * LN(2)) / 4
    assert gate_loss(gate_logits, targets, pos_weight).item() == pytest.approx(expected, abs=1e-6)


def test_warmup_loss_by_hand():
    # the plain sum over exits (no per-exit weights: each IM sees only its own term)
    sample0 = LN(2) + LN(4 / 3) + LN(10 / 9)
    sample1 = LN(4) + LN(2) + LN(5 / 4)
    assert warmup_loss(toy_logits(), LABELS).item() == pytest.approx((sample0 + sample1) / 2, abs=1e-5)


def test_summed_exit_ce_against_hand_computed_values():
    """Two samples, two exits, two classes: per-exit CEs log 2 (uniform logits) and log(1 + e^-2)."""
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    ce = torch.tensor([[math.log(2), math.log(1 + math.exp(-2))], [math.log(2), math.log(1 + math.exp(2))]])
    ce = ce.double()
    torch.testing.assert_close(summed_exit_ce(logits, labels), ce.sum(1).mean())
    torch.testing.assert_close(summed_exit_ce(logits, labels, "sum"), ce.sum())
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(summed_exit_ce(logits, labels, "sum", weights), (ce * weights).sum())
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        summed_exit_ce(logits, labels, "none")


def test_every_phase_that_trains_all_exits_uses_the_one_summed_exit_ce():
    """The warm-up, the joint phase, pruning's recovery and importance: one implementation, not four."""
    import inspect

    import jeidnn.compress.importance
    import jeidnn.compress.recovery
    from jeidnn.train.modules import JointModule

    for module in (jeidnn.compress.importance, jeidnn.compress.recovery):
        source = inspect.getsource(module)
        assert "summed_exit_ce(" in source and "cross_entropy(" not in source.replace("summed_exit_ce(", "")
    assert "summed_exit_ce(" in inspect.getsource(JointModule.loss_sum)
    logits, labels = torch.randn(6, 3, 4), torch.randint(0, 4, (6,))
    assert torch.equal(warmup_loss(logits, labels), summed_exit_ce(logits, labels))
