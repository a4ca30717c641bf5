"""`jeidnn predict` on a tiny saved text model with an offline tokenizer."""

import csv
import json

import pytest
import torch
from predict_model import LABELS, TEXTS, text_model

from jeidnn.errors import JeidnnError
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.hf.predict import predict_cli

KEYS = {"label", "probability", "exit_layer", "cost", "prediction_set"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    text_model(folder).save_pretrained(folder / "model")  # exit layers 1 and 3 both occur
    return folder / "model"


def read_lines(text: str) -> list[dict]:
    rows = [json.loads(line) for line in text.splitlines()]
    for row in rows:
        assert set(row) == KEYS
        assert row["label"] in LABELS and set(row["prediction_set"]) <= set(LABELS)
        assert 0 < row["probability"] <= 1 and row["exit_layer"] in (1, 2, 3)
        assert row["cost"] == {1: 0.4, 2: 0.7, 3: 1.01}[row["exit_layer"]]
    return rows


def test_predict_texts_to_stdout(model_dir, capsys):
    assert predict_cli(str(model_dir), TEXTS, None, "text", 0.1, None, 4) == 0
    rows = read_lines(capsys.readouterr().out)
    assert len(rows) == len(TEXTS)
    expected = EarlyExitModel.from_pretrained(model_dir).predict(TEXTS, alpha=0.1)
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert [r["exit_layer"] for r in rows] == [p.exit_layer for p in expected]
    assert {r["exit_layer"] for r in rows} == {1, 3}
    # α = 0.05 has larger quantiles: its sets contain those of α = 0.1.
    predict_cli(str(model_dir), TEXTS, None, "text", 0.05, None, 64)
    wider = read_lines(capsys.readouterr().out)
    assert all(set(a["prediction_set"]) <= set(b["prediction_set"]) for a, b in zip(rows, wider))


def test_predict_csv_and_jsonl_to_file(model_dir, tmp_path):
    csv_path = tmp_path / "inputs.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "tweet"])
        writer.writerows(enumerate(TEXTS))
    out = tmp_path / "out.jsonl"
    assert predict_cli(str(model_dir), None, str(csv_path), "tweet", 0.1, str(out), 2) == 0
    from_csv = read_lines(out.read_text())
    assert len(from_csv) == len(TEXTS)

    jsonl_path = tmp_path / "inputs.jsonl"
    jsonl_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    predict_cli(str(model_dir), None, str(jsonl_path), "text", 0.1, str(out), 64)
    from_jsonl = read_lines(out.read_text())
    # Other batch sizes change float rounding only.
    assert [{**r, "probability": pytest.approx(r["probability"], abs=1e-5)} for r in from_csv] == from_jsonl


def test_bad_inputs_name_the_value(model_dir, tmp_path):
    def fails(match, texts=None, path=None, column="text", alpha=0.1, model=str(model_dir), device="cpu"):
        with pytest.raises(JeidnnError, match=match) as info:
            predict_cli(model, texts, path, column, alpha, None, 8, device=device)
        assert "\n" not in str(info.value)

    fails("nothing to predict")
    fails(r"missing\.csv", path=str(tmp_path / "missing.csv"))
    (tmp_path / "data.txt").write_text("hello\n")
    fails(r"data\.txt", path=str(tmp_path / "data.txt"))
    (tmp_path / "data.csv").write_text("id,text\n1,hello\n2,\n")
    fails("column 'tweet' not found.*columns: id, text", path=str(tmp_path / "data.csv"), column="tweet")
    fails(r"row 2 of .*data\.csv is an empty text", path=str(tmp_path / "data.csv"))
    (tmp_path / "header.csv").write_text("id,text\n")
    fails(r"header\.csv has no records", path=str(tmp_path / "header.csv"))
    (tmp_path / "latin.csv").write_bytes("text\ncaf\u00e9\n".encode("latin-1"))
    fails(r"latin\.csv is not utf-8 text: byte 0xe9 at offset 8 \(line 2\)", path=str(tmp_path / "latin.csv"))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    fails(
        r"unsupported file .*photo\.png for --input: give a \.csv or \.jsonl file",
        path=str(tmp_path / "photo.png"),
    )
    fails("unknown --device 'gpu0'", texts=["fine"], device="gpu0")
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n{oops\n')
    fails(r"line 2 of .*bad\.jsonl is not valid JSON", path=str(tmp_path / "bad.jsonl"))
    fails("--text #2 is an empty text", texts=["fine", ""])
    fails(r"alpha 0\.3 was not calibrated.*0\.05, 0\.1", texts=["fine"], alpha=0.3)
    fails("model folder not found", texts=["fine"], model=str(tmp_path / "no_model"))


def test_bom_home_path_device_and_progress_bar(model_dir, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "in.csv"
    inputs.write_bytes(b"\xef\xbb\xbf" + ("text\n" + "\n".join(TEXTS * 7) + "\n").encode())
    monkeypatch.setenv("HOME", str(tmp_path))
    # batch size 2: 42 texts in chunks of 32, so the bar moves twice.
    assert (
        predict_cli(str(model_dir), None, "~/in.csv", "text", 0.1, None, 2, device="cpu", progress=True) == 0
    )
    captured = capsys.readouterr()
    rows = read_lines(captured.out)
    assert [r["label"] for r in rows] == [
        p.label for p in EarlyExitModel.from_pretrained(model_dir).predict(TEXTS * 7)
    ]
    assert "predict" in captured.err and "42/42" in captured.err
    predict_cli(str(model_dir), None, "~/in.csv", "text", 0.1, None, 2, device="auto", progress=False)
    quiet = capsys.readouterr()
    assert quiet.err == "" and read_lines(quiet.out) == rows


def test_without_alpha_the_model_default_alpha_is_used(model_dir, tmp_path, capsys):
    model = EarlyExitModel.from_pretrained(model_dir)
    model.config.default_alpha = 0.05  # what export.alpha 0.05 gives
    model.save_pretrained(tmp_path / "model")
    for alpha in (None, 0.05, 0.1):
        predict_cli(str(tmp_path / "model"), TEXTS, None, alpha=alpha, device="cpu", progress=False)
    default, at_005, at_01 = (read_lines(chunk) for chunk in _split(capsys.readouterr().out, len(TEXTS)))
    assert default == at_005 != at_01


def _split(out: str, n: int) -> list[str]:
    lines = out.splitlines(keepends=True)
    return ["".join(lines[i : i + n]) for i in range(0, len(lines), n)]


def test_predict_moves_the_model_to_the_device(model_dir, monkeypatch, capsys):
    seen = []
    original = EarlyExitModel.to

    def spy(self, *args, **kwargs):
        seen.append(torch.device(*args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EarlyExitModel, "to", spy)
    predict_cli(str(model_dir), ["fine"], None, device="cpu", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    predict_cli(str(model_dir), ["fine"], None, device="auto", progress=False)
    assert seen == [torch.device("cpu"), torch.device("cpu")]
    with pytest.raises(JeidnnError, match="--device cuda asks for a GPU but torch sees none"):
        predict_cli(str(model_dir), ["fine"], None, device="cuda")
    capsys.readouterr()


def test_jeidnn_predict_command(model_dir, tmp_path, capsys):
    from jeidnn.cli.main import main

    assert main(["predict", str(model_dir), "--text", "good", "--text", "bad", "--alpha", "0.05"]) == 0
    assert len(read_lines(capsys.readouterr().out)) == 2
    assert main(["predict", str(model_dir), "--input", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.csv" in err and "\n" not in err


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_training_and_prediction_feed_the_same_pixels_for_any_image_mode(mode):
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from jeidnn.data.datamodule import Collator
    from jeidnn.hf.batches import make_batches

    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).convert(mode)
    trained = Collator("image", processor)([(0, image, 1)])["pixel_values"]
    model = SimpleNamespace(preprocessor=processor, backbone=SimpleNamespace(modality="image"))
    _, batch = next(make_batches(model, [image], batch_size=4))
    assert trained.shape == (1, 3, 8, 8)
    assert torch.equal(batch["pixel_values"], trained)
    reference = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert torch.equal(trained, reference)
