"""The layer-skipping forward against the full forward, on every architecture; save / load."""

import functools
import json
import string

import pytest
import torch
from tiny_models import TEXT_ARCHS, TINY_CONFIGS, VISION_ARCHS

from jeidnn.backbone import Backbone
from jeidnn.baselines import confidence
from jeidnn.config import ModelConfig
from jeidnn.early_exit import EarlyExitModel, ThresholdGates
from jeidnn.errors import JeidnnError
from jeidnn.gates import Gates
from jeidnn.heads import ExitHeads

ARCHS = list(TINY_CONFIGS)
NUM_CLASSES = 3
BATCH = 8


@functools.cache
def tiny_backbone(arch: str) -> Backbone:
    """One backbone per architecture, shared by the tests (none of them changes its weights)."""
    torch.manual_seed(0)
    return Backbone.load(ModelConfig(random_config=TINY_CONFIGS[arch])).eval()


def tiny_model(arch: str, gates: str = "jeidnn", layers: list[int] | None = None, **kwargs) -> EarlyExitModel:
    backbone = tiny_backbone(arch)
    layers = layers or list(range(1, backbone.num_layers + 1))
    heads = ExitHeads(layers, backbone.hidden_size, NUM_CLASSES, backbone.spec.head_activation)
    with torch.no_grad():  # larger logits than the default init, so the exits disagree visibly
        for head in heads.heads:
            head.net[-1].weight.mul_(5)
    gate = Gates(len(layers)) if gates == "jeidnn" else ThresholdGates([2.0] * (len(layers) - 1))
    return EarlyExitModel(backbone, heads, gate, labels=["neg", "neu", "pos"], **kwargs).eval()


def tiny_inputs(arch: str, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Text: random ids with right padding of various lengths; vision: random pixels."""
    cfg = TINY_CONFIGS[arch]
    if arch in VISION_ARCHS:
        return {"pixel_values": torch.randn(batch, cfg["num_channels"], cfg["image_size"], cfg["image_size"])}
    length = 10
    ids = torch.randint(5, cfg["vocab_size"], (batch, length))
    lengths = torch.tensor([length, 4, 7, length, 3, 9, 6, length][:batch])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, T)
    ids[mask == 0] = cfg.get("pad_token_id", 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch != "distilbert":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def set_gate(gate: torch.nn.Linear, bias: float, pmax_weight: float = 0.0) -> None:
    """g = sigmoid(pmax_weight * p_max + bias): a constant (±20) or a split on p_max."""
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0, 0] = pmax_weight  # feature 0 is p_max
        gate.bias.fill_(bias)


def split_value(values: torch.Tensor) -> tuple[float, float]:
    """Middle of the widest gap between sorted `values` (some lie on each side), and that gap."""
    v = values.sort().values.double()
    gaps = v[1:] - v[:-1]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-5, f"tiny model produced near-identical confidences {v.tolist()}"
    return float(v[i] + v[i + 1]) / 2, float(gaps[i])


def split_gate(gate: torch.nn.Linear, pmax: torch.Tensor) -> None:
    """Gate that is ~1 above and ~0 below a split of `pmax` (B,): g = sigmoid(w (p_max - split))."""
    split, gap = split_value(pmax)
    weight = 40 / gap  # ±20 in logit at the nearest samples
    set_gate(gate, bias=-weight * split, pmax_weight=weight)


def assert_same(dynamic, full) -> None:
    assert torch.equal(dynamic.exit_index, full.exit_index)
    assert torch.equal(dynamic.exit_layer, full.exit_layer)
    assert torch.equal(dynamic.cost, full.cost)
    assert torch.equal(dynamic.probs.argmax(1), full.probs.argmax(1))
    torch.testing.assert_close(dynamic.probs, full.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(dynamic.logits, full.logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- dynamic == full
JEI_PATTERNS = {
    # scenario: (bias of gate 0 or "split", bias of gate 1 or "split", exits expected)
    "nobody": (-20.0, -20.0, {2}),
    "everybody_first": (20.0, -20.0, {0}),
    "everybody_second": (-20.0, 20.0, {1}),
    "split_first": ("split", -20.0, {0, 2}),
    "split_second": (-20.0, "split", {1, 2}),
    "split_first_then_all": ("split", 20.0, {0, 1}),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scenario", list(JEI_PATTERNS))
def test_dynamic_matches_full_jeidnn_gates(arch, scenario):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        reference = model.forward_full(inputs)
    pmax = reference.exit_logits.softmax(-1).amax(-1)  # (B, L)
    for k, bias in enumerate(JEI_PATTERNS[scenario][:2]):
        if bias == "split":
            split_gate(model.gates.gates[k], pmax[:, k])
        else:
            set_gate(model.gates.gates[k], bias=bias)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert set(full.exit_index.tolist()) == JEI_PATTERNS[scenario][2]
    assert full.gate_probs.shape == (BATCH, 2)
    assert_same(model.forward_dynamic(inputs), full)


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
    assert full.gate_probs is None
    assert_same(model.forward_dynamic(inputs), full)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit"])
def test_exits_on_a_subset_of_layers(arch):
    model = tiny_model(arch, layers=[1, 3], costs=[0.4, 1.02])
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        pmax = model.forward_full(inputs).exit_logits.softmax(-1).amax(-1)  # (B, 2)
        split_gate(model.gates.gates[0], pmax[:, 0])
        full = model.forward_full(inputs)
    assert full.exit_logits.shape == (BATCH, 2, NUM_CLASSES)
    assert set(full.exit_layer.tolist()) == {1, 3}
    assert sorted(set(full.cost.tolist())) == pytest.approx([0.4, 1.02])
    assert_same(model.forward_dynamic(inputs), full)


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_without_gates_everyone_takes_the_last_exit(arch):
    model = tiny_model(arch)
    model.gates = None
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert full.exit_index.tolist() == [2] * BATCH
    assert_same(model.forward_dynamic(inputs), full)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_path_matches_heads_on_hf_hidden_states(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        hidden_states = model.backbone.model(**inputs, output_hidden_states=True).hidden_states
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
    with torch.no_grad():
        encoded = dict(model.preprocessor(texts, padding=True, return_tensors="pt"))
        split_gate(model.gates.gates[0], model.forward_full(encoded).exit_logits[:, 0].softmax(-1).amax(-1))
        set_gate(model.gates.gates[1], bias=-20.0)
        exits = model.forward_full(encoded).exit_index
    assert set(exits.tolist()) == {0, 2}


def text_model(tmp_path, gates: str = "jeidnn") -> EarlyExitModel:
    model = tiny_model("bert", gates=gates, costs=[0.4, 0.7, 1.01])
    model.preprocessor = tiny_tokenizer(tmp_path)
    model.conformal_quantiles = {"0.05": [0.9, 0.8, 0.95], "0.1": [0.5, 0.6, 0.7]}
    model.metadata = {"lambda": 0.5, "gflops_full": 0.001}
    if gates == "jeidnn":
        split_on_texts(model, TEXTS)
    return model


def no_pickles(folder) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle / torch.save file"


@pytest.mark.parametrize("gates", ["jeidnn", "threshold"])
def test_text_model_round_trip(tmp_path, gates):
    model = text_model(tmp_path, gates)
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
    inputs = tiny_inputs("bert")
    for forward in ("forward_full", "forward_dynamic"):
        with torch.no_grad():
            before, after = getattr(model, forward)(inputs), getattr(loaded, forward)(inputs)
        assert torch.equal(before.logits, after.logits) and torch.equal(before.exit_index, after.exit_index)
    assert model.predict(TEXTS) == loaded.predict(TEXTS)


def test_vision_model_round_trip(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    model = tiny_model("vit", costs=[0.4, 0.7, 1.01])
    model.preprocessor = ViTImageProcessor(size={"height": 16, "width": 16})
    model.save_pretrained(tmp_path / "model")
    no_pickles(tmp_path / "model")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(5)]
    before = model.predict(images, alpha=None, batch_size=2)
    assert before == loaded.predict(images, alpha=None, batch_size=2)
    assert len(before) == 5 and all(p.prediction_set is None for p in before)


def test_bad_model_folders(tmp_path):
    with pytest.raises(JeidnnError, match="nowhere"):
        EarlyExitModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JeidnnError, match="jeidnn.json"):
        EarlyExitModel.from_pretrained(tmp_path / "empty")
    folder = tmp_path / "model"
    text_model(tmp_path).save_pretrained(folder)
    config = json.loads((folder / "jeidnn.json").read_text())
    (folder / "jeidnn.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(JeidnnError, match="format version 99"):
        EarlyExitModel.from_pretrained(folder)
    (folder / "jeidnn.json").write_text("{not json")
    with pytest.raises(JeidnnError, match="not valid JSON"):
        EarlyExitModel.from_pretrained(folder)
    (folder / "jeidnn.json").write_text(json.dumps({k: v for k, v in config.items() if k != "labels"}))
    with pytest.raises(JeidnnError, match="labels"):
        EarlyExitModel.from_pretrained(folder)
    (folder / "jeidnn.json").write_text(json.dumps(config))
    (folder / "exits.safetensors").unlink()
    with pytest.raises(JeidnnError, match="exits.safetensors"):
        EarlyExitModel.from_pretrained(folder)


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
        EarlyExitModel(backbone, heads, Gates(2))
    with pytest.raises(JeidnnError, match="labels"):
        EarlyExitModel(backbone, heads, Gates(3), labels=["a", "b"])
    with pytest.raises(JeidnnError, match="last layer"):
        EarlyExitModel(backbone, ExitHeads([1, 2], backbone.hidden_size, NUM_CLASSES, "tanh"), Gates(2))


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_single_row_batches(arch):
    """Batch 1 takes the fast paths (nobody / everybody exits) of the dynamic loop."""
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        split_gate(model.gates.gates[0], model.forward_full(inputs).exit_logits[:, 0].softmax(-1).amax(-1))
        full = model.forward_full(inputs)
    assert len(set(full.exit_index.tolist())) > 1
    for i in range(BATCH):
        row = {k: v[i : i + 1, : int(inputs["attention_mask"][i].sum())] for k, v in inputs.items()}
        one = model.forward_dynamic(row)
        assert one.exit_index.item() == full.exit_index[i].item()
        torch.testing.assert_close(one.probs[0], full.probs[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_mean_pooling_and_linear_ims_dynamic_matches_full(arch, tmp_path):
    # Mean pooling reads the padding mask, which must shrink with the rows that keep running.
    torch.manual_seed(0)
    backbone = Backbone.load(ModelConfig(random_config=TINY_CONFIGS[arch], pooling="mean")).eval()
    heads = ExitHeads(
        [1, 2, 3], backbone.hidden_size, NUM_CLASSES, backbone.spec.head_activation, im_head="linear"
    )
    with torch.no_grad():
        for head in heads.heads:
            head.net[-1].weight.mul_(5)
    model = EarlyExitModel(backbone, heads, Gates(3), labels=["neg", "neu", "pos"]).eval()
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        pmax = model.forward_full(inputs).exit_logits.softmax(-1).amax(-1)  # (B, L)
    split_gate(model.gates.gates[0], pmax[:, 0])
    set_gate(model.gates.gates[1], bias=-20.0)
    with torch.no_grad():
        full = model.forward_full(inputs)
    assert set(full.exit_index.tolist()) == {0, 2}
    assert_same(model.forward_dynamic(inputs), full)
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.backbone.pooling == "mean" and loaded.heads.im_head == "linear"
    with torch.no_grad():
        assert torch.equal(loaded.forward_dynamic(inputs).logits, model.forward_dynamic(inputs).logits)
