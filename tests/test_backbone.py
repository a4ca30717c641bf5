import json

import pytest
import torch
from tiny_models import TEXT_ARCHS, TINY_CONFIGS, VISION_ARCHS

from jeidnn.config.schema import ModelConfig
from jeidnn.errors import JeidnnError
from jeidnn.model.backbone import Backbone
from jeidnn.model.cost import count_flops, exit_costs, text_cost_samples
from jeidnn.model.heads import ExitHeads


def tiny(arch: str) -> Backbone:
    return Backbone.load(ModelConfig(random_config=TINY_CONFIGS[arch])).eval()


def batch_for(backbone: Backbone) -> dict:
    g = torch.Generator().manual_seed(1)
    if backbone.modality == "image":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    ids = torch.randint(5, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in the batch
    ids[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", TEXT_ARCHS + VISION_ARCHS)
def test_exit_logits_equal_heads_on_output_hidden_states(arch):
    backbone = tiny(arch)
    heads = ExitHeads([1, 2, 3], backbone.hidden_size, 4, backbone.family.head_activation).eval()
    inputs = batch_for(backbone)
    with torch.no_grad():
        logits = heads(backbone(inputs))  # (B, L, C)
        out = backbone.model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states  # L + 1 entries
        token = torch.zeros(len(hidden[0]), dtype=torch.long)  # CLS
        if backbone.pooling == "last":  # decoders: the last real token
            mask = inputs["attention_mask"]
            token = (torch.arange(mask.shape[1]) * mask).argmax(dim=1)
        rows = torch.arange(len(token))
        for layer in (1, 2, 3):
            cls = hidden[layer][rows, token]
            if backbone.exit_norm:  # pre-norm family: its final norm before any head
                # (the last layer's is the model's own output, hidden_states[-1] is normalised in some models)
                cls = out.last_hidden_state[rows, token] if layer == 3 else backbone.final_norm(cls)
            expected = heads.heads[layer - 1](cls)
            torch.testing.assert_close(logits[:, layer - 1], expected, atol=1e-5, rtol=1e-5)
    assert backbone.num_layers == 3 and backbone.hidden_size == 32


def test_subset_of_exit_layers():
    backbone = tiny("bert")
    inputs = batch_for(backbone)
    with torch.no_grad():
        everything = backbone(inputs)
        some = backbone(inputs, layers=[1, 3])
    torch.testing.assert_close(some, everything[:, [0, 2]])


@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit"])
def test_exit_costs_increase_with_depth(arch):
    backbone = tiny(arch)
    heads = ExitHeads([1, 2, 3], backbone.hidden_size, 4, backbone.family.head_activation)
    if backbone.modality == "text":
        samples = text_cost_samples([[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12]])
    else:
        samples = [({"pixel_values": torch.randn(2, 3, 16, 16)}, 1.0)]
    costs = exit_costs(backbone, heads, samples, "test")
    assert costs.cost == sorted(costs.cost) and len(set(costs.cost)) == 3
    # the last exit also pays for the two IMs before it: slightly more than the plain model
    assert costs.cost[-1] > 1.0
    expected_last = (costs.full_flops + sum(costs.head_flops[:2])) / costs.full_flops
    assert costs.cost[-1] == pytest.approx(expected_last)
    assert all(g > c for g, c in zip(costs.cost_with_gates, costs.cost))


def test_flops_of_a_linear_layer_match_the_analytic_count():
    linear = torch.nn.Linear(32, 7)
    x = torch.randn(5, 32)
    assert count_flops(lambda: linear(x)) == 2 * 5 * 32 * 7


def test_layer_flops_include_attention():
    # One BERT layer on T tokens: 2·T·(4H² + 2·H·I) for the linears + 2·2·T²·H for QKᵀ and AV.
    backbone = tiny("bert")
    heads = ExitHeads([1, 2, 3], 32, 4, "tanh")
    T, H, I = 10, 32, 37
    costs = exit_costs(backbone, heads, text_cost_samples([list(range(5, 5 + T))]), "t")
    assert costs.layer_flops[0] == 2 * T * (4 * H * H + 2 * H * I) + 4 * T * T * H
    assert costs.head_flops[0] == 2 * (H * H + H * 4)


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(JeidnnError, match="unsupported architecture 'opt'"):
        Backbone.load(ModelConfig(random_config={"model_type": "opt", "hidden_size": 32}))
    folder = tmp_path / "opt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(JeidnnError, match="unsupported architecture 'opt'"):
        Backbone.load(ModelConfig(name_or_path=str(folder)))


def test_missing_model_folder(tmp_path):
    with pytest.raises(JeidnnError, match="model folder not found"):
        Backbone.load(ModelConfig(name_or_path=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JeidnnError, match="no config.json"):
        Backbone.load(ModelConfig(name_or_path=str(empty)))


def test_saved_folder_loads_back(tmp_path):
    backbone = tiny("bert")
    backbone.model.save_pretrained(tmp_path / "m")
    again = Backbone.load(ModelConfig(name_or_path=str(tmp_path / "m"))).eval()
    inputs = batch_for(backbone)
    with torch.no_grad():
        torch.testing.assert_close(again(inputs), backbone(inputs))


def test_mean_pooling_ignores_padding():
    cfg = ModelConfig(random_config=TINY_CONFIGS["bert"], pooling="mean")
    backbone = Backbone.load(cfg).eval()
    ids = torch.randint(5, 99, (1, 6))
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = backbone(short)
        b = backbone({"input_ids": padded_ids, "attention_mask": mask})
        hidden = backbone.model(**short, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:, 0], hidden[1].mean(dim=1), atol=1e-5, rtol=1e-5)


def test_sentence_transformers_folder_selects_mean_pooling(tmp_path):
    backbone = tiny("bert")
    folder = tmp_path / "st"
    backbone.model.save_pretrained(folder)
    assert Backbone.load(ModelConfig(name_or_path=str(folder))).pooling == "cls"
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True})
    )
    assert Backbone.load(ModelConfig(name_or_path=str(folder))).pooling == "mean"
    assert Backbone.load(ModelConfig(name_or_path=str(folder), pooling="cls")).pooling == "cls"
    with pytest.raises(JeidnnError, match="mean' is for text"):
        Backbone.load(ModelConfig(random_config=TINY_CONFIGS["vit"], pooling="mean"))


def saved_classifier(tmp_path, arch: str, id2label: dict[int, str]):
    """A tiny *ForSequenceClassification / *ForImageClassification checkpoint saved in `tmp_path`."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    kwargs = dict(TINY_CONFIGS[arch])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs, id2label=id2label)
    auto = AutoModelForImageClassification if arch in VISION_ARCHS else AutoModelForSequenceClassification
    torch.manual_seed(4)
    model = auto.from_config(config).eval()
    model.save_pretrained(tmp_path / arch)
    return model, ModelConfig(name_or_path=str(tmp_path / arch))


@pytest.mark.parametrize(
    "arch", ["bert", "roberta", "electra", "distilbert", "vit", "xlm-roberta", "deberta-v2"]
)
def test_checkpoint_classifier_is_the_checkpoints_own_head(tmp_path, arch):
    """With stage 0 off, the final exit is the checkpoint's trained classifier: the HF model's logits."""
    from jeidnn.model.checkpoint_head import checkpoint_classifier
    from jeidnn.model.heads import ExitHead

    model, cfg = saved_classifier(tmp_path, arch, {0: "neg", 1: "neu", 2: "pos"})
    backbone = Backbone.load(cfg).eval()
    found = checkpoint_classifier(cfg, ["neg", "neu", "pos"], backbone.pooling)
    assert found.state is not None and "classes matched by name" in found.reason
    head = ExitHead(backbone.hidden_size, 3, backbone.family.head_activation).eval()
    head.load_state_dict(found.state)
    inputs = batch_for(backbone)
    with torch.no_grad():
        ours = head(backbone(inputs)[:, -1])
        theirs = model(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_checkpoint_classifier_matches_classes_by_name_or_says_why_not(tmp_path):
    from jeidnn.model.checkpoint_head import checkpoint_classifier

    model, cfg = saved_classifier(tmp_path, "bert", {0: "NEG", 1: "neu", 2: "pos"})
    found = checkpoint_classifier(cfg, ["pos", "neg", "neu"], "cls")  # the data orders its classes otherwise
    out = model.classifier
    torch.testing.assert_close(found.state["net.3.weight"], out.weight[[2, 0, 1]])
    torch.testing.assert_close(found.state["net.3.bias"], out.bias[[2, 0, 1]])
    other = checkpoint_classifier(cfg, ["a", "b", "c"], "cls")
    assert other.state is None and "are not the data's" in other.reason
    assert "has 3 classes, the data has 2" in checkpoint_classifier(cfg, ["neg", "pos"], "cls").reason
    assert "pool by mean" in checkpoint_classifier(cfg, ["neg", "neu", "pos"], "mean").reason
    _, generic = saved_classifier(tmp_path / "g", "bert", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    assert "taken to be data.labels'" in checkpoint_classifier(generic, ["x", "y", "z"], "cls").reason
    tiny("bert").model.save_pretrained(tmp_path / "base")
    base = checkpoint_classifier(ModelConfig(name_or_path=str(tmp_path / "base")), ["x", "y"], "cls")
    assert base.state is None and "is a base model (BertModel)" in base.reason


def _fake_hub_cache(root, repo_id: str, pooling: dict) -> None:
    """A Hugging Face cache holding only `1_Pooling/config.json` of `repo_id` (the hub's cache layout)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision / "1_Pooling"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(pooling))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_sentence_transformers_pooling_is_read_from_a_folder_and_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from jeidnn.model.backbone import sentence_transformers_pooling

    mean = {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
    folder = tmp_path / "local" / "1_Pooling"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(mean))
    assert sentence_transformers_pooling(str(tmp_path / "local")) == "mean"
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "sentence-transformers/tiny-mean", mean)
    _fake_hub_cache(
        cache, "org/tiny-cls", {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    assert sentence_transformers_pooling("sentence-transformers/tiny-mean") == "mean"
    assert sentence_transformers_pooling("org/tiny-cls") == "cls"
    # Offline and not cached: CLS, as before.
    assert sentence_transformers_pooling("sentence-transformers/not-cached") is None
