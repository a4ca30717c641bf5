"""The history-aware baselines: the running product of max-probabilities and patience with confidence, by
hand, as gates (their full path, their layer-by-layer rule and the evaluation's policy agree) and in the
layer-skipping model (dynamic == full on every architecture)."""

import math

import pytest
import torch
from test_early_exit import ARCHS, assert_same, split_value, tiny_inputs, tiny_model

from jeidnn.errors import JeidnnError
from jeidnn.model.early_exit import build_gates, gate_config
from jeidnn.model.heads import ExitHeads
from jeidnn.model.policies import (
    apply_thresholds,
    global_threshold_exits,
    patience_confidence_exits,
    patience_exits,
    running_product,
)
from jeidnn.model.rule_gates import PatienceConfidenceGates, ProductGates, ThresholdGates
from jeidnn.model.structured import keep_exits


def two_class_logits(p_first: list[list[float]]) -> torch.Tensor:
    """Logits (N, L, 2) whose softmax is (p, 1 - p) at each exit, up to rounding."""
    p = torch.tensor(p_first, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=-1).float()


# ---------------------------------------------------------------------- by hand
def test_running_product_by_hand():
    conf = torch.tensor([[0.9, 0.8, 0.5], [0.5, 1.0, 0.4]])
    torch.testing.assert_close(running_product(conf), torch.tensor([[0.9, 0.72, 0.36], [0.5, 0.5, 0.2]]))


def test_product_gates_by_hand_differ_from_max_prob_thresholds():
    # Max-probabilities (p or 1 - p) per exit; thresholds 0.7 at exit 0 and 0.6 at exit 1.
    logits = two_class_logits(
        [
            [0.9, 0.5, 0.5],  # 0.9 >= 0.7: exit 0
            [0.4, 0.95, 0.5],  # 0.6 < 0.7; 0.6 * 0.95 = 0.57 < 0.6: the last exit
            [0.65, 0.99, 0.5],  # 0.65 < 0.7; 0.65 * 0.99 = 0.6435 >= 0.6: exit 1
        ]
    )
    gates = ProductGates([0.7, 0.6])
    torch.testing.assert_close(gates(logits)[:, :2], torch.tensor([[0.9, 0.45], [0.6, 0.57], [0.65, 0.6435]]))
    assert gates.exits(logits).tolist() == [0, 2, 1]
    # The same thresholds on the max-probability of this exit alone let the second sample leave at exit 1.
    assert ThresholdGates([0.7, 0.6]).exits(logits).tolist() == [0, 1, 1]


def test_patience_confidence_by_hand():
    preds = torch.tensor([[0, 0, 0, 0], [1, 2, 2, 2], [0, 0, 1, 1], [2, 2, 2, 2]])
    maxprob = torch.tensor(
        [[0.9, 0.5, 0.8, 0.3], [0.95, 0.9, 0.6, 0.9], [0.99, 0.99, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]
    )
    # k = 1, t = 0.7: row 0 agrees at exit 1 but 0.5 < 0.7, then leaves at 2; row 1 agrees first at exit 2
    # (0.6 < 0.7) and runs to the last exit; row 2 leaves at 1; row 3 is never confident.
    assert patience_confidence_exits(preds, maxprob, 1, 0.7).tolist() == [2, 3, 1, 3]
    # t = 0 is PABEE's patience, k = 0 one global max-probability threshold.
    assert patience_confidence_exits(preds, maxprob, 2, 0.0).tolist() == [2, 3, 3, 2]
    assert patience_exits(preds, 2).tolist() == [2, 3, 3, 2]
    assert patience_confidence_exits(preds, maxprob, 0, 0.7).tolist() == [0, 0, 0, 3]
    assert global_threshold_exits(maxprob, 0.7).tolist() == [0, 0, 0, 3]
    assert patience_confidence_exits(preds, maxprob, 0, math.inf).tolist() == [3] * 4
    with pytest.raises(ValueError, match="non-negative integer but got -1"):
        patience_confidence_exits(preds, maxprob, -1, 0.5)


def test_which_exits_the_history_rules_read_and_leave_at():
    product = ProductGates([0.5, math.inf, math.inf])
    assert [product.can_exit(k) for k in range(3)] == [True, False, False]
    assert [product.reads_exit(k) for k in range(3)] == [True, False, False]
    product = ProductGates([math.inf, 0.5, math.inf])  # the product at exit 1 needs exit 0's max-prob
    assert [product.can_exit(k) for k in range(3)] == [False, True, False]
    assert [product.reads_exit(k) for k in range(3)] == [True, True, False]
    both = PatienceConfidenceGates(2, 0.8)
    assert [both.can_exit(k) for k in range(4)] == [False, False, True, True]
    assert [both.reads_exit(k) for k in range(4)] == [True] * 4
    never = PatienceConfidenceGates(0, math.inf)
    assert [never.can_exit(k) or never.reads_exit(k) for k in range(3)] == [False] * 3


def test_history_gates_round_trip_their_config_and_refuse_bad_values():
    for gates in (ProductGates([0.5, math.inf]), PatienceConfidenceGates(1, math.inf)):
        entry = gate_config(gates)
        assert "inf" in str(entry)  # strict JSON: infinity is written as a string
        again = build_gates(entry, 3)
        assert type(again) is type(gates) and gate_config(again) == entry
    assert gate_config(PatienceConfidenceGates(2, 0.3)) == {
        "kind": "patience_confidence",
        "patience": 2,
        "threshold": float(torch.tensor(0.3)),  # float32, as the evaluation compares it
    }
    with pytest.raises(JeidnnError, match="patience must be a non-negative integer, got -1"):
        PatienceConfidenceGates(-1, 0.5)
    with pytest.raises(JeidnnError, match="the confidence threshold must be a number, got 'x'"):
        PatienceConfidenceGates(1, "x")  # type: ignore[arg-type]
    with pytest.raises(JeidnnError, match="the patience_confidence gates entry of the model config lacks"):
        build_gates({"kind": "patience_confidence", "patience": 1}, 3)


def test_keep_exits_keeps_the_history_rules():
    heads = ExitHeads([1, 2, 3, 4], 8, 3, "tanh")
    _, product = keep_exits(heads, ProductGates([0.9, 0.8, 0.7]), 2)
    assert product.thresholds.tolist() == pytest.approx([0.9, 0.8])
    both = PatienceConfidenceGates(1, 0.5)
    assert keep_exits(heads, both, 2)[1] is both


# ---------------------------------------------------------------------- gates == policies
def test_history_gates_follow_the_policies_on_random_logits():
    """Full path, layer-by-layer rule and the evaluation's function give the same exits."""
    generator = torch.Generator().manual_seed(5)
    exit_logits = torch.randn(300, 5, 2, generator=generator) * 2  # (N, L, C): long agreeing runs
    probs = exit_logits.softmax(-1)
    preds, maxprob = probs.argmax(-1), probs.amax(-1)
    cases = [ProductGates([0.8, 0.6, 0.5, 0.4]), ProductGates([math.inf, 0.7, -1.0, 0.2])]
    cases += [PatienceConfidenceGates(k, t) for k in (0, 1, 3) for t in (0.0, 0.75, 0.95)]
    for gates in cases:
        if isinstance(gates, ProductGates):
            expected = apply_thresholds(running_product(maxprob), gates.thresholds)  # as the candidates
        else:
            expected = patience_confidence_exits(preds, maxprob, gates.patience, gates.threshold)
        exits = gates.exits(exit_logits)
        assert torch.equal(exits, expected), gates
        trivial = isinstance(gates, PatienceConfidenceGates) and (gates.patience, gates.threshold) == (0, 0.0)
        assert len(set(exits.tolist())) >= 2 or trivial, gates  # (k, t) = (0, 0) sends everyone to exit 0
        state, stops = gates.init_state(300), []
        for k in range(4):
            stop, state = gates.step(k, exit_logits[:, k], state)
            stops.append(stop)
        stops.append(torch.ones(300, dtype=torch.bool))
        assert torch.equal(torch.stack(stops, 1).int().argmax(1), exits), gates


# ---------------------------------------------------------------------- dynamic == full
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["product", "patience_confidence"])
def test_dynamic_matches_full_history_gates(arch, kind):
    model = tiny_model(arch, gates="none")
    inputs = tiny_inputs(arch, 16)
    with torch.no_grad():
        probs = model.forward_full(inputs).exit_logits.softmax(-1)  # (B, L, C)
    maxprob = probs.amax(-1)
    if kind == "product":
        product = running_product(maxprob)
        model.gates = ProductGates([split_value(product[:, 0])[0], split_value(product[:, 1])[0]])
    else:  # a threshold that splits the rows whose prediction at exit 1 agrees with exit 0's
        agree = probs[:, 0].argmax(-1) == probs[:, 1].argmax(-1)
        spread = int(agree.sum()) >= 2
        model.gates = PatienceConfidenceGates(1, split_value(maxprob[agree, 1])[0] if spread else 0.0)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert torch.equal(full.exit_index, model.gates.exits(full.exit_logits))
    if kind == "product" or spread:
        assert len(set(full.exit_index.tolist())) >= 2
    assert_same(model.forward_dynamic(inputs), full)
