"""Stage 2 (every variant and λ side by side) on synthetic cached features, against a slow reference."""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib

import pytest
import torch
from torch import nn

from jeidnn.config.gating import GateVariant, JeidnnConfig
from jeidnn.model.exit_rules import paper_distribution
from jeidnn.model.gates import Gates, StackedGates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.policies import score_exits
from jeidnn.train.lambda_search import fit_stage2, next_lambdas
from jeidnn.train.losses import gate_loss, gate_targets, im_loss, per_exit_ce, positive_weights
from jeidnn.train.stage2 import TrainedModel
from jeidnn.train.stage2_fit import _batches, _CachedRows, train_models
from jeidnn.train.stage2_store import load_models, save_models

NUM_EXITS, HIDDEN, NUM_CLASSES = 4, 8, 3
COSTS = torch.tensor([0.25, 0.5, 0.75, 1.0])
PAPER = GateVariant()
TRAJECTORY = GateVariant(
    name="traj", inputs="trajectory", arch="mlp", standardize=True, objective="expected",
    exit_rule="conditional", operating_point="calib_threshold", extension=True,
)  # fmt: skip
HIDDEN_GATE = dataclasses.replace(TRAJECTORY, name="hid", inputs="hidden", arch="linear", exit_loss="ce")


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, L, H)`` whose class signal grows with depth, and labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    signal = torch.zeros(n, HIDDEN)
    signal[torch.arange(n), labels] = 1.0
    depth = torch.linspace(0.3, 1.5, NUM_EXITS)[None, :, None]
    return depth * signal[:, None] + torch.randn(n, NUM_EXITS, HIDDEN, generator=gen), labels


@pytest.fixture(scope="module")
def data():
    return synthetic(400, 0), synthetic(200, 1)


def warm_heads(dropout: float = 0.0) -> ExitHeads:
    torch.manual_seed(3)
    heads = ExitHeads([1, 2, 3, 4], HIDDEN, NUM_CLASSES, "tanh", dropout=dropout, im_head="linear")
    heads.final.requires_grad_(False)
    return heads.eval()


def config(**overrides) -> JeidnnConfig:
    return JeidnnConfig(**{"epochs": 2, "batch_size": 32, "alternate_steps": 5, **overrides})


def reference_paper(
    data, heads: nn.Module, lambdas: list[float], index: int, cfg: JeidnnConfig, seed: int
) -> tuple[nn.Module, Gates]:
    """The paper's method for ``lambdas[index]``, as a plain loop over the same batches (no stacking)."""
    (x, y), (vx, vy) = data
    lam = lambdas[index]
    heads = copy.deepcopy(heads)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(PAPER.name.encode()))
    # The initial gates train_models draws for this model: model 0's for every λ (`lambda_init: shared`),
    # or its own.
    shared = cfg.lambda_init == "shared"
    gates = StackedGates(PAPER, NUM_EXITS, HIDDEN, 1 if shared else len(lambdas), gen).select(
        0 if shared else index
    )
    with torch.no_grad():
        final = heads.final(x[:, -1]), heads.final(vx[:, -1])
    ims = [p for h in heads.heads[:-1] for p in h.parameters()]
    optimizer = torch.optim.SGD(
        [*gates.parameters(), *ims], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    loader = _batches(_CachedRows(x, y, final[0]), cfg.batch_size, torch.Generator().manual_seed(seed))
    total = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.min_lr)

    def logits_of(features: torch.Tensor, final_logits: torch.Tensor) -> torch.Tensor:
        ims = [head(features[:, i]) for i, head in enumerate(heads.heads[:-1])]
        return torch.stack([*ims, final_logits], dim=1)  # (B, L, C)

    with torch.no_grad():
        weight = positive_weights(per_exit_ce(heads(vx), vy), COSTS, lam, "exact")
    step = 0
    for _ in range(cfg.epochs):
        for features, labels, final_logits in loader:
            if (step // cfg.alternate_steps) % 2 == 0:
                with torch.no_grad():
                    logits = logits_of(features, final_logits)
                    targets = gate_targets(per_exit_ce(logits, labels), COSTS, lam)
                loss = gate_loss(gates(logits, features), targets, weight)
            else:
                logits = logits_of(features, final_logits)
                with torch.no_grad():
                    pi = paper_distribution(torch.sigmoid(gates(logits, features)))
                loss = im_loss(logits, labels, pi, "weighted")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        with torch.no_grad():  # the weights are recounted on val after every epoch
            weight = positive_weights(per_exit_ce(heads(vx), vy), COSTS, lam, "exact")
    return heads, gates


@pytest.mark.parametrize("init", ["shared", "independent"])
def test_paper_preset_matches_the_slow_reference(data, init):
    cfg = config(lambda_init=init)
    heads = warm_heads()
    (x, y), (vx, vy) = data
    lambdas = [0.05, 0.4]
    [models] = train_models(x, y, vx, vy, heads, [(PAPER, COSTS, lambdas)], cfg, seed=7)
    for index, model in enumerate(models):
        ref_heads, ref_gates = reference_paper(data, heads, lambdas, index, cfg, seed=7)
        for a, b in zip(model.heads.parameters(), ref_heads.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for name, param in ref_gates.named_parameters():
            torch.testing.assert_close(getattr(model.gates, name), param, rtol=1e-4, atol=1e-5)


def test_every_variant_trains_side_by_side_deterministically(data):
    (x, y), (vx, vy) = data
    heads = warm_heads(dropout=0.1)
    plan = [(v, COSTS, [0.01, 0.3]) for v in (PAPER, TRAJECTORY, HIDDEN_GATE)]
    first = train_models(x, y, vx, vy, heads, plan, config(), seed=0)
    again = train_models(x, y, vx, vy, heads, plan, config(), seed=0)
    for block, block_again in zip(first, again):
        assert [m.lam for m in block] == [0.01, 0.3]
        for m, m2 in zip(block, block_again):
            assert isinstance(m, TrainedModel) and len(m.history["val_cost"]) == 2
            for a, b in zip(m.gates.parameters(), m2.gates.parameters()):
                assert torch.equal(a, b)
            # final head frozen, IMs trained
            assert torch.equal(m.heads.final.net[-1].weight, heads.final.net[-1].weight)
            assert not torch.equal(m.heads.heads[0].net[-1].weight, heads.heads[0].net[-1].weight)
            scores = m.gates.scores(m.heads(vx), vx[:, :-1])
            assert scores.shape == (200, NUM_EXITS - 1) and 0 <= scores.min() and scores.max() <= 1
            acc, cost = m.val_accuracy, m.val_cost
            exits = score_exits(scores)
            assert cost == pytest.approx(COSTS.double()[exits].mean().item())
            assert 0 <= acc <= 1


def test_a_variant_trains_alike_whichever_variants_train_beside_it(data):
    """Each step draws one set of IM dropout masks for every variant, and each variant's gates start from its
    own random stream: the trajectory gates come out the same alone, after the paper's, or before it."""
    (x, y), (vx, vy) = data
    heads = warm_heads(dropout=0.3)
    frozen = dataclasses.replace(PAPER, name="frozen", im_loss="frozen")
    runs = [
        train_models(x, y, vx, vy, heads, [(v, COSTS, [0.01, 0.3]) for v in variants], config(), seed=4)
        for variants in ([TRAJECTORY], [PAPER, TRAJECTORY], [TRAJECTORY, frozen, PAPER])
    ]
    alone, after, before = runs[0][0], runs[1][1], runs[2][0]
    for m, m_after, m_before in zip(alone, after, before):
        for other in (m_after, m_before):
            for a, b in zip(
                [*m.gates.parameters(), *m.heads.parameters()],
                [*other.gates.parameters(), *other.heads.parameters()],
            ):
                assert torch.equal(a, b)
            assert m.history == other.history
    # the paper's models differ from the trajectory gates' (dropout did act on the IMs they share)
    assert not torch.equal(
        runs[1][0][0].heads.heads[0].net[-1].weight, alone[0].heads.heads[0].net[-1].weight
    )


def test_expected_objective_trades_accuracy_for_cost(data):
    """A large λ must make the expected-loss gates exit earlier than a small λ."""
    (x, y), (vx, vy) = data
    [models] = train_models(
        x, y, vx, vy, warm_heads(), [(TRAJECTORY, COSTS, [0.0, 2.0])], config(epochs=4), seed=0
    )
    assert models[1].val_cost < models[0].val_cost


def _model(lam: float, cost: float) -> TrainedModel:
    return TrainedModel(PAPER, lam, nn.Identity(), None, {"val_cost": [cost], "val_accuracy": [0.5]})


def test_next_lambdas_extends_and_bisects():
    cfg = JeidnnConfig()
    # costs fall with λ; too cheap everywhere -> smaller λ; gap 0.9 -> 0.4 between 0.01 and 0.1 -> bisect
    models = [_model(0.01, 0.85), _model(0.1, 0.4), _model(1.0, 0.3)]
    assert next_lambdas(models, 0.25, cfg) == pytest.approx(sorted([0.001, 10.0, math.sqrt(0.01 * 0.1)]))
    covered = [_model(0.01, 0.95), _model(0.1, 0.85), _model(0.3, 0.72), _model(1.0, 0.6), _model(2, 0.5)]
    covered += [_model(4, 0.4), _model(8, 0.26)]
    assert next_lambdas(covered, 0.25, cfg) == []


def test_automatic_lambdas_add_rounds(data):
    (x, y), (vx, vy) = data
    cfg = config(variants=[PAPER], lambdas=None, lambda_grid=[0.3], lambda_rounds=1, epochs=1)
    lines = []
    trained = fit_stage2(x, y, vx, vy, warm_heads(), {"jeidnn_paper": COSTS}, cfg, log=lines.append)
    lams = [m.lam for m in trained["jeidnn_paper"]]
    assert 0.3 in lams and len(lams) > 1 and lams == sorted(lams)
    assert len(lines) == 2 and "round 2" in lines[1]


@pytest.mark.parametrize("variant", [PAPER, TRAJECTORY])
def test_a_later_rounds_model_is_the_one_the_first_round_would_have_trained(data, variant):
    """`lambda_init: shared`: every fit starts each λ from one model's draw and the same seed, so a model
    added in round 2 equals that λ trained on its own (or in the first round)."""
    (x, y), (vx, vy) = data
    heads = warm_heads(dropout=0.2)
    cfg = config(variants=[variant], lambdas=None, lambda_grid=[0.3], lambda_rounds=1, epochs=1)
    trained = fit_stage2(x, y, vx, vy, heads, {variant.name: COSTS}, cfg, seed=2)[variant.name]
    later = [m for m in trained if m.lam != 0.3]
    assert later  # round 2 added λ values
    for model in later:
        [[alone]] = train_models(x, y, vx, vy, heads, [(variant, COSTS, [model.lam])], cfg, seed=2)
        for a, b in zip(
            [*model.gates.parameters(), *model.heads.parameters()],
            [*alone.gates.parameters(), *alone.heads.parameters()],
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_frozen_ims_keep_the_warm_up_weights_and_the_phases_still_alternate(data):
    (x, y), (vx, vy) = data
    heads = warm_heads()
    frozen = dataclasses.replace(TRAJECTORY, name="frozen", im_loss="frozen")
    [models] = train_models(x, y, vx, vy, heads, [(frozen, COSTS, [0.01, 0.3])], config(), seed=0)
    for model in models:
        for a, b in zip(model.heads.parameters(), heads.parameters()):
            assert torch.equal(a, b)
        # gate phases ran in both epochs (steps 0-4, 10-14 of 13 per epoch), IM phases trained nothing
        assert all(math.isfinite(v) for v in model.history["gate_loss"])
        assert all(math.isnan(v) for v in model.history["im_loss"])
    # same start, other λ: the gates learned something different
    assert not torch.equal(models[0].gates.w, models[1].gates.w)


def test_gates_can_learn_on_val_with_frozen_ims(data):
    (x, y), (vx, vy) = data
    on_val = dataclasses.replace(TRAJECTORY, name="on_val", im_loss="frozen", gate_data="val")
    cfg = config(variants=[PAPER, on_val], lambdas=[0.05])
    trained = fit_stage2(x, y, vx, vy, warm_heads(), {"jeidnn_paper": COSTS, "on_val": COSTS}, cfg)
    [model] = trained["on_val"]
    for a, b in zip(model.heads.parameters(), warm_heads().parameters()):
        assert torch.equal(a, b)
    assert all(math.isfinite(v) for v in model.history["gate_loss"])  # its gates trained, in their own fit
    assert len(trained["jeidnn_paper"]) == 1
    with pytest.raises(Exception, match="gate_data val needs im_loss frozen"):
        from jeidnn.config.parser import config_from_dict

        config_from_dict({"jeidnn": {"variants": [{"name": "v", "gate_data": "val"}]}})


def test_a_stored_fit_is_loaded_instead_of_trained_again(data, tmp_path):
    """fit_stage2(store=...) keeps each round's models; a second call (a resumed run) loads them, and its
    models predict exactly what the trained ones did: the same λ rounds follow from the same val costs."""
    (x, y), (vx, vy) = data
    cfg = config(variants=[PAPER, TRAJECTORY], lambdas=None, lambda_grid=[0.3], lambda_rounds=1, epochs=1)
    costs = {"jeidnn_paper": COSTS, "traj": COSTS}
    stored: list[str] = []
    first = fit_stage2(x, y, vx, vy, warm_heads(), costs, cfg, store=tmp_path, after_fit=stored.append)
    assert stored == ["round1-train", "round2-train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round1-train.safetensors",
        "round2-train.safetensors",
    ]
    lines: list[str] = []
    again = fit_stage2(x, y, vx, vy, warm_heads(), costs, cfg, store=tmp_path, log=lines.append)
    assert sum("loaded from" in line for line in lines) == 2
    for name in first:
        assert [m.lam for m in again[name]] == [m.lam for m in first[name]]
        for a, b in zip(first[name], again[name]):
            assert a.history == b.history and a.variant == b.variant
            with torch.no_grad():
                logits_a, logits_b = a.heads(vx), b.heads(vx)
                torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
                torch.testing.assert_close(
                    a.gates.scores(logits_a, vx[:, :-1]), b.gates.scores(logits_b, vx[:, :-1]), rtol=0, atol=0
                )


def test_a_stored_model_keeps_its_own_backbone(data, tmp_path):
    """A model trained end to end (jeidnn.train_backbone) is stored with its backbone's weights and loads back
    with them; a model without one loads with none."""
    (x, y), (vx, vy) = data
    [models] = train_models(x, y, vx, vy, warm_heads(), [(PAPER, COSTS, [0.01, 0.3])], config(epochs=1))
    own = {"encoder.weight": torch.randn(4, 3), "encoder.bias": torch.randn(4)}
    models[0].backbone = own
    save_models(tmp_path / "fit.safetensors", models)
    first, second = load_models(tmp_path / "fit.safetensors", [PAPER], warm_heads(), x.shape[-1])
    assert set(first.backbone) == set(own) and all(torch.equal(first.backbone[k], own[k]) for k in own)
    assert second.backbone is None


def test_learned_costs_stay_float64_from_counting_to_val_cost():
    """A cost like 1/3 rounded to float32 is off by ~1e-8, beyond the 1e-9 budget checks downstream."""
    from jeidnn.train.learned import cost_tensors
    from jeidnn.train.stage2 import VariantBlock
    from jeidnn.train.stage2_fit import native_point

    costs = [1 / 3, 2 / 3, 0.7, 1.0]
    (tensor,) = cost_tensors({"v": costs}).values()
    assert tensor.dtype == torch.float64 and tensor.tolist() == costs
    block = VariantBlock(PAPER, warm_heads(), HIDDEN, tensor, [0.1], torch.Generator().manual_seed(0))
    assert block.costs.dtype == torch.float64 and block.costs.tolist() == costs
    # Every sample leaves at exit 0 (scores far above the native threshold): val cost is exactly 1/3.
    logits, scores = torch.zeros(5, NUM_EXITS, NUM_CLASSES), torch.full((5, NUM_EXITS - 1), 10.0)
    assert native_point(logits, scores, torch.zeros(5, dtype=torch.long), block.costs)[1] == 1 / 3


def test_gate_statistics_read_the_train_split_in_chunks_with_the_unchunked_result():
    """`im_head: mlp` over a whole train split at once held (K, N, L-1, hidden) activations; chunked, the
    IM logits that set the gate statistics are the same bit for bit."""
    from jeidnn.train.stage2 import StackedIMs
    from jeidnn.train.stage2_fit import first_model_logits

    torch.manual_seed(0)
    heads = ExitHeads([1, 2, 3, 4], HIDDEN, NUM_CLASSES, "tanh", dropout=0.1, im_head="mlp")
    ims = StackedIMs(heads.heads[:-1], 3)
    features = torch.randn(1000, NUM_EXITS - 1, HIDDEN)
    with torch.no_grad():
        whole = ims.eval()(features)[0]  # (N, L-1, C)
    ims.train()
    chunked = first_model_logits(ims, features, rows=64)
    assert chunked.shape == (1000, NUM_EXITS - 1, NUM_CLASSES) and torch.equal(chunked, whole)
    assert ims.training
