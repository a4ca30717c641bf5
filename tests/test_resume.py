"""`kill -9` in the middle of `python train.py`, then `--resume true`: the run continues from its last
finished stage and ends with the report.json of an uninterrupted run (timings aside), bit for bit.

A run killed in stage 0 (after its first validation checkpoint, mid-epoch) is resumed, killed again when
stage 0 has stopped and in stage 2 (after the first round of the automatic λ choice), and resumed to the
end. JEIDNN_PAUSE_AT makes the run wait at a named point, so the kill lands where the test wants it. A
failure in stage 3 keeps every artifact and a resume finishes the run. Every run uses one intra-op thread
(conftest.py; OMP_NUM_THREADS in the subprocesses): sums split over another number of threads round
differently.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import kill_at

from jeidnn.cli.main import train_main

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ("timings_s", "stage2_time_vs_train_pass")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The smoke config with the automatic λ choice (two rounds in stage 2), and a third epoch that stage 0
    does not reach: patience ends it."""
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config["jeidnn"].update(lambdas=None, lambda_grid=[0.01, 0.5], lambda_rounds=1)
    config["finetune"]["epochs"] = 3
    path = tmp_path_factory.mktemp("config") / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def args(config: Path, out: Path, *more: str) -> list[str]:
    return ["--config", str(config), "--output_dir", str(out), "--no-progress", *more]


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train_main(args(config, out)) == 0
    return json.loads((out / "smoke" / "report.json").read_text())


def test_killed_in_stage0_twice_and_in_stage2_then_resumed(config, uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "smoke"
    train = [sys.executable, str(ROOT / "train.py"), *args(config, tmp_path)]
    kill_at("stage0:step7", train, tmp_path / "first.log")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"] == [] and (run_dir / "checkpoints" / "finetune" / "resume.ckpt").is_file()

    # Without --resume the folder is refused, as before; with another config too (one line, the key named).
    assert train_main(args(config, tmp_path)) == 2
    assert "pass --resume true to continue it" in capsys.readouterr().err
    assert train_main(args(config, tmp_path, "--resume", "true", "--finetune.lr", "0.5")) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "finetune.lr is 0.5 here but 0.001" in error

    # Killed once stage 0 stopped on patience, before that is recorded: resumed, it must not train on.
    kill_at("stage0:trained", [*train, "--resume", "true"], tmp_path / "second.log")
    assert "stage 0 continues from" in (tmp_path / "second.log").read_text()
    assert json.loads((run_dir / "state.json").read_text())["done"] == []

    kill_at("stage2:round1-train", [*train, "--resume", "true"], tmp_path / "third.log")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"][:1] == ["stage0"] and "stage2" not in state["done"]
    assert (run_dir / "checkpoints" / "stage2" / "round1-train.safetensors").is_file()

    # eval settings may change on resume: they do not touch what the finished stages computed.
    assert train_main(args(config, tmp_path, "--resume", "true")) == 0
    resumed = json.loads((run_dir / "report.json").read_text())
    assert "finetune.patience" in uninterrupted["finetune"]["stopped"]
    assert without_timings(resumed) == without_timings(uninterrupted)
    assert len(resumed["learned"]["jeidnn_paper"]["models"]) > 2  # the second λ round ran after the kill
    assert not (run_dir / "cache").exists() and not (run_dir / "FAILED").exists()

    # A finished run is not resumed: evaluation is `jeidnn evaluate`'s.
    assert train_main(args(config, tmp_path, "--resume", "true")) == 2
    assert "holds a finished run" in capsys.readouterr().err


def test_a_failure_in_stage3_keeps_the_artifacts_and_resume_finishes(
    config, uninterrupted, tmp_path, monkeypatch
):
    import jeidnn.pipeline.run

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(jeidnn.pipeline.run, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train_main(args(config, tmp_path))
    run_dir = tmp_path / "smoke"
    assert (run_dir / "FAILED").read_text().startswith("stages 3-4 failed: RuntimeError: evaluation broke")
    assert not (run_dir / "report.json").exists()
    partial = json.loads((run_dir / "report.partial.json").read_text())
    assert partial["exits"] == uninterrupted["exits"] and partial["learned"] == uninterrupted["learned"]
    for name in (
        "predictions/warmup.safetensors",
        "checkpoints/warmup_heads.safetensors",
        "backbone/model.safetensors",
    ):
        assert (run_dir / name).is_file(), name

    monkeypatch.undo()
    assert train_main(args(config, tmp_path, "--resume", "true")) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert without_timings(report) == without_timings(uninterrupted)
    assert not (run_dir / "FAILED").exists() and not (run_dir / "report.partial.json").exists()
