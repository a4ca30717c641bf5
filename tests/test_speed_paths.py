"""The layer-skipping path's shortcuts: exits nobody can leave are not evaluated or not synchronised, a single
row is never reordered, evaluation heads skip the module calls; every shortcut keeps dynamic == full."""

import pytest
import torch
from test_early_exit import BATCH, assert_same, confidence, set_constant, split_value, tiny_inputs, tiny_model

from jeidnn.model.early_exit import PatienceGates, StaticGates, ThresholdGates
from jeidnn.model.heads import ExitHead

INF = float("inf")


class HeadCounter:
    """Rows each exit head is called on (forward hooks)."""

    def __init__(self, model) -> None:
        self.rows = [0] * model.num_exits
        for k, head in enumerate(model.heads.heads):
            head.register_forward_hook(lambda module, args, out, k=k: self._count(k, args[0]))

    def _count(self, k: int, pooled: torch.Tensor) -> None:
        self.rows[k] += pooled.shape[0]


class SyncCounter:
    """Tensor -> Python conversions (`int(t)`, `t.item()`, `bool(t)`): the host synchronisations."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for name in ("__int__", "item", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def counted(tensor, *args):
            self.calls += 1
            return original(tensor, *args)

        return counted


def rows_of(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each sample alone, without its padding."""
    lengths = inputs["attention_mask"].sum(1).tolist()
    return [{k: v[i : i + 1, : int(n)] for k, v in inputs.items()} for i, n in enumerate(lengths)]


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_an_exit_with_an_infinite_threshold_is_not_evaluated(arch):
    """Exit 0 (+inf): no head call there; exit 1 splits the rows; exits and logits equal the full path's,
    at batch 8 and row by row."""
    model = tiny_model(arch, gates="threshold")
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        conf = confidence(model.forward_full(inputs).exit_logits.softmax(-1), "maxprob")  # (B, L)
    model.gates = ThresholdGates([INF, split_value(conf[:, 1])[0]])
    assert not model.gates.reads_exit(0) and model.gates.reads_exit(1)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert set(full.exit_index.tolist()) == {1, 2}
    counter = HeadCounter(model)
    assert_same(model.forward_dynamic(inputs), full)
    leaving = int((full.exit_index == 1).sum())
    assert counter.rows == [0, BATCH, BATCH - leaving]
    counter.rows = [0, 0, 0]
    for i, row in enumerate(rows_of(inputs)):
        one = model.forward_dynamic(row)
        assert one.exit_index.item() == full.exit_index[i].item()
        torch.testing.assert_close(one.logits[0], full.logits[i], atol=1e-5, rtol=1e-5)
    assert counter.rows == [0, BATCH, BATCH - leaving]


def test_which_exits_a_rule_can_leave_at():
    assert [ThresholdGates([INF, 0.5, 2.0]).can_exit(k) for k in range(3)] == [False, True, True]
    assert [PatienceGates(2).can_exit(k) for k in range(4)] == [False, False, True, True]
    assert [PatienceGates(2).reads_exit(k) for k in range(4)] == [True] * 4  # its state needs every argmax
    assert [StaticGates(1).can_exit(k) for k in range(3)] == [False, True, False]


def test_patience_cannot_stop_before_t_agreements():
    """What can_exit relies on: on logits that agree at every exit, the step rule first stops at exit t."""
    logits = torch.tensor([[5.0, 0.0, 0.0]]).repeat(4, 1)  # (B, C), the same argmax at every exit
    for patience in range(4):
        gates = PatienceGates(patience)
        state, stops = gates.init_state(4), []
        for k in range(4):
            stop, state = gates.step(k, logits, state)
            stops.append(bool(stop.all()))
        assert stops == [k >= patience for k in range(4)]


def sync_count(model, inputs, monkeypatch) -> int:
    with monkeypatch.context() as patch:
        counter = SyncCounter(patch)
        model.forward_dynamic(inputs)
    return counter.calls


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_no_host_sync_where_nobody_can_leave(arch, monkeypatch):
    """Learned gates under a threshold above 1 (no exit score reaches it) and patience before t agreements
    skip the synchronisation of those exits (the gate state is still updated: same exits as the full path)."""
    inputs = tiny_inputs(arch)
    model = tiny_model(arch, "paper")
    set_constant(model.gates, 0, -20.0)  # nobody leaves at either gated exit under tau 0.5 ...
    set_constant(model.gates, 1, -20.0)
    with torch.no_grad():
        assert model.forward_full(inputs).exit_index.tolist() == [2] * BATCH
    synced = sync_count(model, inputs, monkeypatch)
    model.exit_threshold = 1.5  # ... nor can anybody under tau 1.5: two syncs fewer
    assert sync_count(model, inputs, monkeypatch) == synced - 2
    with torch.no_grad():
        assert_same(model.forward_dynamic(inputs), model.forward_full(inputs))

    model = tiny_model(arch, gates="none")
    model.gates = PatienceGates(1)
    with_exit_1 = sync_count(model, inputs, monkeypatch)  # exit 0 cannot fire, exit 1 can
    model.gates = PatienceGates(2)
    assert sync_count(model, inputs, monkeypatch) == with_exit_1 - 1
    with torch.no_grad():
        assert_same(model.forward_dynamic(inputs), model.forward_full(inputs))


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu", "none"])
def test_evaluation_heads_compute_what_their_layers_compute(activation):
    """The evaluation shortcut (no Sequential / dropout calls) is bit-identical; training keeps dropout."""
    torch.manual_seed(0)
    head = ExitHead(16, 3, activation, dropout=0.5).eval()
    pooled = torch.randn(5, 16)
    assert torch.equal(head(pooled), head.net(pooled))
    head.train()
    torch.manual_seed(1)
    trained = head(pooled)
    torch.manual_seed(1)
    assert torch.equal(trained, head.net(pooled))
    assert not torch.equal(trained, head.eval()(pooled))  # dropout 0.5 on 16 units: some are dropped
