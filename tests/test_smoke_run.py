"""`train.py` end to end on configs/smoke.yaml, then `jeidnn evaluate` and `jeidnn predict` on its outputs."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import check_exported_exits_on_test

from jeidnn.cli.main import evaluate_main, main, train_main
from jeidnn.config.parser import load_config
from jeidnn.evaluate.evaluation import evaluate
from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.pipeline import run as pipeline_run

ROOT = Path(__file__).resolve().parent.parent
CFG = load_config(ROOT / "configs" / "smoke.yaml")
# Each configured learned variant; a `native` one also as `<name>_tau` (its threshold chosen on calib).
LEARNED = [
    name
    for v in CFG.jeidnn.variants
    for name in ([v.name, f"{v.name}_tau"] if v.operating_point == "native" else [v.name])
]
BASELINES = [
    "threshold_maxprob",
    "threshold_entropy",
    "threshold_margin",
    "global_maxprob",
    "threshold_search",
    "product_maxprob",
    "patience",
    "patience_confidence",
    "static",
    "oracle",
    "jeidnn_ims_threshold_maxprob",
]
METHODS = [*LEARNED, *BASELINES]
LAMBDAS = CFG.jeidnn.lambdas
BUDGETS = CFG.eval.budgets


HANDED_TO_EVALUATION: list[RunPredictions] = []
"""The predictions the smoke run's training handed its evaluation, in memory."""


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")

    def spy(*args, **kwargs):
        HANDED_TO_EVALUATION.append(kwargs["predictions"])
        return evaluate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_run, "evaluate", spy)
        code = train_main(
            ["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", str(out), "--no-progress"]
        )
    assert code == 0
    return out / "smoke"


@pytest.fixture(scope="module")
def report(smoke_run):
    return json.loads((smoke_run / "report.json").read_text())


def test_report_has_the_promised_schema(report):
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
    assert report["methods"]["oracle"]["kind"] == "oracle"
    assert set(report["summary"]) >= {"budgeted", "cost_range", "auc", "matched_cost"}
    # The default regime: stage 0 alone updates the backbone.
    steps = report["finetune"]["steps"]
    assert report["regime"]["name"] == "disjoint"
    assert report["regime"]["backbone_updates"] == {"stage0": steps, "total": steps}


def test_stage0_validates_and_keeps_the_best(report, smoke_run):
    """Stage 0 validates every finetune.val_check_interval steps, stops on patience or a budget, and the
    weights in backbone/ are the best validation's: the cached test features come from them."""
    ft = report["finetune"]
    cfg = CFG.finetune
    steps = [v["step"] for v in ft["validations"]]
    assert steps == list(range(cfg.val_check_interval, ft["steps"] + 1, cfg.val_check_interval))
    accuracies = [v["val_accuracy"] for v in ft["validations"]]
    assert ft["best_val_accuracy"] == max(accuracies)
    assert ft["best_step"] == steps[accuracies.index(max(accuracies))]  # the first of equal ones
    assert ft["steps"] <= cfg.epochs * 10 and ft["epochs"] == ft["steps"] / 10  # 300 samples, batch 32
    after_best = len(steps) - 1 - accuracies.index(max(accuracies))
    if after_best >= cfg.patience:
        assert "finetune.patience" in ft["stopped"]
    else:
        assert ft["steps"] == cfg.epochs * 10 and "epochs" in ft["stopped"]


def test_learned_methods(report, smoke_run):
    assert "jeidnn_paper" in LEARNED and "jeidnn_paper_tau" in LEARNED and len(LEARNED) > 2
    assert list(report["learned"]) == LEARNED
    for name in LEARNED:
        entry = report["learned"][name]
        assert entry["extension"] == (name != "jeidnn_paper")
        assert len(entry["costs"]) == 3 and entry["costs"] == sorted(entry["costs"])
        assert [m["lambda"] for m in entry["models"]] == LAMBDAS
        assert all((smoke_run / m["file"]).is_file() for m in entry["models"])
        method = report["methods"][name]
        assert method["kind"] == "learned"
        assert sorted({pt["param"]["lambda"] for pt in method["points"]}) == LAMBDAS
        for pt in method["points"]:
            assert set(pt["param"]) == {"model", "lambda", "tau"}
            assert {"accuracy", "cost", "gflops", "exit_fractions", "ece", "conformal"} <= set(pt)
            assert math.isclose(sum(pt["exit_fractions"]), 1.0, abs_tol=1e-6)
            assert set(pt["conformal"]) == {"0.01", "0.05", "0.1"}
    # The paper's method plays its native rule; its `_tau` twin shares the models.
    assert {pt["param"]["tau"] for pt in report["methods"]["jeidnn_paper"]["points"]} == {0.5}
    assert report["learned"]["jeidnn_paper_tau"]["models"] == report["learned"]["jeidnn_paper"]["models"]
    assert report["learned"]["jeidnn_paper_tau"]["operating_point"] == "calib_threshold"


def test_budgeted_summary(report):
    budgeted = report["summary"]["budgeted"]
    assert budgeted["budgets"] == BUDGETS
    rows = budgeted["rows"]
    played = [m for m in METHODS if m != "oracle"]
    assert sorted((r["budget"], r["method"]) for r in rows) == sorted((b, m) for b in BUDGETS for m in played)
    chosen = [r for r in rows if r["accuracy"] is not None]
    assert chosen, "no method met any budget"
    for row in rows:
        if row["accuracy"] is None:
            assert row["reason"]  # why this method has no configuration within the budget
            continue
        assert row["calib_cost"] <= row["budget"] + 1e-9  # chosen on calib half A within the budget
        assert 0 <= row["accuracy"] <= 1 and row["cost"] > 0
        assert math.isclose(sum(row["exit_fractions"]), 1.0, abs_tol=1e-6)
        if row["kind"] == "learned":
            assert set(row["param"]) == {"model", "lambda", "tau"}


def test_export(report, smoke_run):
    export = report["export"]
    # export.selection budget: of every exportable method's calib-A choice, the most accurate on val.
    assert export["selection"] == "budget" and export["method"] in METHODS and export["method"] != "oracle"
    best = max((r for r in export["considered"] if "skipped" not in r), key=lambda r: r["val_accuracy"])
    assert export["val_accuracy"] == best["val_accuracy"]
    assert export["calib_cost"] <= CFG.export.cost_budget
    assert len(export["test_exit_fractions"]) == 3
    assert math.isclose(sum(export["test_exit_fractions"]), 1.0, abs_tol=1e-6)
    saved = json.loads((smoke_run / "model" / "config.json").read_text())
    assert saved["model_type"] == "jeidnn"
    assert (smoke_run / "model" / "README.md").read_text().startswith("---\nlibrary_name: jeidnn\n")
    gates = saved["gates"]
    if export["method"] in LEARNED:
        assert export["lambda"] in LAMBDAS and 0 < export["exit_threshold"] <= 1
        assert gates["kind"] == "learned" and gates["exit_threshold"] == export["exit_threshold"]
        settings = report["learned"][export["method"]]["settings"]
        assert gates["settings"] == {k: settings[k] for k in gates["settings"]}
        assert saved["costs"] == report["learned"][export["method"]]["costs"]
    else:
        assert gates["kind"] == export["kind"] and saved["costs"] == report["exits"]["cost"]


def test_exported_model_takes_the_reported_exits_on_test(smoke_run):
    """The saved model, fed the test texts, leaves where the report says its operating point leaves."""
    check_exported_exits_on_test(smoke_run)


def test_run_folder_contents(smoke_run):
    for name in (
        "config.yaml",
        "state.json",
        "report.md",
        "model/config.json",
        "model/model.safetensors",
        "backbone/config.json",
        "backbone/model.safetensors",
        "backbone/tokenizer_config.json",
        "checkpoints/final_head.safetensors",
        "predictions/warmup.safetensors",
        "predictions/learned/jeidnn_paper/0.safetensors",
        f"predictions/learned/{CFG.jeidnn.variants[-1].name}/1.safetensors",
        "checkpoints/warmup_heads.safetensors",
        "checkpoints/learned/jeidnn_paper/1.safetensors",
    ):
        assert (smoke_run / name).is_file(), name
    assert list(smoke_run.glob("*.png")) or list(smoke_run.glob("plots/*.png"))
    assert not (smoke_run / "FAILED").exists()
    # What only a resume needs is gone once the run is complete.
    for leftover in ("cache", "checkpoints/finetune", "checkpoints/stage2", "report.partial.json"):
        assert not (smoke_run / leftover).exists(), leftover
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


def test_the_evaluation_of_the_trained_predictions_equals_that_of_the_files(smoke_run, report):
    """Training hands its evaluation the predictions in memory; `jeidnn evaluate` reads the files it wrote:
    the same tensors, and the same report, bit for bit."""
    (in_memory,) = HANDED_TO_EVALUATION
    on_disk = RunPredictions.read(report, smoke_run)
    assert set(in_memory.warmup) == set(on_disk.warmup) and set(in_memory.learned) == set(on_disk.learned)
    assert all(torch.equal(in_memory.warmup[k], on_disk.warmup[k]) for k in on_disk.warmup)
    assert set(on_disk.learned) == set(LEARNED)  # each variant, and a native one's `_tau` method
    for name, models in on_disk.learned.items():
        assert len(models) == len(in_memory.learned[name]) == len(LAMBDAS)
        for got, want in zip(in_memory.learned[name], models, strict=True):
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    cfg = load_config(smoke_run / "config.yaml")
    reports = [
        evaluate(report, smoke_run, cfg.eval, cfg.seed, predictions=p, write_markdown=False).report
        for p in (in_memory, on_disk)
    ]
    assert reports[0] == reports[1]
    for key in ("methods", "summary", "evaluation"):
        assert reports[0][key] == report[key]


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


def run_speed_benchmark(args: list[str]) -> dict:
    """benchmarks/speed.py (not a package module) on a few inputs; returns its speed.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    out = Path(args[args.index("--out") + 1])
    assert speed.main([*args, "--batch-sizes", "1", "7", "--repeats", "1", "--threads", "1"]) == 0
    return json.loads(out.read_text())


def test_speed_benchmark_at_another_operating_point(report, smoke_run, tmp_path):
    """--method/--budget rebuilds the evaluation's choice from the stage-2 checkpoints: on the test split
    the layer-skipping path leaves where report.json says that operating point leaves."""
    row = next(r for r in report["summary"]["budgeted"]["rows"] if r["kind"] == "learned" and r["accuracy"])
    out = tmp_path / "speed.json"
    point = ["--method", row["method"], "--budget", str(row["budget"])]
    result = run_speed_benchmark(["--run", str(smoke_run), *point, "--out", str(out)])
    assert result["operating_point"]["method"] == row["method"]
    assert result["operating_point"]["exit_threshold"] == row["param"]["tau"]
    (timed,) = result["input_sets"]
    assert "test split" in timed["inputs"]
    for speed_row in timed["rows"]:
        assert sum(speed_row["exit_counts"]) == 120  # the whole test split
        assert speed_row["exit_fractions"] == pytest.approx(row["exit_fractions"], abs=1.5 / 120)
        assert speed_row["ratio"] > 0


def test_speed_benchmark_exit_threshold_and_other_inputs(smoke_run, tmp_path):
    texts = tmp_path / "reviews.csv"
    texts.write_text("id,review\n1,what a great day\n2,meh\n3,awful awful service\n")
    out = tmp_path / "speed.json"
    common = ["--inputs", str(texts), "--column", "review", "--out", str(out)]
    result = run_speed_benchmark([str(smoke_run / "model"), "--exit-threshold", "inf", *common])
    test_split, reviews = result["input_sets"]
    assert "test split" in test_split["inputs"] and "review" in reviews["inputs"]
    assert all(row["exit_counts"] == [0, 0, 3] for row in reviews["rows"])  # nobody reaches tau = inf
    model = str(smoke_run / "model")
    result = run_speed_benchmark([model, "--exit-threshold", "0", "--no-test-split", *common])
    assert [s["rows"][0]["exit_counts"] for s in result["input_sets"]] == [[3, 0, 0]]  # every score >= 0


def test_exit_costs_are_counted_on_the_train_split(smoke_run, report):
    """Stage 2's λ·c, the gate targets and the calib budgets read these costs: counted on the split the
    models train on (300 samples here), not on test. FLOPs depend on shapes only, so the run's own model and
    data loaded again count the same costs on train, and other ones on test."""
    from jeidnn.config.parser import load_config
    from jeidnn.train.costs import count_exit_costs
    from jeidnn.train.inputs import load_inputs

    counted = report["exits"]["cost_counted_on"]
    assert "train split" in counted and f"({report['dataset']['splits']['train']} samples" in counted
    inputs = load_inputs(load_config(smoke_run / "config.yaml"))
    on = {
        split: count_exit_costs(inputs.backbone, inputs.heads, inputs.dm, torch.device("cpu"), split).cost
        for split in ("train", "test")
    }
    assert report["exits"]["cost"] == pytest.approx(on["train"], rel=1e-12)
    assert report["exits"]["cost"] != pytest.approx(on["test"], rel=1e-9)


def test_an_over_long_max_length_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    """smoke.yaml's backbone has 64 token positions: max_length 65 is refused in one line, no folder made."""
    code = train_main(
        ["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", str(tmp_path / "runs"),
         "--model.max_length", "65", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert any("model.max_length 65 exceeds the backbone's 64 token positions" in line for line in err)
    assert not (tmp_path / "runs").exists()
