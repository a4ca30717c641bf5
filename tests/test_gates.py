"""Gate features, the exit distribution π and the deterministic exit rule, against hand-computed values."""

import math

import pytest
import torch

from jeidnn.gates import ExitState, Gates, SequentialExitRule, exit_decision, exit_distribution, gate_features

# ----------------------------------------------------------------------------- gate features


def test_gate_features_uniform_and_one_hot():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    features = gate_features(probs)
    # uniform over 4: p_max 1/4, H = log 4, margin 0, p²/Σp² is uniform again so its entropy is log 4
    assert features[0].tolist() == pytest.approx([0.25, math.log(4), 0.0, math.log(4)], abs=1e-6)
    # one-hot: p_max 1, H = 0, margin 1, sharpened is the same one-hot, entropy 0
    assert features[1].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-7)
    assert not features.isnan().any()


def test_gate_features_skewed_distribution():
    features = gate_features(torch.tensor([0.5, 0.3, 0.2]))
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))  # 1.0297
    q = [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]  # p² = (.25, .09, .04), Σ = .38
    sharpened_entropy = -sum(x * math.log(x) for x in q)  # 0.8456
    assert features.tolist() == pytest.approx([0.5, entropy, 0.2, sharpened_entropy], abs=1e-6)


def test_gate_features_no_nan_in_forward_or_backward_on_saturated_softmax():
    # softmax of these logits underflows to an exact one-hot in float32
    logits = torch.tensor([[200.0, 0.0, -50.0], [0.0, 0.0, 0.0]], requires_grad=True)
    features = gate_features(logits.softmax(dim=-1))
    features.sum().backward()
    assert torch.isfinite(features).all()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- gates module


def test_gates_shapes_sigmoid_and_detached_features():
    gates = Gates(num_exits=4)
    assert len(gates.gates) == 3
    logits = torch.randn(6, 4, 5, requires_grad=True)
    out = gates(logits)
    assert out.logits.shape == (6, 3) and out.probs.shape == (6, 3)
    torch.testing.assert_close(out.probs, torch.sigmoid(out.logits))
    out.probs.sum().backward()
    # the gate reads detached probabilities: nothing flows back into the IM logits
    assert logits.grad is None
    assert all(p.grad is not None for p in gates.parameters())


def test_gate_with_hand_set_weights():
    gates = Gates(num_exits=2)
    with torch.no_grad():
        gates.gates[0].weight.copy_(torch.tensor([[2.0, -1.0, 0.0, 0.0]]))
        gates.gates[0].bias.fill_(0.5)
    # logits (0, 0): uniform over 2, p_max 0.5, H = log 2 -> gate logit 2·0.5 - log 2 + 0.5
    out = gates(torch.zeros(1, 2, 2))
    assert out.logits.item() == pytest.approx(1.5 - math.log(2), abs=1e-6)


def test_gate_prob_equals_forward_column():
    gates = Gates(num_exits=3)
    logits = torch.randn(7, 3, 4)
    probs = gates(logits).probs
    for index in range(2):
        assert torch.equal(gates.gate_prob(index, logits[:, index]), probs[:, index])
    with pytest.raises(IndexError):
        gates.gate_prob(2, logits[:, 2])  # the last exit has no gate


def test_gates_reject_a_single_exit():
    with pytest.raises(ValueError, match="at least 2 exits"):
        Gates(num_exits=1)


# ----------------------------------------------------------------------------- exit distribution


@pytest.mark.parametrize(
    ("g", "pi"),
    [
        ([0.2, 0.5], [0.2, 0.5, 0.3]),  # nothing saturates: π_3 = 1 - 0.7
        ([0.6, 0.7], [0.6, 0.4, 0.0]),  # π_2 = min(0.7, 1 - 0.6)
        ([1.0, 0.3], [1.0, 0.0, 0.0]),  # the first gate takes everything
        ([0.5, 0.3, 0.4], [0.5, 0.3, 0.2, 0.0]),  # π_3 = min(0.4, 1 - 0.8)
        ([0.7, 0.9, 0.5], [0.7, 0.3, 0.0, 0.0]),  # π_3 = max(0, min(0.5, 1 - 1.6)) = 0
        ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_exit_distribution_hand_values(g, pi):
    assert exit_distribution(torch.tensor([g])).squeeze(0).tolist() == pytest.approx(pi, abs=1e-6)


def test_exit_distribution_is_a_distribution_on_random_gates():
    g = torch.rand(500, 5) ** 0.5  # skewed towards 1 so that many rows saturate early
    pi = exit_distribution(g)
    assert pi.shape == (500, 6)
    assert (pi >= 0).all()
    torch.testing.assert_close(pi.sum(dim=1), torch.ones(500))


# ----------------------------------------------------------------------------- deterministic rule


@pytest.mark.parametrize(
    ("g", "expected"),
    [
        ([0.6, 0.1], 0),  # a_1 = 0.6
        ([0.6, 0.9], 0),
        ([0.5, 0.1], 0),  # a_1 = 0.5 exactly: the rule is ≥
        ([0.2, 0.5], 1),  # π = (.2, .5, .3); a_2 = 0.5 / (1 - 0.2) = 0.625
        ([0.3, 0.3], 2),  # a_2 = 0.3 / 0.7 = 0.43 -> last exit
        ([0.45, 0.9], 1),  # π_2 = min(0.9, 0.55) = 0.55; a_2 = 0.55 / 0.55 = 1
        ([0.4, 0.2, 0.25], 2),  # a = 0.4, 0.2 / 0.6 = 0.33, 0.25 / (0.6 · 0.667) = 0.625
        ([0.4, 0.2, 0.15], 3),  # a_3 = 0.15 / 0.4 = 0.375 -> last exit
        ([0.1, 0.1, 0.1], 3),
    ],
)
def test_exit_decision_hand_values(g, expected):
    assert exit_decision(torch.tensor([g])).tolist() == [expected]


def test_exit_decision_on_a_batch_is_row_independent():
    g = torch.tensor([[0.6, 0.1], [0.2, 0.5], [0.3, 0.3]])
    assert exit_decision(g).tolist() == [0, 1, 2]
    assert exit_decision(g).dtype == torch.long


def _layer_by_layer_exits(g: torch.Tensor) -> torch.Tensor:
    """Run SequentialExitRule as the layer-skipping path does: only running rows, state subset."""
    n, num_gates = g.shape
    rule = SequentialExitRule()
    exit_index = torch.full((n,), num_gates, dtype=torch.long)
    running = torch.arange(n)
    state = rule.init_state(n, dtype=g.dtype)
    for k in range(num_gates):
        exit_now, state = rule.step(g[running, k], state)
        exit_index[running[exit_now]] = k
        running, state = running[~exit_now], state[~exit_now]
    return exit_index


@pytest.mark.parametrize("num_exits", [2, 3, 6, 12])
def test_sequential_rule_reproduces_exit_decision(num_exits):
    generator = torch.Generator().manual_seed(num_exits)
    for power in (0.3, 1.0, 3.0):  # gates mostly open, uniform, mostly closed
        g = torch.rand(2000, num_exits - 1, generator=generator) ** power
        assert torch.equal(_layer_by_layer_exits(g), exit_decision(g))


def test_sequential_rule_with_real_gates_on_subsets():
    gates = Gates(num_exits=4)
    with torch.no_grad():  # g_k = sigmoid(12 (p_max - t_k)): confident samples leave early
        for gate, threshold in zip(gates.gates, (0.9, 0.7, 0.6)):
            gate.weight.copy_(torch.tensor([[12.0, 0.0, 0.0, 0.0]]))
            gate.bias.fill_(-12.0 * threshold)
    logits = torch.randn(300, 4, 3) * 3
    expected = exit_decision(gates(logits).probs)
    rule = SequentialExitRule()
    exit_index = torch.full((300,), 3, dtype=torch.long)
    running = torch.arange(300)
    state = rule.init_state(300)
    for k in range(3):
        exit_now, state = rule.step(gates.gate_prob(k, logits[running, k]), state)
        exit_index[running[exit_now]] = k
        running, state = running[~exit_now], state[~exit_now]
    assert torch.equal(exit_index, expected)
    assert set(exit_index.tolist()) == {0, 1, 2, 3}


def test_exit_state_subsetting_and_validation():
    state = ExitState(g_sum=torch.tensor([0.1, 0.2, 0.3]), survival=torch.tensor([1.0, 0.8, 0.6]))
    kept = state[torch.tensor([True, False, True])]
    assert kept.g_sum.tolist() == pytest.approx([0.1, 0.3]) and len(kept) == 2
    assert state[torch.tensor([2])].survival.tolist() == pytest.approx([0.6])
    with pytest.raises(ValueError, match="state of 3 rows"):
        SequentialExitRule().step(torch.tensor([0.5, 0.5]), state)
