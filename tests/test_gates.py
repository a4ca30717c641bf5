"""Gate inputs, networks, exit distributions and exit rules, against hand-computed values."""

import math

import pytest
import torch

from jeidnn.config.gating import GateSettings
from jeidnn.model.exit_rules import conditional_distribution, exit_scores, paper_distribution
from jeidnn.model.gate_inputs import confidence_features, exit_inputs, probabilities
from jeidnn.model.gates import Gates
from jeidnn.model.policies import score_exits

# ----------------------------------------------------------------------------- gate features


def test_confidence_features_uniform_and_one_hot():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    features = confidence_features(probs)
    # uniform over 4: p_max 1/4, H = log 4, margin 0, p²/Σp² is uniform again so its entropy is log 4
    assert features[0].tolist() == pytest.approx([0.25, math.log(4), 0.0, math.log(4)], abs=1e-6)
    # one-hot: p_max 1, H = 0, margin 1, sharpened is the same one-hot, entropy 0
    assert features[1].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-7)
    assert not features.isnan().any()


def test_confidence_features_skewed_distribution():
    features = confidence_features(torch.tensor([0.5, 0.3, 0.2]))
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))  # 1.0297
    q = [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]  # p² = (.25, .09, .04), Σ = .38
    sharpened_entropy = -sum(x * math.log(x) for x in q)  # 0.8456
    assert features.tolist() == pytest.approx([0.5, entropy, 0.2, sharpened_entropy], abs=1e-6)


def test_confidence_features_no_nan_in_forward_or_backward_on_saturated_softmax():
    # softmax of these logits underflows to an exact one-hot in float32
    logits = torch.tensor([[200.0, 0.0, -50.0], [0.0, 0.0, 0.0]], requires_grad=True)
    features = confidence_features(logits.softmax(dim=-1))
    features.sum().backward()
    assert torch.isfinite(features).all()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("classes", [2, 3, 8, 9, 150])
def test_probabilities_are_the_softmax_written_out_or_not(classes):
    logits = 4 * torch.randn(50, 5, classes, generator=torch.Generator().manual_seed(classes))
    logits[0, 0, 0] = 200.0  # saturates: the others underflow to exactly 0
    probs = probabilities(logits.double())
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, logits.double().softmax(-1).float(), rtol=0, atol=1e-6)
    assert probs[0, 0].tolist() == [1.0] + [0.0] * (classes - 1)


# ----------------------------------------------------------------------------- trajectory inputs


def test_trajectory_inputs_by_hand():
    # three gated exits; exit 2 predicts class 1, as does exit 1 but not exit 0
    conf = torch.tensor([[[0.5, 1.0, 0.1, 0.9], [0.6, 0.8, 0.3, 0.7], [0.9, 0.3, 0.8, 0.2]]])  # (1, 3, 4)
    preds = torch.tensor([[0, 1, 1]])
    x = exit_inputs(conf, preds, "trajectory")  # (1, 3 gates, 4 + 4·2 + 2)
    assert x.shape == (1, 3, 14)
    own, earlier = [0.9, 0.3, 0.8, 0.2], [0.5, 1.0, 0.1, 0.9, 0.6, 0.8, 0.3, 0.7]
    # gate 2: exit 1 agrees, exit 0 does not -> 1 consecutive, / 3 gates; Δp_max = 0.9 - 0.6
    assert x[0, 2].tolist() == pytest.approx(own + earlier + [1 / 3, 0.3], abs=1e-6)
    # gate 1: exit 0's features, zero padding, no agreement (class 0 vs 1), Δp_max = 0.6 - 0.5
    assert x[0, 1].tolist() == pytest.approx([0.6, 0.8, 0.3, 0.7, 0.5, 1.0, 0.1, 0.9] + [0.0] * 4 + [0, 0.1])
    # the first gate: its own features, zero padding, no agreement, no change
    assert x[0, 0].tolist() == pytest.approx([0.5, 1.0, 0.1, 0.9] + [0.0] * 8 + [0.0, 0.0])
    assert exit_inputs(conf, preds, "confidence")[0, 1].tolist() == pytest.approx([0.6, 0.8, 0.3, 0.7])


def test_agreement_counts_only_the_unbroken_run_back_from_the_previous_exit():
    # predictions 2, 2, 0, 2, 2, 2: gate 5 sees exits 4, 3 agree, exit 2 breaks the run (exits 0-1 agree
    # again but do not count); gate 2 (class 0) agrees with no earlier exit
    conf = torch.rand(1, 6, 4)
    x = exit_inputs(conf, torch.tensor([[2, 2, 0, 2, 2, 2]]), "trajectory")
    agree = x[0, :, 4 * 6]  # the column after own + 5 earlier exits' features
    assert (agree * 6).tolist() == pytest.approx([0, 1, 0, 0, 1, 2])


# ----------------------------------------------------------------------------- gate networks

SETTINGS = [
    GateSettings(),
    GateSettings("trajectory", "mlp", "conditional", standardize=True),
    GateSettings("hidden", "linear", "paper", standardize=True),
    GateSettings("hidden", "mlp", "conditional", standardize=False, width=4, projection=3),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_gates_shapes_and_detached_inputs(settings):
    gates = Gates(num_exits=4, settings=settings, hidden_size=6)
    logits = torch.randn(5, 4, 3, requires_grad=True)
    hidden = torch.randn(5, 3, 6)
    out = gates(logits, hidden)
    assert out.shape == (5, 3)
    out.sum().backward()
    assert logits.grad is None  # the gate reads detached probabilities: nothing reaches the IMs
    assert all(p.grad is not None for p in gates.parameters())
    scores = gates.scores(logits, hidden)
    assert scores.shape == (5, 3) and (scores >= 0).all() and (scores <= 1).all()


def test_paper_gate_with_hand_set_weights():
    gates = Gates(num_exits=2)
    with torch.no_grad():
        gates.w.copy_(torch.tensor([[[2.0, -1.0, 0.0, 0.0]]]))
        gates.b.fill_(0.5)
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])  # exit 0: uniform over 2 -> p_max 0.5, H = ln 2
    expected = torch.sigmoid(torch.tensor(2 * 0.5 - math.log(2) + 0.5))
    torch.testing.assert_close(gates.scores(logits)[0, 0], expected)


def test_standardisation_uses_training_statistics():
    gates = Gates(3, GateSettings("trajectory", "linear", "conditional", standardize=True))
    logits = torch.randn(200, 2, 3) * 3
    gates.set_statistics(logits)
    x = gates._raw_inputs(logits.softmax(-1))
    z = (x - gates.input_mean) / gates.input_std
    varying = x.std(0) > 1e-6
    torch.testing.assert_close(z.mean(0)[varying], torch.zeros(int(varying.sum())), atol=1e-5, rtol=0)
    assert (gates.input_std[~varying] == 1).all() and (gates.input_mean[~varying] == 0).all()
    unstandardised = Gates(3)
    unstandardised.set_statistics(logits)  # a no-op for the paper's gate
    assert (unstandardised.input_std == 1).all()


@pytest.mark.parametrize("settings", SETTINGS)
def test_one_exit_at_a_time_equals_the_batch_path(settings):
    """The layer-skipping path scores only the rows still running; it must reproduce the batch's exits.

    Scores may differ in the last bit (vectorised exp/sigmoid kernels round a tensor's tail elements
    differently), so a score within 1e-6 of the threshold could flip; none is here."""
    gates = Gates(5, settings, hidden_size=7, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    logits, hidden = 2 * torch.randn(64, 5, 3, generator=gen), torch.randn(64, 4, 7, generator=gen)
    gates.set_statistics(logits[:, :4], hidden)
    full = gates.scores(logits, hidden)
    rows, state = torch.arange(64), gates.init_state(64)
    exits = torch.full((64,), 4)
    for i in range(4):
        score, state = gates.step(i, logits[rows, i], hidden[rows, i], state)
        torch.testing.assert_close(score, full[rows, i], rtol=0, atol=1e-6)
        assert ((full[rows, i] - 0.5).abs() > 1e-6).all()
        stop = score >= 0.5
        exits[rows[stop]] = i
        keep = (~stop).nonzero().squeeze(1)
        rows, state = rows[keep], state[keep]
    assert torch.equal(exits, score_exits(full))


@pytest.mark.parametrize("settings", SETTINGS[1:3])
def test_a_whole_split_is_scored_in_blocks_of_rows_with_the_unblocked_result(settings):
    gates = Gates(5, settings, hidden_size=7, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    logits, hidden = 2 * torch.randn(5000, 5, 3, generator=gen), torch.randn(5000, 4, 7, generator=gen)
    gates.set_statistics(logits[:, :4], hidden)
    whole = gates(logits, hidden).detach()  # with gradient: one block
    with torch.no_grad():
        blocked = gates(logits, hidden)  # 2048 rows at a time
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0 if settings.inputs != "hidden" else 1e-6)


def test_select_copies_one_model_and_single_exit_is_refused():
    from jeidnn.model.gates import StackedGates

    stacked = StackedGates(GateSettings("trajectory", "mlp", "conditional"), 3, 4, num_models=3)
    logits = torch.randn(3, 6, 3, 2)
    one = stacked.select(1)
    assert isinstance(one, Gates) and one.num_models == 1
    torch.testing.assert_close(one(logits[1]), stacked(logits)[1])
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
    assert paper_distribution(torch.tensor([g])).squeeze(0).tolist() == pytest.approx(pi, abs=1e-6)


def test_exit_distribution_is_a_distribution_on_random_gates():
    g = torch.rand(500, 5) ** 0.5  # skewed towards 1 so that many rows saturate early
    pi = paper_distribution(g)
    assert pi.shape == (500, 6)
    assert (pi >= 0).all()
    torch.testing.assert_close(pi.sum(dim=1), torch.ones(500))


def test_conditional_distribution_by_hand():
    pi = conditional_distribution(torch.tensor([[0.2, 0.5], [1.0, 0.3]]))
    assert pi.tolist() == [pytest.approx([0.2, 0.4, 0.4]), pytest.approx([1.0, 0.0, 0.0])]


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
def test_paper_rule_hand_values(g, expected):
    assert score_exits(exit_scores(torch.tensor([g]), "paper")).tolist() == [expected]


def test_score_exits_threshold_and_last_exit():
    scores = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.1], [0.9, 0.0, 0.0]])
    assert score_exits(scores).tolist() == [1, 3, 0]
    assert score_exits(scores, tau=0.15).tolist() == [0, 3, 0]
    assert score_exits(scores, tau=float("inf")).tolist() == [3, 3, 3]
    assert torch.equal(exit_scores(scores, "conditional"), scores)


# ----------------------------------------------------------------------------- gate FLOPs


def test_gate_flops_count_every_multiply_add_of_the_gate():
    from jeidnn.config.gating import GateVariant
    from jeidnn.model.cost import GATE_FLOPS, gate_flops

    # The paper's gate: Linear(4 -> 1), 4 multiply-adds, 2 FLOPs each (as FlopCounterMode counts a matmul).
    assert gate_flops(GateSettings(), num_exits=4, hidden_size=8) == 8.0 == GATE_FLOPS
    # Trajectory inputs with L = 4: 4 features x 3 exits + agreement + delta = 14 inputs; an MLP of
    # width 16: 14 x 16 + 16 x 1 multiply-adds.
    mlp = GateSettings("trajectory", "mlp", "conditional", width=16)
    assert gate_flops(mlp, num_exits=4, hidden_size=8) == 2 * (14 * 16 + 16) == 480.0
    # Hidden inputs with L = 3, H = 8: the projection 8 x 3, then a linear gate on 4 x 2 + 2 + 3 = 13 inputs.
    hidden = GateSettings("hidden", "linear", projection=3)
    assert gate_flops(hidden, num_exits=3, hidden_size=8) == 2 * (8 * 3 + 13) == 74.0
    # A learned method pays for its gates (a GateVariant is a GateSettings).
    variant = GateVariant(inputs="trajectory", arch="mlp", width=16)
    assert gate_flops(variant, 4, 8) == 480.0  # a variant is its gate settings


def test_gate_flops_match_the_gate_networks_parameters():
    from jeidnn.model.cost import gate_flops

    # Every weight of a gate (not its biases) is used once per sample in one multiply-add.
    for settings in SETTINGS:
        gates = Gates(4, settings, hidden_size=6)
        weights = sum(p.numel() for name, p in gates.named_parameters() if name in ("w", "w1", "proj"))
        assert gate_flops(settings, 4, 6) == 2 * weights / 3, settings
