"""Half-precision checkpoints: a bfloat16-saved BERT through the whole run, its export and `jeidnn predict`;
`model.dtype`, `--dtype` and the `precision` setting."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import TINY_CONFIGS, check_exported_exits_on_test, few_steps_argv, write_sentiment_csv
from transformers import AutoConfig, AutoModel

from jeidnn import EarlyExitModel
from jeidnn.cli.main import main, train_main
from jeidnn.config.parser import load_config
from jeidnn.errors import JeidnnError
from jeidnn.model.preprocess import build_word_tokenizer
from jeidnn.train.devices import run_precision
from jeidnn.train.inputs import load_inputs

TEXTS = ["the road was awful today", "a lovely day", "my phone"]


def save_checkpoint(folder, csv, dtype: torch.dtype):
    """A tiny random BERT saved in `dtype`, with a word tokenizer, as a hub upload would be."""
    config = dict(TINY_CONFIGS["bert"])
    model_type = config.pop("model_type")
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(model_type, **config)).to(dtype).save_pretrained(folder)
    texts = [line.split(",")[0] for line in csv.read_text().splitlines()[1:]]
    build_word_tokenizer(texts, config["vocab_size"]).save_pretrained(folder)
    return folder


def run_args(checkpoint, csv, out, name, *extra):
    model = ["--model.name_or_path", str(checkpoint), "--model.random_config", "null"]
    return few_steps_argv(model, ["--data.source", "csv", "--data.path", str(csv)], out, name, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "data.csv", n=300)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("bf16")
    checkpoint = save_checkpoint(tmp / "checkpoint", data, torch.bfloat16)
    assert train_main(run_args(checkpoint, data, tmp / "runs", "bf16")) == 0
    return tmp / "runs" / "bf16"


def weight_dtypes(path):
    """{(top-level prefix, dtype)} of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return {(key.split(".")[0], f.get_tensor(key).dtype) for key in f.keys()}


def test_a_bf16_checkpoint_runs_and_records_its_dtype(bf16_run):
    report = json.loads((bf16_run / "report.json").read_text())
    assert report["backbone"]["dtype"] == "bfloat16"
    assert report["backbone"]["precision"] == "32-true"  # auto on a CPU
    # Trained in float32 (the fine-tuned weights kept for resuming and `jeidnn export`).
    assert weight_dtypes(bf16_run / "backbone" / "model.safetensors") == {
        (k, torch.float32) for k in ["embeddings", "encoder", "pooler"]
    }


def test_the_exported_folder_keeps_the_bf16_backbone_and_float32_exits(bf16_run):
    folder = bf16_run / "model"
    assert weight_dtypes(folder / "model.safetensors") == {
        ("backbone", torch.bfloat16),
        ("heads", torch.float32),
        ("gates", torch.float32),
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == config["backbone_config"]["dtype"] == "bfloat16"
    model = EarlyExitModel.from_pretrained(folder)
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in [*model.heads.parameters(), *model.gates.parameters()]} == {torch.float32}
    assert {b.dtype for b in model.gates.buffers()} == {torch.float32}
    assert model.cost_per_exit.dtype == torch.float32
    assert torch.equal(model.cost_per_exit, torch.tensor(model.costs, dtype=torch.float32))


def test_the_exported_bf16_model_takes_the_reported_exits_on_test(bf16_run):
    """As tests/test_smoke_run.py checks for float32: the bf16 model leaves where the evaluation said."""
    check_exported_exits_on_test(bf16_run)


def test_predict_runs_the_bf16_folder_and_dtype_overrides_it(bf16_run, capsys):
    folder = bf16_run / "model"
    assert main(["predict", str(folder), *sum((["--text", t] for t in TEXTS), []), "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = EarlyExitModel.from_pretrained(folder)
    assert [(x["label"], x["exit_layer"]) for x in lines] == [
        (p.label, p.exit_layer) for p in model.predict(TEXTS)
    ]

    as_float = EarlyExitModel.from_pretrained(folder, dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    assert main(["predict", str(folder), "--text", TEXTS[0], "--dtype", "float32", "--quiet"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["label"] == as_float.predict(TEXTS[:1])[0].label


def test_export_dtype_writes_the_backbone_in_that_dtype(bf16_run, tmp_path):
    out = tmp_path / "f16"
    assert main(["export", str(bf16_run), "--out", str(out), "--dtype", "float16", "--quiet"]) == 0
    assert weight_dtypes(out / "model.safetensors") == {
        ("backbone", torch.float16),
        ("heads", torch.float32),
        ("gates", torch.float32),
    }
    model = EarlyExitModel.from_pretrained(out)
    assert {p.dtype for p in model.backbone.parameters()} == {torch.float16}
    assert {p.dtype for p in model.heads.parameters()} == {torch.float32}
    predictions = model.predict(TEXTS)
    assert [p.label for p in predictions] and all(0 < p.probability <= 1 for p in predictions)

    # auto = the dtype the run evaluated: the same weights as train.py's own export.
    same = tmp_path / "auto"
    assert main(["export", str(bf16_run), "--out", str(same), "--quiet"]) == 0
    with (
        safe_open(str(same / "model.safetensors"), "pt") as a,
        safe_open(str(bf16_run / "model" / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_float16_checkpoint_trains_in_float32_and_serves_in_float16(tmp_path, data):
    checkpoint = save_checkpoint(tmp_path / "checkpoint", data, torch.float16)
    saved = AutoModel.from_pretrained(checkpoint)
    assert saved.dtype == torch.float16
    cfg = load_config("configs/smoke.yaml")
    cfg.model.name_or_path, cfg.model.random_config = str(checkpoint), None
    cfg.data.source, cfg.data.path = "csv", str(data)
    inputs = load_inputs(cfg)
    assert inputs.dtype == torch.float16
    weights = dict(inputs.backbone.model.named_parameters())
    assert {w.dtype for w in weights.values()} == {torch.float32}
    for name, w in saved.named_parameters():  # upcast exactly
        assert torch.equal(weights[name], w.float())

    cfg.model.dtype = "bfloat16"
    assert load_inputs(cfg).dtype == torch.bfloat16


def test_model_dtype_and_precision_are_checked_before_the_run_folder(tmp_path, data, capsys):
    argv = run_args("embedded:all-MiniLM-L6-v2", data, tmp_path / "runs", "x", "--accelerator", "cpu")
    assert train_main([*argv, "--precision", "bf16-mixed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: precision bf16-mixed needs a GPU") and "use precision 32-true" in err
    assert not (tmp_path / "runs").exists()
    assert train_main([*argv, "--model.dtype", "float8"]) == 2
    assert "model.dtype" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_precision_resolution(monkeypatch):
    cpu, gpu, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert run_precision("auto", cpu) == run_precision("auto", mps) == "32-true"
    assert run_precision("32-true", cpu) == "32-true"
    for bad in ("bf16-mixed", "16-mixed"):
        with pytest.raises(JeidnnError, match=f"precision {bad} needs a GPU"):
            run_precision(bad, cpu)
    with pytest.raises(JeidnnError, match="unknown precision 'bf16'"):
        run_precision("bf16", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert run_precision("auto", gpu) == "bf16-mixed"
    assert run_precision("16-mixed", gpu) == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert run_precision("auto", gpu) == "16-mixed"
    with pytest.raises(JeidnnError, match="Tesla T4 has no bfloat16; use precision 16-mixed"):
        run_precision("bf16-mixed", gpu)
