"""JEI-DNN training on synthetic cached features where the right exit of every sample is known.

Three exits, three groups of equal size (sample i is in group i % 3):

* easy:   exits 0, 1 and 2 see the class   -> best exit 0 for any λ > 0;
* medium: exit 0 sees noise, exits 1, 2 do -> best exit 1 for moderate λ;
* hard:   only the last exit sees the class -> best exit 2 for moderate λ, exit 0 for large λ
          (a uniform guess at exit 0, CE ≈ ln 4 + 0.35 λ, beats 1.05 λ once λ ≳ 2).

The warm-up heads are set by hand (IM_k reads the class off its feature); the last head is more
confident, so at λ = 0 every sample's best exit is the last one.
"""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jeidnn.config import JeidnnConfig
from jeidnn.gates import Gates
from jeidnn.jeidnn_module import JeiDnnModule, JeiDnnResult, predict_exits, train_jeidnn

NUM_CLASSES, HIDDEN, NUM_EXITS = 4, 8, 3
COSTS = torch.tensor([0.35, 0.7, 1.05])


class Heads(nn.Module):
    """One linear classifier per exit; exit i reads features[:, i]."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, NUM_CLASSES) for _ in range(NUM_EXITS))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features[:, i]) for i, head in enumerate(self.heads)], dim=1)


def make_split(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    group = torch.arange(n) % 3
    easy, medium = group == 0, group == 1
    signal = 3 * nn.functional.one_hot(labels, HIDDEN).float()  # (n, H)
    features = 0.3 * torch.randn(n, NUM_EXITS, HIDDEN, generator=generator)
    features[easy, 0] += signal[easy]
    features[easy | medium, 1] += signal[easy | medium]
    features[:, 2] += signal
    return features, labels


def warm_heads() -> Heads:
    heads = Heads()
    with torch.no_grad():
        for head in heads.heads:
            head.weight.copy_(2 * torch.eye(NUM_CLASSES, HIDDEN))
            head.bias.zero_()
        heads.heads[-1].weight.mul_(2)
    return heads


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tensors here are tiny: on a busy 2-core machine intra-op threads only wait on each other
    # (a (64, 8) @ (8, 4) matmul took milliseconds), so run this module single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return make_split(600, generator), make_split(300, generator)


def cfg(**overrides) -> JeidnnConfig:
    # lr 0.1: a Linear(4, 1) gate needs larger steps than the paper's 0.01 to move in ~80 steps
    settings = dict(epochs=8, alternate_steps=4, batch_size=64, lr=0.1, min_lr=0.01)
    settings.update(overrides)
    return JeidnnConfig(**settings)


def train(data, lam: float, **overrides) -> JeiDnnResult:
    (train_x, train_y), (val_x, val_y) = data
    return train_jeidnn(
        train_x, train_y, val_x, val_y, warm_heads(), COSTS, lam, cfg(**overrides), enable_progress_bar=False
    )


def accuracy_and_cost(result: JeiDnnResult, features, labels) -> tuple[float, float]:
    logits, _, exit_index = predict_exits(result.heads, result.gates, features)
    predictions = logits[torch.arange(len(labels)), exit_index].argmax(dim=-1)
    return (predictions == labels).float().mean().item(), COSTS[exit_index].mean().item()


@pytest.fixture(scope="module")
def results(data):
    return {lam: train(data, lam) for lam in (0.0, 0.5, 3.0)}


def test_moderate_lambda_saves_cost_without_losing_accuracy(data, results):
    _, (val_x, val_y) = data
    full_accuracy = (warm_heads()(val_x)[:, -1].argmax(dim=-1) == val_y).float().mean().item()
    accuracy, cost = accuracy_and_cost(results[0.5], val_x, val_y)
    # ideal: easy, medium, hard exit at 0, 1, 2 -> cost (0.35 + 0.7 + 1.05) / 3 = 0.7, the last exit 1.05
    assert cost < 0.8
    assert accuracy >= full_accuracy - 0.03
    assert results[0.5].history["val_cost"][-1] == pytest.approx(cost, abs=1e-6)
    assert results[0.5].history["val_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)


def test_larger_lambda_exits_earlier(data, results):
    _, (val_x, val_y) = data
    costs = {lam: accuracy_and_cost(result, val_x, val_y)[1] for lam, result in results.items()}
    # λ = 0: the last (most confident) exit is every sample's best exit
    assert costs[0.0] > 1.0
    assert costs[0.0] > costs[0.5] + 0.2
    # λ = 3: the hard third no longer pays for the last exit
    assert costs[0.5] > costs[3.0] + 0.05


def test_initial_positive_weights_come_from_val(results):
    # λ = 0.5 with the warm-up heads: targets of gate 0 are 1 for the easy third (#zeros/#ones = 200/100),
    # targets of gate 1 for easy + medium (100/200)
    assert results[0.5].history["initial_pos_weight"] == pytest.approx([2.0, 0.5])
    # λ = 0: no sample should stop early, no positive target: the max weight
    assert results[0.0].history["initial_pos_weight"] == pytest.approx([5.0, 5.0])


def test_result_modules_history_and_frozen_final_head(results):
    result = results[0.5]
    warm = warm_heads()
    assert isinstance(result.gates, Gates)
    assert not result.gates.training and not result.heads.training
    assert all(p.device.type == "cpu" for p in [*result.gates.parameters(), *result.heads.parameters()])
    torch.testing.assert_close(result.heads.heads[-1].weight, warm.heads[-1].weight, rtol=0, atol=0)
    assert not torch.equal(result.heads.heads[0].weight, warm.heads[0].weight)  # the IMs were trained
    for key in ("gate_loss", "im_loss", "val_accuracy", "val_cost", "pos_weight"):
        assert len(result.history[key]) == 8, key


def test_training_is_deterministic_given_the_seed(data):
    first, second = train(data, 0.5, epochs=2), train(data, 0.5, epochs=2)
    for a, b in zip(first.gates.state_dict().values(), second.gates.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first.heads.state_dict().values(), second.heads.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sum_ablation_and_zero_epochs_run(data):
    result = train(data, 0.5, epochs=1, im_loss="sum")
    assert all(torch.isfinite(p).all() for p in result.gates.parameters())
    untrained = train(data, 0.5, epochs=0)
    assert untrained.history["val_cost"] == [] and len(untrained.history["initial_pos_weight"]) == 2


def test_gate_phase_leaves_the_ims_fixed(data):
    # 10 batches per epoch, K = 1000: every step is a gate step
    result = train(data, 0.5, epochs=1, alternate_steps=1000)
    for trained, warm in zip(result.heads.parameters(), warm_heads().parameters(), strict=True):
        assert torch.equal(trained, warm)
    assert result.history["gate_loss"][0] > 0
    assert result.history["im_loss"][0] != result.history["im_loss"][0]  # NaN: no IM step this epoch


@pytest.mark.filterwarnings("ignore:Found 1 module\\(s\\) in eval mode")  # the frozen final head
def test_phase_schedule_and_cosine_learning_rate(data):
    (train_x, train_y), (val_x, val_y) = data
    module = JeiDnnModule(warm_heads(), COSTS, 0.5, cfg(epochs=2, alternate_steps=3))
    assert [module.phase(step) for step in range(8)] == ["gate"] * 3 + ["im"] * 3 + ["gate"] * 2
    module.set_positive_weights(val_x, val_y)
    modes_seen = []
    module.heads.heads[-1].register_forward_pre_hook(lambda head, _: modes_seen.append(head.training))
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(
        module,
        DataLoader(TensorDataset(train_x, train_y), batch_size=64),
        DataLoader(TensorDataset(val_x, val_y), batch_size=300),
    )
    assert trainer.global_step == 20  # one optimizer step per batch: 2 epochs × 10 batches
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)  # cosine reached min_lr
    assert modes_seen and not any(modes_seen)  # the frozen head never left eval mode
    assert not module.heads.heads[-1].training and module.heads.heads[0].training


def test_predict_exits_shapes_and_restores_modes(data):
    _, (val_x, _) = data
    heads, gates = warm_heads(), Gates(NUM_EXITS)
    logits, gate_probs, exit_index = predict_exits(heads, gates, val_x, batch_size=128)
    assert logits.shape == (300, NUM_EXITS, NUM_CLASSES)
    assert gate_probs.shape == (300, NUM_EXITS - 1)
    assert exit_index.shape == (300,) and exit_index.dtype == torch.long
    assert not logits.requires_grad
    assert heads.training and gates.training
    heads.heads[-1].eval()
    predict_exits(heads, gates, val_x)
    assert heads.training and not heads.heads[-1].training  # submodule modes restored one by one


def test_gate_phase_reads_the_ims_in_eval_mode(data):
    # Gates must learn from the dropout-free IM outputs they see at inference.
    heads = warm_heads()
    heads.heads[0] = nn.Sequential(nn.Dropout(0.5), heads.heads[0])
    modes: list[bool] = []
    heads.heads[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    (train_x, train_y), (val_x, val_y) = data
    # K = 1000: every step of this epoch is a gate step
    train_jeidnn(
        train_x,
        train_y,
        val_x,
        val_y,
        heads,
        COSTS,
        0.5,
        cfg(epochs=1, alternate_steps=1000),
        enable_progress_bar=False,
    )
    assert modes and not any(modes)
