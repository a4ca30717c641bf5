"""The early-exit model as a Hugging Face model: Auto classes, save / load, pipelines, old and bad folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_early_exit import (
    BATCH,
    TEXTS,
    assert_same,
    no_pickles,
    text_model,
    tiny_inputs,
    tiny_model,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

import jeidnn  # noqa: F401  (registers the Auto classes)
from jeidnn.errors import JeidnnError
from jeidnn.hf.config import EarlyExitConfig
from jeidnn.hf.modeling import (
    EarlyExitForImageClassification,
    EarlyExitForSequenceClassification,
    EarlyExitModel,
)
from jeidnn.model.early_exit import (
    PatienceConfidenceGates,
    PatienceGates,
    ProductGates,
    StaticGates,
    ThresholdGates,
)
from jeidnn.model.gates import Gates

GATES = ["learned", "threshold", "patience", "static", "product", "patience_confidence", "none"]


def gated_text_model(tmp_path, kind: str) -> EarlyExitModel:
    """A tiny text model whose gates send the test texts and inputs to more than one exit (but `none`)."""
    model = text_model(tmp_path, "paper" if kind == "learned" else "none", exit_threshold=0.5)
    if kind == "threshold":  # a threshold nobody passes at exit 0; everyone passes at exit 1
        model.gates = ThresholdGates([float("inf"), -1.0], "maxprob")
    elif kind == "patience":
        model.gates = PatienceGates(1)
    elif kind == "static":
        model.gates = StaticGates(1)
    elif kind == "product":  # nobody passes at exit 0; everyone at exit 1
        model.gates = ProductGates([float("inf"), -1.0])
    elif kind == "patience_confidence":  # patience 1 with a threshold every prediction reaches
        model.gates = PatienceConfidenceGates(1, 0.0)
    return model


def first_line_error(load, match: str) -> str:
    with pytest.raises(JeidnnError, match=match) as info:
        load()
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------- Auto classes, save / load
def test_auto_classes_return_the_early_exit_model(tmp_path):
    model = text_model(tmp_path)
    model.save_pretrained(tmp_path / "model")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "model"), EarlyExitConfig)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = model.forward_dynamic(inputs)
    for auto, cls in [
        (AutoModelForSequenceClassification, EarlyExitForSequenceClassification),
        (AutoModel, EarlyExitModel),
    ]:
        loaded = auto.from_pretrained(tmp_path / "model")
        assert type(loaded) is cls and not loaded.training
        assert loaded.preprocessor is not None  # the tokenizer comes with it (predict needs it)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected.logits)
    assert type(AutoTokenizer.from_pretrained(tmp_path / "model")).__name__.startswith("Bert")


@pytest.mark.parametrize("kind", GATES)
def test_round_trip_keeps_every_gate_kind_and_dynamic_equals_full(tmp_path, kind):
    model = gated_text_model(tmp_path, kind)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    no_pickles(folder)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "jeidnn.json").exists()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "jeidnn" and saved["backbone_config"]["model_type"] == "bert"
    assert saved["architectures"] == ["EarlyExitForSequenceClassification"]  # the hub's pipeline tag
    assert saved["gates"]["kind"] == kind and "auto_map" not in saved  # `import jeidnn` registers the class
    assert saved["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and saved["costs"] == [0.4, 0.7, 1.01]
    # Each tensor once, under the Hugging Face backbone's own names (not under Backbone's layer-stack alias).
    keys = set(load_file(str(folder / "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == (
        {"backbone", "heads", "gates"} if kind == "learned" else {"backbone", "heads"}
    )
    assert "backbone.model.encoder.layer.0.output.dense.weight" in keys
    assert not any(k.startswith("backbone.layers.") for k in keys)

    loaded = EarlyExitModel.from_pretrained(folder)
    assert type(loaded.gates) is type(model.gates)
    if kind == "threshold":
        assert (
            loaded.gates.thresholds.tolist() == [float("inf"), -1.0]
            and saved["gates"]["thresholds"][0] == "inf"
        )
    for field in ("labels", "costs", "conformal_quantiles", "metadata", "exit_threshold", "default_alpha"):
        assert getattr(loaded, field) == getattr(model, field), field
    inputs = tiny_inputs("bert", 16)
    with torch.no_grad():
        full, dynamic = loaded.forward_full(inputs), loaded.forward_dynamic(inputs)
        before = model.forward_full(inputs)
    assert torch.equal(full.logits, before.logits) and torch.equal(full.exit_index, before.exit_index)
    assert_same(dynamic, full)
    expected_exits = {
        "learned": {0, 2},
        "threshold": {1},
        "patience": {1, 2},
        "static": {1},
        "product": {1},
        "patience_confidence": {1, 2},
        "none": {2},
    }[kind]
    assert set(full.exit_index.tolist()) == expected_exits
    assert loaded.predict(TEXTS) == model.predict(TEXTS)


def test_vision_model_loads_with_its_image_processor(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    model = tiny_model("vit", "hidden_linear", costs=[0.4, 0.7, 1.01])
    model.preprocessor = ViTImageProcessor(size={"height": 16, "width": 16})
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert type(loaded) is EarlyExitForImageClassification and loaded.main_input_name == "pixel_values"
    assert loaded.config.architectures == ["EarlyExitForImageClassification"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(5)]
    expected = [p.label for p in model.predict(images)]
    assert [p.label for p in loaded.predict(images)] == expected
    classify = pipeline("image-classification", model=str(tmp_path / "model"))
    assert [r[0]["label"] for r in classify(images)] == expected


def test_sharded_save_loads(tmp_path):
    """push_to_hub saves through save_pretrained(..., max_shard_size=...) and uploads the folder as is."""
    model = text_model(tmp_path)
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    loaded = EarlyExitModel.from_pretrained(tmp_path / "model")
    assert loaded.predict(TEXTS) == model.predict(TEXTS)


# ---------------------------------------------------------------------- forward, pipeline, predict
def test_forward_is_layer_skipping_in_eval_and_full_in_training(tmp_path):
    model = text_model(tmp_path)
    inputs = tiny_inputs("bert")
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with torch.no_grad():
        full = model.forward_full(inputs)
    out = model(**inputs, labels=labels)
    assert out.exit_logits is None and torch.equal(out.exit_index, full.exit_index)
    assert out.cost.tolist() == pytest.approx([model.costs[k] for k in full.exit_index.tolist()])
    assert float(out.loss) == pytest.approx(
        float(torch.nn.functional.cross_entropy(full.logits, labels)), abs=1e-5
    )
    loss, logits, *rest = model(**inputs, labels=labels, return_dict=False)
    assert torch.equal(logits, out.logits) and len(rest) == 4  # probs, exit_index, exit_layer, cost
    model.train()
    train_out = model(**inputs, labels=labels)
    assert train_out.exit_logits.shape == (BATCH, 3, 3) and train_out.loss.requires_grad
    train_out.loss.backward()  # the training path is differentiable end to end
    assert model.backbone.model.embeddings.word_embeddings.weight.grad is not None


def test_pipeline_labels_equal_predict_labels(tmp_path):
    model = text_model(tmp_path)
    model.save_pretrained(tmp_path / "model")
    texts = TEXTS + ["good good good", "awful"]
    predictions = model.predict(texts)
    classify = pipeline("text-classification", model=str(tmp_path / "model"))
    assert isinstance(classify.model, EarlyExitModel)
    results = classify(texts)
    assert [r["label"] for r in results] == [p.label for p in predictions]
    assert [r["score"] for r in results] == pytest.approx([p.probability for p in predictions], abs=1e-5)
    assert len({p.label for p in predictions}) > 1 and len({p.exit_layer for p in predictions}) > 1


def test_predict_uses_the_models_default_alpha(tmp_path):
    model = text_model(tmp_path)  # quantiles for 0.05 and 0.1, default alpha 0.1
    assert model.predict(TEXTS) == model.predict(TEXTS, alpha=0.1)
    assert all(p.prediction_set is None for p in model.predict(TEXTS, sets=False))
    model.config.default_alpha = 0.05
    narrow, wide = model.predict(TEXTS, alpha=0.1), model.predict(TEXTS)
    assert wide == model.predict(TEXTS, alpha=0.05) and wide != narrow
    model.save_pretrained(tmp_path / "model")
    assert EarlyExitModel.from_pretrained(tmp_path / "model").predict(TEXTS) == wide
    model.config.default_alpha = 0.2
    first_line_error(lambda: model.predict(TEXTS), r"default alpha 0\.2 was not calibrated .*0\.05, 0\.1")
    first_line_error(lambda: model.predict(TEXTS, alpha=0.3), r"alpha 0\.3 was not calibrated")
    no_sets = tiny_model("bert", "none")  # nothing calibrated: no sets unless asked for
    no_sets.preprocessor = model.preprocessor
    assert all(p.prediction_set is None for p in no_sets.predict(TEXTS))
    parts = (model.backbone, model.heads, model.gates)
    first_line_error(
        lambda: EarlyExitModel.from_parts(*parts, conformal_quantiles={"0.05": [0.9] * 3}, default_alpha=0.1),
        r"default alpha 0\.1 has no conformal quantiles \(calibrated: 0\.05\)",
    )


def test_a_fresh_process_needs_import_jeidnn(tmp_path):
    """What a user of a pushed model does: transformers alone does not know "jeidnn"; after the import the
    pipeline loads the folder."""
    model = text_model(tmp_path)
    model.save_pretrained(tmp_path / "model")
    script = f"""
import json, transformers
try:
    transformers.AutoConfig.from_pretrained({str(tmp_path / "model")!r})
    raise SystemExit("loaded without import jeidnn")
except (ValueError, KeyError):
    pass
import jeidnn
classify = transformers.pipeline("text-classification", model={str(tmp_path / "model")!r})
print(json.dumps([r["label"] for r in classify({TEXTS!r})]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [p.label for p in model.predict(TEXTS)]


# ---------------------------------------------------------------------- folders of the jeidnn.json layout
def write_legacy_folder(model: EarlyExitModel, folder, version: int = 2) -> None:
    """The layout EarlyExitModel.save_pretrained wrote before it was a Hugging Face model (format 2)."""
    (folder / "backbone").mkdir(parents=True)
    model.backbone.model.save_pretrained(folder / "backbone")
    model.preprocessor.save_pretrained(folder / "backbone")
    state = {f"heads.{k}": v for k, v in model.heads.state_dict().items()}
    gates: dict = {"type": "none"}
    if isinstance(model.gates, Gates):
        state.update({f"gates.{k}": v for k, v in model.gates.state_dict().items()})
        settings, hidden = model.gates.settings.to_dict(), model.backbone.hidden_size
        gates = {"type": "learned", "settings": settings, "hidden_size": hidden, "exit_threshold": 0.4}
    elif isinstance(model.gates, ThresholdGates):
        gates = {
            "type": "threshold",
            "measure": model.gates.measure,
            "thresholds": model.gates.thresholds.tolist(),
        }
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "exits.safetensors"))
    config = {
        "format_version": version,
        "arch": "bert",
        "modality": "text",
        "num_layers": 3,
        "exit_layers": model.heads.layers,
        "hidden_size": model.backbone.hidden_size,
        "num_classes": 3,
        "head_activation": "tanh",
        "im_head": model.heads.im_head,
        "pooling": model.backbone.pooling,
        "gates": gates,
        "labels": model.labels,
        "costs": model.costs,
        "conformal_quantiles": {"0.05": [0.9, 0.8, 0.95], "0.2": [0.5, 0.6, 0.7]},
        "max_length": 16,
        "preprocessor": "BertTokenizer",
        "metadata": {"lambda": 0.5, "default_alpha": 0.2},
    }
    (folder / "jeidnn.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["learned", "threshold", "none"])
def test_legacy_folders_load_and_save_in_the_current_layout(tmp_path, kind):
    model = gated_text_model(tmp_path, kind)
    model.exit_threshold = 0.4
    write_legacy_folder(model, tmp_path / "old")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "old")
    assert (loaded.max_length, loaded.default_alpha, loaded.metadata["lambda"]) == (16, 0.2, 0.5)
    assert loaded.exit_threshold == (0.4 if kind == "learned" else 0.5) and type(loaded.gates) is type(
        model.gates
    )
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(loaded.forward_full(inputs).logits, model.forward_full(inputs).logits)
    loaded.save_pretrained(tmp_path / "new")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "new")
    assert again.predict(TEXTS) == loaded.predict(TEXTS)
    assert all(p.prediction_set is not None for p in again.predict(TEXTS))  # default alpha 0.2 kept


def test_broken_legacy_folders(tmp_path):
    model = text_model(tmp_path)
    write_legacy_folder(model, tmp_path / "v1", version=1)
    assert "re-export" in first_line_error(
        lambda: EarlyExitModel.from_pretrained(tmp_path / "v1"), "format version 1"
    )
    folder = tmp_path / "old"
    write_legacy_folder(model, folder)
    config = json.loads((folder / "jeidnn.json").read_text())
    learned = {k: v for k, v in config["gates"].items() if k != "exit_threshold"}
    (folder / "jeidnn.json").write_text(json.dumps({**config, "gates": learned}))
    first_line_error(
        lambda: EarlyExitModel.from_pretrained(folder), "jeidnn.json lacks the key 'exit_threshold'"
    )
    (folder / "jeidnn.json").write_text("{not json")
    first_line_error(lambda: EarlyExitModel.from_pretrained(folder), "jeidnn.json is not valid JSON")
    (folder / "exits.safetensors").unlink()
    first_line_error(lambda: EarlyExitModel.from_pretrained(folder), "exits.safetensors is missing")
    # A backbone saved as a pickle is refused, never unpickled.
    folder = tmp_path / "pickled"
    write_legacy_folder(model, folder)
    weights = load_file(str(folder / "backbone" / "model.safetensors"))
    torch.save(weights, folder / "backbone" / "pytorch_model.bin")
    (folder / "backbone" / "model.safetensors").unlink()
    first_line_error(
        lambda: EarlyExitModel.from_pretrained(folder), "cannot load the jeidnn model in .*pickled"
    )


# ---------------------------------------------------------------------- bad folders
def test_bad_model_folders(tmp_path):
    load = EarlyExitModel.from_pretrained
    first_line_error(lambda: load(tmp_path / "nowhere"), "model folder not found: .*nowhere")
    (tmp_path / "empty").mkdir()
    first_line_error(lambda: load(tmp_path / "empty"), "empty/config.json is missing")
    folder = tmp_path / "model"
    model = text_model(tmp_path)
    model.save_pretrained(folder)
    config_text = (folder / "config.json").read_text()
    config = json.loads(config_text)

    (folder / "config.json").write_text(config_text[: len(config_text) // 2])  # truncated
    first_line_error(lambda: load(folder), "model/config.json is not valid JSON")
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    first_line_error(lambda: load(folder), "model/config.json describes a model of type 'bert'")
    (folder / "config.json").write_text(json.dumps({**config, "costs": [0.5, 1.0]}))
    first_line_error(
        lambda: load(folder), r"model/config.json: 2 exit costs \[0.5, 1.0\] for a model with 3 exits"
    )
    (folder / "config.json").write_text(json.dumps({**config, "gates": {"kind": "oracle"}}))
    first_line_error(lambda: load(folder), "config.json: unknown gate kind 'oracle'")
    (folder / "config.json").write_text(json.dumps({**config, "gates": {"kind": "none"}}))
    first_line_error(
        lambda: load(folder), r"model.safetensors does not fit config.json \(unexpected keys: gates.b, gates"
    )
    (folder / "config.json").write_text(config_text)

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:1000])  # corrupted
    first_line_error(lambda: load(folder), "model/model.safetensors cannot be read")
    (folder / "model.safetensors").unlink()
    first_line_error(lambda: load(folder), "model/model.safetensors is missing")
    (folder / "model.safetensors").write_bytes(weights)
    assert load(folder).predict(TEXTS) == model.predict(TEXTS)  # the folder itself was fine


def test_inconsistent_parts_are_refused():
    model = tiny_model("bert", "paper")
    parts = (model.backbone, model.heads)
    first_line_error(lambda: EarlyExitModel.from_parts(*parts, Gates(2)), "the gates expect 2 exits")
    first_line_error(lambda: EarlyExitModel.from_parts(*parts, None, labels=["a", "b"]), "2 labels")
    first_line_error(lambda: EarlyExitModel.from_parts(*parts, None, costs=[1.0]), r"1 exit costs \[1.0\]")
    first_line_error(
        lambda: EarlyExitModel.from_parts(*parts, None, conformal_quantiles={"0.1": [0.5]}),
        "conformal quantiles for alpha 0.1 have 1 values, need 3",
    )


def test_an_infinite_exit_threshold_is_written_as_strict_json_and_read_back(tmp_path):
    model = gated_text_model(tmp_path, "learned")
    model.exit_threshold = float("inf")  # no sample leaves early
    model.save_pretrained(tmp_path / "model")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    config = json.loads((tmp_path / "model" / "config.json").read_text(), parse_constant=no_constants)
    assert config["gates"]["exit_threshold"] == "inf"
    loaded = EarlyExitModel.from_pretrained(tmp_path / "model")
    assert loaded.exit_threshold == float("inf")
    out = loaded(**model.preprocessor(["a b c", "d e"], return_tensors="pt", padding=True))
    assert out.exit_index.tolist() == [model.num_exits - 1] * 2


def test_infinite_quantiles_and_metadata_are_strict_json_too(tmp_path):
    model = gated_text_model(tmp_path, "threshold")
    model.conformal_quantiles = {"0.1": [float("inf")] * model.num_exits}
    model.metadata = {"exit_threshold": float("inf"), "note": [float("-inf")]}
    model.save_pretrained(tmp_path / "model")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    json.loads((tmp_path / "model" / "config.json").read_text(), parse_constant=no_constants)
    loaded = EarlyExitModel.from_pretrained(tmp_path / "model")
    assert loaded.conformal_quantiles == {"0.1": [float("inf")] * model.num_exits}
    assert loaded.metadata == {"exit_threshold": "inf", "note": ["-inf"]}
    assert model.metadata["exit_threshold"] == float("inf")  # in memory: still the float
