"""RunPredictions: read from a run folder, or built from the training results, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_evaluation import NUM_EXITS, make_run

from jeidnn.config.schema import EvalConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.evaluation import evaluate
from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.train.results import Stage2Result, WarmupResult


def _report(run):
    return json.loads((run / "report.json").read_text())


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_read_holds_each_file_in_the_reports_model_order(tmp_path):
    run = make_run(tmp_path)
    report = _report(run)
    predictions = RunPredictions.read(report, run)
    assert _same(predictions.warmup, load_file(str(run / "predictions" / "warmup.safetensors")))
    assert list(predictions.learned) == list(report["learned"])
    for name, entry in report["learned"].items():
        files = [load_file(str(run / m["file"])) for m in entry["models"]]
        assert len(predictions.learned[name]) == len(files) == 2
        assert all(_same(got, want) for got, want in zip(predictions.learned[name], files, strict=True))
    without = RunPredictions.read({"exits": report["exits"]}, run)
    assert without.learned == {}


def test_the_evaluation_reads_the_predictions_it_is_given_not_the_files(tmp_path):
    """Same tensors in memory or on disk: the same report; the files are not read once in memory."""
    run = make_run(tmp_path)
    report = _report(run)
    cfg = EvalConfig(threshold_ps=[1.0], bootstrap=50, resplits=2)
    on_disk = RunPredictions.read(report, run)
    in_memory = RunPredictions(
        {k: v.clone() for k, v in on_disk.warmup.items()},
        {name: [dict(t) for t in models] for name, models in on_disk.learned.items()},
    )
    from_disk = evaluate(report, run, cfg, 3, predictions=on_disk, write_markdown=False).report
    for path in (run / "predictions").rglob("*.safetensors"):
        path.unlink()
    from_memory = evaluate(report, run, cfg, 3, predictions=in_memory, write_markdown=False).report
    assert from_memory == from_disk


def test_from_training_takes_stage_1_and_stage_2s_predictions():
    """Each learned method of the report reads its variant's models; `<name>_tau` shares its variant's."""
    logits = {s: torch.randn(5, NUM_EXITS, 3) for s in ("val", "calib", "test")}
    labels = {s: torch.arange(5) % 3 for s in logits}
    warm = WarmupResult(None, logits, labels)
    models = {
        v: [{f"{s}_{k}": torch.full((1,), i) for s in logits for k in ("logits", "labels", "scores")}]
        for i, v in enumerate(("v", "w"))
    }
    stage2 = Stage2Result({"v": [1.0], "w": [1.0]}, {"v": [], "w": []}, models)
    report = {"learned": {m: {"settings": {"name": m[0]}} for m in ("v", "v_tau", "w")}}
    predictions = RunPredictions.from_training(warm, stage2, report)
    assert _same(predictions.warmup, warm.tensors())
    assert torch.equal(predictions.warmup["calib_logits"], logits["calib"])
    assert list(predictions.learned) == ["v", "v_tau", "w"]
    assert predictions.learned["v"] == predictions.learned["v_tau"] == models["v"]
    assert predictions.learned["w"] == models["w"]
    assert RunPredictions.from_training(warm, None, {}).learned == {}


def _rewrite(path, **changes):
    tensors = load_file(str(path))
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(path))


def test_read_errors_name_the_file_and_what_is_wrong(tmp_path):
    run = make_run(tmp_path)
    report = _report(run)
    learned = run / "predictions" / "learned" / "jeidnn_paper" / "1.safetensors"
    warmup = run / "predictions" / "warmup.safetensors"
    cases = [
        (learned, {"test_scores": None}, r"1.safetensors lacks tensors \['test_scores'\]"),
        (
            learned,
            {"calib_scores": torch.zeros(300, NUM_EXITS)},
            r"`calib_scores` has shape \(300, 4\), expected \(300, 3\)",
        ),
        (
            warmup,
            {"test_logits": torch.zeros(400, 3, 3)},
            r"warmup.safetensors: `test_logits` has shape \(400, 3, 3\)",
        ),
        (
            warmup,
            {"calib_labels": torch.zeros(299)},
            r"`calib_labels` \(299,\), expected \(N, 4, C\) and \(N,\)",
        ),
    ]
    for path, changes, message in cases:
        original = path.read_bytes()
        _rewrite(path, **changes)
        with pytest.raises(JeidnnError, match=message) as err:
            RunPredictions.read(report, run)
        assert "\n" not in str(err.value)
        path.write_bytes(original)
    learned.unlink()
    with pytest.raises(JeidnnError, match=f"missing predictions file {learned}; re-run training"):
        RunPredictions.read(report, run)
    with pytest.raises(JeidnnError, match="report lacks exits.cost"):
        RunPredictions.read({"learned": {}}, run)
    report["learned"]["jeidnn_paper"]["operating_point"] = "other"
    with pytest.raises(JeidnnError, match="operating_point must be 'native' or 'calib_threshold'"):
        RunPredictions.read(report, run)


def test_predictions_that_do_not_fit_the_report_are_refused(tmp_path):
    run = make_run(tmp_path)
    report = _report(run)
    predictions = RunPredictions.read(report, run)
    one_model = RunPredictions(
        predictions.warmup, {**predictions.learned, "jeidnn_paper": predictions.learned["jeidnn_paper"][:1]}
    )
    with pytest.raises(
        JeidnnError, match="'jeidnn_paper' has 2 models in the report but 1 in its predictions"
    ):
        one_model.learned_sources(report, "jeidnn_paper")
    with pytest.raises(JeidnnError, match="report.json has no learned method 'nope'"):
        predictions.learned_sources(report, "nope")
    other_labels = dict(
        predictions.learned["jeidnn_paper"][1], calib_labels=predictions.warmup["calib_labels"].roll(1)
    )
    changed = RunPredictions(
        predictions.warmup,
        {**predictions.learned, "jeidnn_paper": [predictions.learned["jeidnn_paper"][0], other_labels]},
    )
    with pytest.raises(JeidnnError, match="'jeidnn_paper' model 1: calib labels differ from the warm-up"):
        evaluate(report, run, EvalConfig(threshold_ps=[1.0]), 3, predictions=changed, write_markdown=False)
