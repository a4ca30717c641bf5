"""The layer-skipping forward against the full forward, on every architecture and gate kind; save / load."""

import copy
import functools
import string

import pytest
import torch
from tiny_models import TEXT_ARCHS, TINY_CONFIGS, VISION_ARCHS

from jeidnn.config.gating import GateSettings
from jeidnn.config.schema import ModelConfig
from jeidnn.errors import JeidnnError
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.model.backbone import Backbone
from jeidnn.model.early_exit import PatienceGates, StaticGates, ThresholdGates
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.policies import confidence, patience_exits, score_exits, static_exits

ARCHS = list(TINY_CONFIGS)
NUM_CLASSES = 3
BATCH = 8

GATE_KINDS = {
    "paper": GateSettings(),
    "trajectory_mlp_conditional": GateSettings("trajectory", "mlp", "conditional", standardize=True),
    # Reads nothing but the hidden state (tiny_model zeroes its other inputs' weights), so a dynamic path
    # that passed the gate anything but the exit's pooled hidden state would change its exits.
    "hidden_linear": GateSettings("hidden", "linear", "paper"),
    "hidden_mlp": GateSettings("hidden", "mlp", "paper", standardize=True, width=6, projection=4),
}
MARGIN = 1e-4
"""Every test keeps each exit score at least this far from tau: the batch and layer-by-layer paths may differ
in the last float bit, and a score within that of tau is a tie either way (docs/method.md)."""


@functools.cache
def tiny_backbone(arch: str, pooling: str = "cls") -> Backbone:
    """One backbone per architecture, shared by the tests (none of them changes its weights)."""
    torch.manual_seed(0)
    return Backbone.load(ModelConfig(random_config=TINY_CONFIGS[arch], pooling=pooling)).eval()


def tiny_inputs(arch: str, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Text: random ids with right padding of various lengths; vision: random pixels."""
    cfg = TINY_CONFIGS[arch]
    if arch in VISION_ARCHS:
        return {"pixel_values": torch.randn(batch, cfg["num_channels"], cfg["image_size"], cfg["image_size"])}
    length = 10
    ids = torch.randint(5, cfg["vocab_size"], (batch, length))
    lengths = torch.tensor([length, 4, 7, length, 3, 9, 6, length] * (batch // 8 + 1))[:batch]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, T)
    ids[mask == 0] = cfg.get("pad_token_id", 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch != "distilbert":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def tiny_model(
    arch: str,
    gates: str = "paper",
    layers: list[int] | None = None,
    pooling: str = "cls",
    im_head: str = "mlp",
    **kwargs,
) -> EarlyExitModel:
    """A tiny early-exit model; `gates` is a key of GATE_KINDS, ``threshold`` or ``none``.

    Weights come from fixed seeds, so a test sees the same model whichever tests ran before it.
    """
    backbone = tiny_backbone(arch, pooling)
    layers = layers or list(range(1, backbone.num_layers + 1))
    torch.manual_seed(0)
    heads = ExitHeads(
        layers, backbone.hidden_size, NUM_CLASSES, backbone.family.head_activation, im_head=im_head
    )
    with torch.no_grad():  # larger logits than the default init, so the exits disagree visibly
        for head in heads.heads:
            head.net[-1].weight.mul_(5)
    gate: Gates | ThresholdGates | None = None
    if gates == "threshold":
        gate = ThresholdGates([2.0] * (len(layers) - 1))
    elif gates != "none":
        settings = GATE_KINDS[gates]
        gate = Gates(len(layers), settings, backbone.hidden_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            if gates == "hidden_linear":
                gate.w[..., : gate.num_inputs - settings.projection] = 0
            # Standardisation statistics from other inputs than the tests', as training would set them.
            features = backbone(tiny_inputs(arch, 16), layers)  # (16, L, H)
            gate.set_statistics(heads(features)[:, :-1], features[:, :-1])
    return EarlyExitModel.from_parts(backbone, heads, gate, labels=["neg", "neu", "pos"], **kwargs).eval()


def features_of(model: EarlyExitModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled features of every exit layer, (B, L, H)."""
    with torch.no_grad():
        return model.backbone(dict(inputs), model.heads.layers)


def gate_logits(model: EarlyExitModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The learned gates' logits on `inputs`, (B, L-1)."""
    features = features_of(model, inputs)
    with torch.no_grad():
        return model.gates(model.heads(features), features)


def split_value(values: torch.Tensor, min_side: int = 1) -> tuple[float, float]:
    """Middle of the widest gap between sorted `values` with at least `min_side` values on each side."""
    v = values.sort().values.double()
    gaps = v[1:] - v[:-1]
    gaps[: min_side - 1] = -1
    gaps[len(gaps) - min_side + 1 :] = -1
    i = int(gaps.argmax())
    assert gaps[i] > 1e-5, f"tiny model produced near-identical values {v.tolist()}"
    return float(v[i] + v[i + 1]) / 2, float(gaps[i])


def set_constant(gates: Gates, index: int, logit: float) -> None:
    """Gate `index` outputs `logit` whatever its inputs (±20: everybody or nobody stops there)."""
    with torch.no_grad():
        gates.w[:, index] = 0
        gates.b[:, index] = logit


def split_gate(gates: Gates, index: int, logits: torch.Tensor, min_side: int = 1) -> None:
    """Rescale gate `index`'s output layer so that its logit is beyond ±20 on either side of a split of
    `logits` (its current logits on some rows, (n,)): the gate probability is then ~0 or ~1."""
    split, gap = split_value(logits, min_side)
    scale = 40 / gap
    with torch.no_grad():  # the output layer is linear in both archs: s (z - split) = (s w) x + s (b - split)
        gates.w[:, index] *= scale
        gates.b[:, index] = (gates.b[:, index] - split) * scale


def spread_gates(gates: Gates, logits: torch.Tensor) -> None:
    """Rescale every gate's output layer so that its logits on some rows (`logits`, (n, L-1)) have mean 0 and
    standard deviation 2: exit scores spread over (0, 1), so the exit threshold matters."""
    mean, std = logits.mean(0), logits.std(0)
    with torch.no_grad():
        gates.w.mul_((2 / std)[:, None])
        gates.b.sub_(mean).mul_(2 / std)


def spread_threshold(scores: torch.Tensor) -> float:
    """A threshold away from 0.5 giving other exits than 0.5 and more than one exit, far from any score."""
    values = scores.flatten().double().unique()  # sorted
    native = score_exits(scores, 0.5)
    best, best_key = None, None
    for tau in ((values[1:] + values[:-1]) / 2).tolist():
        if abs(tau - 0.5) < 0.05:
            continue
        exits = score_exits(scores, tau)
        key = (not torch.equal(exits, native), len(set(exits.tolist())), float((scores - tau).abs().min()))
        if best_key is None or key > best_key:
            best, best_key = tau, key
    assert best_key is not None and best_key[0] and best_key[1] > 1 and best_key[2] > MARGIN, best_key
    return best


def assert_same(dynamic, full) -> None:
    assert torch.equal(dynamic.exit_index, full.exit_index)
    assert torch.equal(dynamic.exit_layer, full.exit_layer)
    assert torch.equal(dynamic.cost, full.cost)
    assert torch.equal(dynamic.probs.argmax(1), full.probs.argmax(1))
    torch.testing.assert_close(dynamic.probs, full.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(dynamic.logits, full.logits, atol=1e-5, rtol=1e-5)


def assert_clear_of_threshold(model: EarlyExitModel, full) -> None:
    assert (full.gate_scores - model.exit_threshold).abs().min() > MARGIN


# ---------------------------------------------------------------------- dynamic == full
LEARNED_SCENARIOS = {
    # scenario: (exit threshold, exits expected); the gates are shaped by `shape_gates`
    "nobody": (0.5, {2}),
    "everybody_first": (0.5, {0}),
    "everybody_second": (0.3, {1}),
    "somebody": (0.5, {0, 1, 2}),
    "somebody_other_tau": (None, None),  # tau picked from the random gates' scores
}


def shape_gates(model: EarlyExitModel, inputs: dict[str, torch.Tensor], scenario: str) -> None:
    gates = model.gates
    if scenario == "nobody":
        set_constant(gates, 0, -20.0)
        set_constant(gates, 1, -20.0)
    elif scenario == "everybody_first":
        set_constant(gates, 0, 20.0)
    elif scenario == "everybody_second":
        set_constant(gates, 0, -20.0)
        set_constant(gates, 1, 20.0)
    elif scenario == "somebody":
        split_gate(gates, 0, gate_logits(model, inputs)[:, 0], min_side=3)
        with torch.no_grad():
            running = model.forward_full(inputs).exit_index > 0
        split_gate(gates, 1, gate_logits(model, inputs)[running, 1])
    else:
        spread_gates(gates, gate_logits(model, inputs))
        with torch.no_grad():
            model.exit_threshold = spread_threshold(model.forward_full(inputs).gate_scores)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(GATE_KINDS))
@pytest.mark.parametrize("scenario", list(LEARNED_SCENARIOS))
def test_dynamic_matches_full_learned_gates(arch, kind, scenario):
    model = tiny_model(arch, kind)
    inputs = tiny_inputs(arch)
    tau, expected = LEARNED_SCENARIOS[scenario]
    if tau is not None:
        model.exit_threshold = tau
    shape_gates(model, inputs, scenario)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert full.gate_scores.shape == (BATCH, 2)
    assert_clear_of_threshold(model, full)
    if expected is not None:
        assert set(full.exit_index.tolist()) == expected
    else:
        assert model.exit_threshold != 0.5 and len(set(full.exit_index.tolist())) > 1
    assert_same(model.forward_dynamic(inputs), full)


@pytest.mark.parametrize("kind", list(GATE_KINDS))
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_layer_by_layer_scores_match_the_batch_scores(kind, arch):
    """What forward_dynamic does with the gates: step exit by exit, dropping the rows that stopped."""
    model = tiny_model(arch, kind)
    inputs = tiny_inputs(arch)
    features = features_of(model, inputs)  # (B, L, H)
    with torch.no_grad():
        logits = model.heads(features)  # (B, L, C)
        reference = model.gates.scores(logits, features)  # (B, L-1)
        state = model.gates.init_state(BATCH)
        first, state = model.gates.step(0, logits[:, 0], features[:, 0], state)
        keep = torch.tensor([0, 2, 3, 6])
        second, _ = model.gates.step(1, logits[keep, 1], features[keep, 1], state[keep])
    torch.testing.assert_close(first, reference[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(second, reference[keep, 1], atol=1e-6, rtol=0)


THRESHOLD_CASES = [
    ("nobody", "maxprob"),
    ("everybody", "entropy"),
    ("split", "maxprob"),
    ("split", "entropy"),
    ("split", "margin"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("scenario", "measure"), THRESHOLD_CASES)
def test_dynamic_matches_full_threshold_gates(arch, scenario, measure):
    model = tiny_model(arch, gates="threshold")
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        conf = confidence(model.forward_full(inputs).exit_logits.softmax(-1), measure)  # (B, L)
    if scenario == "nobody":
        thresholds, expected = [2.0, 2.0], {2}
    elif scenario == "everybody":
        thresholds, expected = [-10.0, 2.0], {0}  # every confidence (negative entropy too) is > -10
    else:
        thresholds, expected = [split_value(conf[:, 0])[0], -10.0], {0, 1}
    model.gates = ThresholdGates(thresholds, measure)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert set(full.exit_index.tolist()) == expected
    assert full.gate_scores is None
    assert_same(model.forward_dynamic(inputs), full)


def test_patience_and_static_gates_follow_the_baselines_on_random_logits():
    """The gates' exits are the evaluation's (model/policies.py) on logits with many argmax agreements."""
    generator = torch.Generator().manual_seed(3)
    exit_logits = torch.randn(200, 5, 2, generator=generator) * 3  # 2 classes: long agreeing runs are common
    preds = exit_logits.softmax(-1).argmax(-1)  # (N, L)
    for patience in range(6):
        exits = PatienceGates(patience).exits(exit_logits)
        assert torch.equal(exits, patience_exits(preds, patience))
        # The layer-by-layer rule on all rows gives the same first stop.
        gates = PatienceGates(patience)
        state, stops = gates.init_state(200), []
        for k in range(4):
            stop, state = gates.step(k, exit_logits[:, k], state)
            stops.append(stop)
        stops.append(torch.ones(200, dtype=torch.bool))
        stepped = torch.stack(stops, 1).int().argmax(1)
        assert torch.equal(stepped, exits)
    assert set(PatienceGates(1).exits(exit_logits).tolist()) == {1, 2, 3, 4}
    assert PatienceGates(0).exits(exit_logits).tolist() == [0] * 200
    for index in range(5):
        assert torch.equal(StaticGates(index).exits(exit_logits), static_exits(200, index))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("patience", [0, 1, 2])
def test_dynamic_matches_full_patience_gates(arch, patience):
    """Patience 2 with three exits only stops at the last, where everybody stops anyway."""
    model = tiny_model(arch, gates="none")
    model.gates = PatienceGates(patience)
    inputs = tiny_inputs(arch, 16)
    with torch.no_grad():
        full = model.forward_full(inputs)
    preds = full.exit_logits.softmax(-1).argmax(-1)
    assert torch.equal(full.exit_index, patience_exits(preds, patience))
    if patience == 1 and arch in ("bert", "electra", "deit"):  # rows leave at both exits: rows are dropped
        assert set(full.exit_index.tolist()) == {1, 2}
    assert_same(model.forward_dynamic(inputs), full)


class LayerCounter:
    """Counts the rows each backbone layer runs on (forward hooks)."""

    def __init__(self, model: EarlyExitModel) -> None:
        self.rows = [0] * model.backbone.num_layers
        for i, layer in enumerate(model.backbone.layers):
            layer.register_forward_hook(functools.partial(self._hook, i))

    def _hook(self, index, module, args, output):
        self.rows[index] += args[0].shape[0]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit"])
@pytest.mark.parametrize("exit_index", [0, 1, 2])
def test_dynamic_matches_full_static_gates_and_skips_later_layers(arch, exit_index):
    model = tiny_model(arch, gates="none")
    model.backbone = Backbone(copy.deepcopy(model.backbone.model), pooling=model.backbone.pooling).eval()
    model.gates = StaticGates(exit_index)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert full.exit_index.tolist() == [exit_index] * BATCH
    counter = LayerCounter(model)
    assert_same(model.forward_dynamic(inputs), full)
    assert counter.rows == [BATCH] * (exit_index + 1) + [0] * (2 - exit_index)


def test_static_exit_beyond_the_last_is_refused():
    model = tiny_model("bert", gates="none")
    with pytest.raises(JeidnnError, match="static exit index 3 is out of range"):
        EarlyExitModel.from_parts(model.backbone, model.heads, StaticGates(3))
    with pytest.raises(JeidnnError, match="patience must be a non-negative integer, got -1"):
        PatienceGates(-1)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit"])
@pytest.mark.parametrize("kind", ["paper", "hidden_mlp"])
def test_exits_on_a_subset_of_layers(arch, kind):
    model = tiny_model(arch, kind, layers=[1, 3], costs=[0.4, 1.02])
    inputs = tiny_inputs(arch)
    split_gate(model.gates, 0, gate_logits(model, inputs)[:, 0])
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert full.exit_logits.shape == (BATCH, 2, NUM_CLASSES)
    assert set(full.exit_layer.tolist()) == {1, 3}
    assert sorted(set(full.cost.tolist())) == pytest.approx([0.4, 1.02])
    assert_same(model.forward_dynamic(inputs), full)


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_without_gates_everyone_takes_the_last_exit(arch):
    model = tiny_model(arch, gates="none")
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert full.exit_index.tolist() == [2] * BATCH
    assert_same(model.forward_dynamic(inputs), full)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_path_matches_heads_on_hf_hidden_states(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    backbone = model.backbone
    own = {k: v for k, v in inputs.items() if k in backbone.input_names}  # GPT-2 would add token types
    last: list[torch.Tensor] = []
    hook = backbone.layers[-1].register_forward_hook(
        lambda m, i, o: last.append(o[0] if type(o) is tuple else o)
    )
    with torch.no_grad():
        hidden_states = list(backbone.model(**own, output_hidden_states=True).hidden_states)
        hook.remove()
        hidden_states[-1] = last[0]  # the last layer's own output: decoders' HF entry carries the final norm
        by_hand = torch.stack(
            [
                head(model.backbone.pool(hidden_states[layer]))
                for head, layer in zip(model.heads.heads, [1, 2, 3])
            ],
            dim=1,
        )  # (B, L, C)
        full = model.forward_full(inputs)
    torch.testing.assert_close(full.exit_logits, by_hand, atol=1e-5, rtol=1e-5)
    rows = torch.arange(BATCH)
    torch.testing.assert_close(full.logits, by_hand[rows, full.exit_index])


@pytest.mark.parametrize("arch", TEXT_ARCHS)
@pytest.mark.parametrize("kind", ["paper", "hidden_linear"])
def test_single_row_batches(arch, kind):
    """Batch 1 takes the fast paths (nobody / everybody exits) of the dynamic loop."""
    model = tiny_model(arch, kind)
    inputs = tiny_inputs(arch)
    split_gate(model.gates, 0, gate_logits(model, inputs)[:, 0])
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert len(set(full.exit_index.tolist())) > 1
    for i in range(BATCH):
        row = {k: v[i : i + 1, : int(inputs["attention_mask"][i].sum())] for k, v in inputs.items()}
        one = model.forward_dynamic(row)
        assert one.exit_index.item() == full.exit_index[i].item()
        torch.testing.assert_close(one.probs[0], full.probs[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
@pytest.mark.parametrize("kind", ["paper", "hidden_mlp"])
def test_mean_pooling_and_linear_ims_dynamic_matches_full(arch, kind, tmp_path):
    # Mean pooling reads the padding mask, which must shrink with the rows that keep running; hidden gates
    # read the mean-pooled state.
    model = tiny_model(arch, kind, pooling="mean", im_head="linear")
    inputs = tiny_inputs(arch)
    split_gate(model.gates, 0, gate_logits(model, inputs)[:, 0], min_side=2)
    set_constant(model.gates, 1, -20.0)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert set(full.exit_index.tolist()) == {0, 2}
    assert_same(model.forward_dynamic(inputs), full)
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.backbone.pooling == "mean" and loaded.heads.im_head == "linear"
    with torch.no_grad():
        assert torch.equal(loaded.forward_dynamic(inputs).logits, model.forward_dynamic(inputs).logits)


# ---------------------------------------------------------------------- save / load
def tiny_tokenizer(folder):
    from transformers import BertTokenizer

    letters = list(string.ascii_lowercase)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), *".,!?'"]
    vocab += [f"word{i}" for i in range(TINY_CONFIGS["bert"]["vocab_size"] - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


TEXTS = ["good morning!", "what a terrible, awful day", "ok", "fine. fine? fine!", "meh", "so so"]


def split_on_texts(model: EarlyExitModel, texts: list[str]) -> None:
    """Make gate 1 send some of `texts` to exit 1 and the rest to the last exit."""
    encoded = dict(model.preprocessor(texts, padding=True, return_tensors="pt"))
    split_gate(model.gates, 0, gate_logits(model, encoded)[:, 0])
    set_constant(model.gates, 1, -20.0)
    with torch.no_grad():
        exits = model.forward_full(encoded).exit_index
    assert set(exits.tolist()) == {0, 2}


def text_model(tmp_path, gates: str = "paper", exit_threshold: float = 0.5) -> EarlyExitModel:
    model = tiny_model("bert", gates, costs=[0.4, 0.7, 1.01], exit_threshold=exit_threshold)
    model.preprocessor = tiny_tokenizer(tmp_path)
    model.conformal_quantiles = {"0.05": [0.9, 0.8, 0.95], "0.1": [0.5, 0.6, 0.7]}
    model.metadata = {"lambda": 0.5, "gflops_full": 0.001}
    if gates in GATE_KINDS:
        split_on_texts(model, TEXTS)
    return model


def no_pickles(folder) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle / torch.save file"


@pytest.mark.parametrize(
    ("gates", "tau"),
    [("paper", 0.5), ("trajectory_mlp_conditional", 0.35), ("hidden_mlp", 0.7), ("threshold", 0.5)],
)
def test_text_model_round_trip(tmp_path, gates, tau):
    model = text_model(tmp_path, gates, exit_threshold=tau)
    if gates == "threshold":
        model.gates = ThresholdGates([0.7, 0.6], "margin")
    model.save_pretrained(tmp_path / "model")
    no_pickles(tmp_path / "model")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "model")
    assert not loaded.training
    assert (loaded.labels, loaded.costs, loaded.conformal_quantiles, loaded.metadata) == (
        model.labels,
        model.costs,
        model.conformal_quantiles,
        model.metadata,
    )
    assert type(loaded.gates) is type(model.gates)
    if gates == "threshold":
        assert loaded.gates.measure == "margin"
        assert loaded.gates.thresholds.tolist() == pytest.approx([0.7, 0.6])
    else:
        assert loaded.gates.settings == GATE_KINDS[gates] and loaded.exit_threshold == tau
        before, after = model.gates.state_dict(), loaded.gates.state_dict()
        assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    inputs = tiny_inputs("bert")
    for forward in ("forward_full", "forward_dynamic"):
        with torch.no_grad():
            before, after = getattr(model, forward)(inputs), getattr(loaded, forward)(inputs)
        assert torch.equal(before.logits, after.logits) and torch.equal(before.exit_index, after.exit_index)
        if forward == "forward_full" and gates != "threshold":
            assert torch.equal(before.gate_scores, after.gate_scores)
    assert model.predict(TEXTS) == loaded.predict(TEXTS)


def test_vision_model_round_trip(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    model = tiny_model("vit", "hidden_linear", costs=[0.4, 0.7, 1.01])
    model.preprocessor = ViTImageProcessor(size={"height": 16, "width": 16})
    model.save_pretrained(tmp_path / "model")
    no_pickles(tmp_path / "model")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(5)]
    before = model.predict(images, sets=False, batch_size=2)
    assert before == loaded.predict(images, sets=False, batch_size=2)
    assert len(before) == 5 and all(p.prediction_set is None for p in before)


# ---------------------------------------------------------------------- predict
def test_predict_outputs(tmp_path):
    model = text_model(tmp_path)
    texts = TEXTS
    predictions = model.predict(texts, alpha=0.1, batch_size=4)
    assert len({p.exit_layer for p in predictions}) == 2
    with torch.no_grad():
        encoded = model.preprocessor(texts, padding=True, return_tensors="pt")
        full = model.forward_full(dict(encoded))
    assert [p.label for p in predictions] == [model.labels[i] for i in full.probs.argmax(1)]
    assert [p.exit_layer for p in predictions] == full.exit_layer.tolist()
    for p, probs, exit_ in zip(predictions, full.probs, full.exit_index):
        assert p.probability == pytest.approx(float(probs.max()), abs=1e-5)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        q = model.conformal_quantiles["0.1"][exit_]
        assert p.prediction_set == [y for y, py in zip(model.labels, probs.tolist()) if py >= 1 - q]
        assert p.label in p.prediction_set or p.probability < 1 - q
    from_tensors = model.predict(dict(encoded), alpha=0.1, batch_size=4)
    assert [(p.label, p.exit_layer) for p in from_tensors] == [(p.label, p.exit_layer) for p in predictions]


def test_predict_refuses_bad_inputs(tmp_path):
    model = text_model(tmp_path)
    with pytest.raises(JeidnnError, match=r"0\.05, 0\.1"):
        model.predict(["hello"], alpha=0.2)
    with pytest.raises(JeidnnError, match="input 2 is an empty text"):
        model.predict(["hello", "  "])
    with pytest.raises(JeidnnError, match="single string"):
        model.predict("hello")
    assert model.predict([]) == []


def test_inconsistent_parts_are_refused():
    backbone = tiny_backbone("bert")
    heads = ExitHeads([1, 2, 3], backbone.hidden_size, NUM_CLASSES, "tanh")
    with pytest.raises(JeidnnError, match="exits"):
        EarlyExitModel.from_parts(backbone, heads, Gates(2))
    with pytest.raises(JeidnnError, match="labels"):
        EarlyExitModel.from_parts(backbone, heads, Gates(3), labels=["a", "b"])
    with pytest.raises(JeidnnError, match="last layer"):
        EarlyExitModel.from_parts(
            backbone, ExitHeads([1, 2], backbone.hidden_size, NUM_CLASSES, "tanh"), Gates(2)
        )
