"""`devices: 2` on CPUs: stage 0 and the feature cache run in two processes (Lightning DDP, gloo) and give
the run of one process: the same per-exit test accuracies and the same learned models.

Both runs are `python train.py` subprocesses: Lightning's `ddp` strategy starts the second process by
running the same command again. The smoke model has no dropout here: each process draws its own masks,
so with dropout two processes could not retrace the steps of one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed
import yaml

ROOT = Path(__file__).resolve().parent.parent


def train(config: Path, out: Path, devices: int) -> dict:
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--output_dir", str(out)]
    command += ["--devices", str(devices), "--accelerator", "cpu"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "smoke" / "report.json").read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_give_the_run_of_one(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config["model"]["random_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))

    one = train(path, tmp_path / "one", devices=1)
    two = train(path, tmp_path / "two", devices=2)

    assert (one["finetune"]["processes"], two["finetune"]["processes"]) == (1, 2)
    # Same global batches, in the same order: same steps, same validations (to float rounding).
    assert [v["step"] for v in two["finetune"]["validations"]] == [
        v["step"] for v in one["finetune"]["validations"]
    ]
    n_val = one["dataset"]["splits"]["val"]
    for a, b in zip(one["finetune"]["validations"], two["finetune"]["validations"]):
        assert abs(a["val_accuracy"] - b["val_accuracy"]) * n_val < 0.5
    # The feature cache gathered from both processes in the split's order: the same per-exit accuracies.
    n_test = one["dataset"]["splits"]["test"]
    for a, b in zip(one["exits"]["test_accuracy"], two["exits"]["test_accuracy"]):
        assert abs(a - b) * n_test <= 1 + 1e-9
    # Stage 2 then trains the same JEI-DNN models: the same entries and the same points on test.
    assert two["learned"] == one["learned"]

    def points(report: dict, name: str) -> list:
        return [
            (p["param"], p["accuracy"], p["cost"], p["exit_fractions"])
            for p in report["methods"][name]["points"]
        ]

    for name in one["learned"]:
        assert points(two, name) == points(one, name)
    # Only the first process writes the run folder; the second leaves no trace of its own.
    assert not (tmp_path / "two" / "smoke" / "FAILED").exists()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["smoke"]
