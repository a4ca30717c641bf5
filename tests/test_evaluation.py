"""evaluate_run on a small synthetic run folder written in the training pipeline's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from jeidnn.errors import JeidnnError
from jeidnn.evaluation import evaluate_run

NUM_EXITS, NUM_CLASSES = 4, 3
SIZES = {"val": 200, "calib": 300, "test": 400}
LAMBDAS = [0.05, 0.5]
POINT_KEYS = {
    "param",
    "accuracy",
    "cost",
    "gflops",
    "exit_fractions",
    "ece",
    "ece_temperature_scaled",
    "conformal",
}
BASELINES = [
    "threshold_maxprob",
    "threshold_entropy",
    "threshold_margin",
    "global_maxprob",
    "patience",
    "static",
]


def _logits(n: int, gen: torch.Generator, sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-exit logits whose accuracy grows with depth: (N, L, C) and labels (N,)."""
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    signal = torch.linspace(0.3, 2.5, NUM_EXITS)[None, :, None]  # (1, L, 1)
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()[:, None, :]  # (N, 1, C)
    # Noise shared across exits keeps predictions stable with depth, as in real networks (patience needs it).
    shared = torch.randn(n, 1, NUM_CLASSES, generator=gen)
    noise = shared + 0.5 * torch.randn(n, NUM_EXITS, NUM_CLASSES, generator=gen)
    return sharpness * (signal * onehot + noise), labels


def make_run(root: Path, lambdas: list[float] | None = LAMBDAS) -> Path:
    run = root / "runs" / "synthetic"
    (run / "predictions").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    cost = [0.3, 0.55, 0.8, 1.02]
    report = {
        "backbone": {"name": "tiny-bert", "num_layers": NUM_EXITS, "gflops_full": 2.0},
        "dataset": {
            "name": "synthetic",
            "num_classes": NUM_CLASSES,
            "labels": ["a", "b", "c"],
            "splits": SIZES,
        },
        "exits": {
            "layers": [1, 2, 3, 4],
            "cost": cost,
            "cost_with_gates": [c + 0.001 * (i + 1) for i, c in enumerate(cost)],
            "gflops": [2.0 * c for c in cost],
            "test_accuracy": [0.5, 0.6, 0.7, 0.8],
        },
        "timings_s": {"warmup": 1.0},
        "jeidnn_lambdas": lambdas or [],
        # val cost of each λ: the second is closest to the default export budget 0.6
        "jeidnn_val_cost": [0.9, 0.55][: len(lambdas or [])],
    }
    (run / "report.json").write_text(json.dumps(report))
    (run / "config.yaml").write_text(
        yaml.safe_dump({"name": "synthetic", "eval": {"threshold_ps": [0.5, 1.0, 2.0]}})
    )
    tensors = {}
    for split, n in SIZES.items():
        tensors[f"{split}_logits"], tensors[f"{split}_labels"] = _logits(n, gen, sharpness=1.5)
    save_file(tensors, str(run / "predictions" / "warmup.safetensors"))
    for i, lam in enumerate(lambdas or []):
        jei = {}
        for split, n in SIZES.items():
            logits, labels = _logits(n, gen, sharpness=1.0)
            conf = logits.softmax(-1).amax(-1)[:, :-1]  # (N, L - 1)
            # Larger λ -> gates open earlier (cheaper); gates read the IM's confidence.
            jei[f"{split}_logits"], jei[f"{split}_labels"] = logits, labels
            jei[f"{split}_gates"] = torch.sigmoid(8 * (conf - 0.75 + 0.2 * lam))
        save_file(jei, str(run / "predictions" / f"jeidnn_{i}.safetensors"))
    return run


def _check_point(point: dict, alphas: list[str]) -> None:
    assert set(point) == POINT_KEYS
    assert 0 <= point["accuracy"] <= 1 and 0.25 <= point["cost"] <= 1.1
    assert point["gflops"] == pytest.approx(2.0 * point["cost"])
    assert len(point["exit_fractions"]) == NUM_EXITS and sum(point["exit_fractions"]) == pytest.approx(1.0)
    assert 0 <= point["ece"] <= 1
    assert set(point["conformal"]) == set(alphas)
    for a in alphas:
        c = point["conformal"][a]
        assert {"coverage", "mean_set_size", "fallback_exits"} <= set(c)
        assert 0 <= c["mean_set_size"] <= NUM_CLASSES and 0 <= c["coverage"] <= 1
        assert all(0 <= e < NUM_EXITS for e in c["fallback_exits"])


def test_evaluate_run_full_schema_and_files(tmp_path):
    run = make_run(tmp_path)
    report = evaluate_run(run)
    alphas = ["0.01", "0.05", "0.1"]

    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk == report
    assert not list(run.glob("*.tmp"))
    # Keys written by training are kept untouched.
    assert on_disk["exits"]["cost"] == [0.3, 0.55, 0.8, 1.02] and on_disk["timings_s"] == {"warmup": 1.0}

    methods = report["methods"]
    assert list(methods) == ["jeidnn", *BASELINES, "oracle", "jeidnn_ims_threshold_maxprob"]
    for name, method in methods.items():
        assert method["kind"] in {"learned", "threshold", "patience", "static", "oracle"}
        assert method["points"], name
        for point in method["points"]:
            _check_point(point, alphas)
    assert methods["oracle"]["upper_bound"] is True
    assert [p["param"] for p in methods["jeidnn"]["points"]] == LAMBDAS
    assert all(p["ece_temperature_scaled"] is None for p in methods["jeidnn"]["points"])
    assert all(p["ece_temperature_scaled"] is not None for p in methods["threshold_maxprob"]["points"])
    assert [p["param"] for p in methods["threshold_maxprob"]["points"]] == [0.5, 1.0, 2.0]
    assert [p["param"] for p in methods["static"]["points"]] == [1, 2, 3, 4]
    assert [p["param"] for p in methods["patience"]["points"]] == [0, 1, 2, 3]
    # thresholds on the IMs of the one λ chosen on val, like the exported model
    assert [p["param"] for p in methods["jeidnn_ims_threshold_maxprob"]["points"]] == [
        {"lambda": 0.5, "p": p} for p in (0.5, 1.0, 2.0)
    ]

    # Static depth at the last exit is the full model: cost of that exit, accuracy of the final head.
    last = methods["static"]["points"][-1]
    assert last["cost"] == pytest.approx(1.02) and last["exit_fractions"][-1] == 1.0
    # JEI-DNN costs use cost_with_gates: a sample leaving at exit 0 costs 0.301, not 0.3.
    jp = methods["jeidnn"]["points"][0]
    expected = sum(
        f * c for f, c in zip(jp["exit_fractions"], on_disk["exits"]["cost_with_gates"], strict=True)
    )
    assert jp["cost"] == pytest.approx(expected)
    # The oracle is at least as accurate as the full model.
    assert methods["oracle"]["points"][0]["accuracy"] >= last["accuracy"]

    summary = report["summary"]
    lo, hi = summary["cost_range"]
    assert lo <= hi
    assert set(summary["auc"]) == set(methods) - {"oracle"}
    assert all(0 <= v <= 1 for v in summary["auc"].values())
    assert len(summary["matched_cost"]) == len(LAMBDAS)
    row = summary["matched_cost"][0]
    assert set(row["jeidnn"]) == {"accuracy", "ece", "set_size_0.05"}
    for name in BASELINES + ["jeidnn_ims_threshold_maxprob"]:
        assert {"accuracy", "ece", "ece_temperature_scaled", "set_size_0.05"} <= set(row[name])
    assert "oracle" not in row
    assert report["evaluation"]["alphas"] == [0.01, 0.05, 0.1] and report["evaluation"]["ece_bins"] == 15

    md = (run / "report.md").read_text()
    for heading in ("## Headline", "## Exits", "## Matched cost", "## AUC", "## Conformal prediction sets"):
        assert heading in md
    for png in ("accuracy_vs_cost", "ece_vs_cost", "conformal_vs_cost", "reliability", "exit_fractions"):
        assert (run / "plots" / f"{png}.png").stat().st_size > 10_000
        assert f"](plots/{png}.png)" in md


def test_evaluate_run_without_jeidnn_and_overrides(tmp_path):
    run = make_run(tmp_path, lambdas=None)
    report = evaluate_run(run, alphas=[0.1], ece_bins=10, write=False)
    assert "jeidnn" not in report["methods"] and "jeidnn_ims_threshold_maxprob" not in report["methods"]
    assert report["summary"]["matched_cost"] == []
    assert set(report["methods"]["static"]["points"][0]["conformal"]) == {"0.1"}
    assert report["evaluation"]["ece_bins"] == 10
    assert not (run / "report.md").exists()
    assert "methods" not in json.loads((run / "report.json").read_text())  # write=False leaves files alone


def test_evaluate_run_errors(tmp_path):
    with pytest.raises(JeidnnError, match="does not exist"):
        evaluate_run(tmp_path / "nope")
    with pytest.raises(JeidnnError, match="report.json"):
        evaluate_run(tmp_path)
    run = make_run(tmp_path)
    (run / "predictions" / "jeidnn_1.safetensors").unlink()
    with pytest.raises(JeidnnError, match="jeidnn_1.safetensors"):
        evaluate_run(run, write=False)
    (run / "predictions" / "warmup.safetensors").unlink()
    with pytest.raises(JeidnnError, match="warmup.safetensors"):
        evaluate_run(run, write=False)
    with pytest.raises(JeidnnError, match="eval.ece_bins"):
        evaluate_run(run, ece_bins=0)
