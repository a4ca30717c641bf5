"""The vectorised λ sweep against train_jeidnn, on the synthetic data of test_jeidnn_training."""

import pytest
import torch
from test_jeidnn_training import COSTS, HIDDEN, NUM_CLASSES, NUM_EXITS, cfg, make_split, warm_heads
from torch import nn

from jeidnn.gates import Gates
from jeidnn.heads import ExitHeads
from jeidnn.jeidnn_module import JeiDnnResult, predict_exits, train_jeidnn
from jeidnn.sweep import train_jeidnn_sweep


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return make_split(600, generator), make_split(300, generator)


def sweep(data, heads: nn.Module, lambdas: list[float], **overrides) -> list[JeiDnnResult]:
    (train_x, train_y), (val_x, val_y) = data
    return train_jeidnn_sweep(
        train_x, train_y, val_x, val_y, heads, COSTS, lambdas, cfg(**overrides), enable_progress_bar=False
    )


def mean_cost(result: JeiDnnResult, features: torch.Tensor) -> float:
    return COSTS[predict_exits(result.heads, result.gates, features).exit_index].mean().item()


# dropout 0.1 as well: the sweep draws train_jeidnn's dropout masks, so even then the runs agree
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("im_head", ["linear", "mlp"])
def test_each_lambda_matches_its_own_train_jeidnn_run(data, im_head, dropout):
    # the final head is a tanh MLP for both IM kinds, so it differs from linear IMs
    heads = ExitHeads(list(range(1, NUM_EXITS + 1)), HIDDEN, NUM_CLASSES, "tanh", dropout, im_head=im_head)
    lambdas = [0.2, 1.0]
    # 3 epochs of 10 batches, phases of 3 steps: phase switches inside and across epochs
    settings = dict(epochs=3, alternate_steps=3)
    results = sweep(data, heads, lambdas, **settings)
    assert len(results) == len(lambdas)
    (train_x, train_y), (val_x, val_y) = data
    for lam, result in zip(lambdas, results, strict=True):
        alone = train_jeidnn(
            train_x, train_y, val_x, val_y, heads, COSTS, lam, cfg(**settings), enable_progress_bar=False
        )
        for module, expected in ((result.heads, alone.heads), (result.gates, alone.gates)):
            state, expected_state = module.state_dict(), expected.state_dict()
            assert state.keys() == expected_state.keys()
            for key, value in state.items():
                torch.testing.assert_close(
                    value, expected_state[key], rtol=0, atol=1e-5, msg=f"λ={lam} {key}"
                )
        assert result.history.keys() == alone.history.keys()
        for key, values in alone.history.items():  # pos_weight holds lists: compare as tensors
            actual, expected = (torch.tensor(v, dtype=torch.float64) for v in (result.history[key], values))
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=f"λ={lam} history {key}")
    assert not torch.equal(results[0].gates.gates[0].weight, results[1].gates.gates[0].weight)


@pytest.fixture(scope="module")
def results(data):
    return dict(zip((0.0, 0.5, 3.0), sweep(data, warm_heads(), [0.0, 0.5, 3.0]), strict=True))


def test_larger_lambda_exits_earlier(data, results):
    _, (val_x, val_y) = data
    costs = {lam: mean_cost(result, val_x) for lam, result in results.items()}
    assert costs[0.0] > 1.0  # λ = 0: the last (most confident) exit is every sample's best exit
    assert costs[0.0] > costs[0.5] + 0.2
    assert costs[0.5] > costs[3.0] + 0.05  # λ = 3: the hard third no longer pays for the last exit
    # moderate λ: easy, medium, hard exit at 0, 1, 2 (cost 0.7) without losing accuracy
    logits, _, exit_index = predict_exits(results[0.5].heads, results[0.5].gates, val_x)
    accuracy = (logits[torch.arange(len(val_y)), exit_index].argmax(dim=-1) == val_y).float().mean().item()
    full_accuracy = (warm_heads()(val_x)[:, -1].argmax(dim=-1) == val_y).float().mean().item()
    assert costs[0.5] < 0.8 and accuracy >= full_accuracy - 0.03
    assert results[0.5].history["val_cost"][-1] == pytest.approx(costs[0.5], abs=1e-6)
    assert results[0.5].history["val_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)


def test_results_are_plain_modules_with_per_lambda_history(results):
    assert results[0.5].history["initial_pos_weight"] == pytest.approx([2.0, 0.5])
    assert results[0.0].history["initial_pos_weight"] == pytest.approx([5.0, 5.0])
    warm = warm_heads()
    for result in results.values():
        assert isinstance(result.gates, Gates) and type(result.heads) is type(warm)
        assert not result.gates.training and not result.heads.training
        assert all(p.device.type == "cpu" for p in [*result.gates.parameters(), *result.heads.parameters()])
        torch.testing.assert_close(result.heads.heads[-1].weight, warm.heads[-1].weight, rtol=0, atol=0)
        assert not torch.equal(result.heads.heads[0].weight, warm.heads[0].weight)  # the IMs were trained
        for key in ("gate_loss", "im_loss", "val_accuracy", "val_cost", "pos_weight"):
            assert len(result.history[key]) == 8, key


class NormIMHeads(nn.Module):
    """Exit i reads features[:, i], but through a LayerNorm the sweep cannot stack."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, NUM_CLASSES)) for _ in range(NUM_EXITS)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features[:, i]) for i, head in enumerate(self.heads)], dim=1)


class ReversedHeads(nn.Module):
    """Exit i reads the wrong layer: heads(features) is not heads.heads[i](features[:, i])."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = warm_heads().heads

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features[:, -1 - i]) for i, head in enumerate(self.heads)], dim=1)


@pytest.mark.parametrize(
    ("heads", "lambdas", "message"),
    [
        (NormIMHeads, [0.5], "LayerNorm"),
        (ReversedHeads, [0.5], "heads.heads"),
        (warm_heads, [], "at least one"),
    ],
)
def test_unsupported_heads_and_empty_sweep_are_refused(data, heads, lambdas, message):
    with pytest.raises(ValueError, match=message):
        sweep(data, heads(), lambdas, epochs=1)
