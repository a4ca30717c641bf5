"""`train.py` end to end on configs/smoke.yaml, then `jeidnn evaluate` and `jeidnn predict` on its outputs."""

import copy
import json
import math
from pathlib import Path

import pytest

from jeidnn.cli import evaluate_main, main, train_main

ROOT = Path(__file__).resolve().parent.parent
METHODS = [
    "jeidnn",
    "threshold_maxprob",
    "threshold_entropy",
    "threshold_margin",
    "global_maxprob",
    "patience",
    "static",
    "oracle",
    "jeidnn_ims_threshold_maxprob",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = train_main(
        ["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", str(out), "--no-progress"]
    )
    assert code == 0
    return out / "smoke"


def test_report_has_the_promised_schema(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert {"name", "num_layers", "gflops_full"} <= set(report["backbone"])
    assert report["backbone"]["num_layers"] == 3
    ds = report["dataset"]
    assert ds["labels"] == ["negative", "neutral", "positive"] and ds["num_classes"] == 3
    assert ds["splits"] == {"train": 300, "val": 120, "calib": 120, "test": 120}
    exits = report["exits"]
    assert exits["layers"] == [1, 2, 3]
    assert exits["cost"] == sorted(exits["cost"]) and 1.0 < exits["cost"][-1] < 1.1
    assert len(exits["gflops"]) == len(exits["test_accuracy"]) == 3
    assert all(0 <= a <= 1 for a in exits["test_accuracy"])
    assert set(report["timings_s"]) >= {"stage 0: fine-tune backbone + final head", "stage 1: IM warm-up"}
    assert set(report["methods"]) == set(METHODS)
    jei = report["methods"]["jeidnn"]
    assert jei["kind"] == "learned" and [pt["param"] for pt in jei["points"]] == [0.01, 0.5]
    for pt in jei["points"]:
        assert {"accuracy", "cost", "gflops", "exit_fractions", "ece", "conformal"} <= set(pt)
        assert math.isclose(sum(pt["exit_fractions"]), 1.0, abs_tol=1e-6)
        assert set(pt["conformal"]) == {"0.01", "0.05", "0.1"}
    assert report["methods"]["oracle"]["kind"] == "oracle"
    assert set(report["summary"]) >= {"cost_range", "auc", "matched_cost"}
    assert report["export"]["lambda"] in (0.01, 0.5)


def test_run_folder_contents(smoke_run):
    for name in (
        "config.yaml",
        "report.md",
        "model/jeidnn.json",
        "predictions/warmup.safetensors",
        "predictions/jeidnn_0.safetensors",
        "checkpoints/warmup_heads.safetensors",
    ):
        assert (smoke_run / name).is_file(), name
    assert list(smoke_run.glob("*.png")) or list(smoke_run.glob("plots/*.png"))
    assert not (smoke_run / "FAILED").exists()
    assert list((smoke_run / "logs").iterdir())


def test_evaluate_reproduces_the_report(smoke_run, tmp_path):
    before = json.loads((smoke_run / "report.json").read_text())
    copy_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(smoke_run, copy_dir)
    assert evaluate_main([str(copy_dir)]) == 0
    after = json.loads((copy_dir / "report.json").read_text())
    assert after["methods"] == before["methods"]
    assert after["summary"] == before["summary"]
    assert after["exits"] == before["exits"]


def test_predict_cli_on_the_smoke_model(smoke_run, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    code = main(
        [
            "predict",
            str(smoke_run / "model"),
            "--text",
            "what a great day",
            "--text",
            "meh",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"label", "probability", "exit_layer", "cost", "prediction_set"} <= set(row)
        assert row["label"] in ("negative", "neutral", "positive")
        assert 1 <= row["exit_layer"] <= 3
        assert set(row["prediction_set"]) <= {"negative", "neutral", "positive"}


def test_reusing_the_name_is_refused(smoke_run, capsys):
    code = train_main(
        ["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", str(smoke_run.parent)]
    )
    assert code == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert copy.deepcopy(json.loads((smoke_run / "report.json").read_text()))["methods"]


def test_python_api_on_the_smoke_model(smoke_run):
    from jeidnn import EarlyExitModel

    model = EarlyExitModel.from_pretrained(smoke_run / "model")
    out = model.predict(["what a great day", "meh"])
    assert [p.label in ("negative", "neutral", "positive") for p in out] == [True, True]
    assert all(p.exit_layer in (1, 2, 3) and p.prediction_set is not None for p in out)
    assert out[0].cost == model.costs[model.heads.layers.index(out[0].exit_layer)]
