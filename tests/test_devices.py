"""Where a run computes: `accelerator: cuda:N` in every Trainer and in cost counting, refusals before any run
folder, and no float64 on a device that lacks it (MPS). This machine has no GPU: torch.cuda is patched and
the Trainers' arguments are recorded, then the Trainers run on the CPU."""

import json

import pytest
import pytorch_lightning as pl
import torch
from tiny_models import tiny_run_overrides, write_sentiment_csv

from jeidnn.cli.main import train_main
from jeidnn.config.gating import JeidnnConfig
from jeidnn.errors import JeidnnError
from jeidnn.model.heads import ExitHeads
from jeidnn.pipeline import run as pipeline_run
from jeidnn.train import learned
from jeidnn.train.devices import run_device, trainer_device
from jeidnn.train.stage2 import VariantBlock
from jeidnn.train.stage2_fit import native_point

RealTrainer = pl.Trainer


def two_gpus(monkeypatch, bf16: bool = True) -> None:
    """torch sees two CUDA GPUs (supporting bfloat16 when `bf16`)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_run_device_takes_an_existing_cuda_index(monkeypatch):
    two_gpus(monkeypatch)
    assert run_device("cuda:1") == torch.device("cuda", 1)
    assert run_device("gpu") == run_device("cuda") == torch.device("cuda")
    with pytest.raises(JeidnnError, match=r"accelerator cuda:2: torch sees 2 GPU\(s\); pick another"):
        run_device("cuda:2")


def test_trainer_device_names_the_gpu_by_index(monkeypatch):
    two_gpus(monkeypatch)
    assert trainer_device("cuda:1") == {"accelerator": "gpu", "devices": [1]}
    assert trainer_device("cuda:0") == {"accelerator": "gpu", "devices": [0]}
    assert trainer_device("gpu", 2) == {"accelerator": "gpu", "devices": 2}
    assert trainer_device("cpu", 3) == {"accelerator": "cpu", "devices": 3}
    with pytest.raises(JeidnnError, match="accelerator cuda:1 names one GPU but devices is 2"):
        trainer_device("cuda:1", 2)


def run_args(tmp_path, *extra):
    csv = write_sentiment_csv(tmp_path / "data.csv", n=200)
    return [
        "--config",
        "configs/smoke.yaml",
        *tiny_run_overrides(csv, tmp_path / "runs", "gpu1"),
        "--data.max_train_samples",
        "64",
        "--data.max_eval_samples",
        "48",
        "--finetune.epochs",
        "1",
        "--warmup.max_epochs",
        "1",
        "--jeidnn.lambdas",
        "[0.5]",
        "--jeidnn.epochs",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--accelerator", "cuda:2"], "error: accelerator cuda:2: torch sees 2 GPU(s); pick another"),
        (
            ["--accelerator", "cuda:1", "--devices", "2"],
            "error: accelerator cuda:1 names one GPU but devices",
        ),
        (["--accelerator", "gpu", "--precision", "bf16-mixed"], "error: precision bf16-mixed: GPU"),
    ],
)
def test_a_device_the_machine_lacks_is_refused_before_the_run_folder(
    tmp_path, monkeypatch, capsys, extra, message
):
    two_gpus(monkeypatch, bf16=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert train_main(run_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(message)
    assert not (tmp_path / "runs").exists()


def test_cuda_1_reaches_every_trainer_and_the_cost_counting(tmp_path, monkeypatch):
    """A whole run with `accelerator: cuda:1`: every Trainer (stage 0, feature cache, stage 1, stage 2) is
    asked for GPU 1, stage 0 for bf16-mixed (`precision: auto` on a bfloat16 GPU), cost counting for
    cuda:1. The Trainers then run on the CPU."""
    two_gpus(monkeypatch)
    asked: list[dict] = []

    class Recording(RealTrainer):
        def __init__(self, **kwargs):
            asked.append(kwargs)
            super().__init__(**{**kwargs, "accelerator": "cpu", "devices": 1, "precision": "32-true"})

    monkeypatch.setattr(pl, "Trainer", Recording)
    counted_on = []
    count = pipeline_run.count_exit_costs

    def count_on_cpu(backbone, heads, dm, device):
        counted_on.append(device)
        return count(backbone, heads, dm, torch.device("cpu"))

    monkeypatch.setattr(pipeline_run, "count_exit_costs", count_on_cpu)
    stage2_on = []
    fit = learned.fit_stage2

    def fit_on_cpu(*args, device, **kwargs):  # stage 2 trains on cached features without a Trainer
        stage2_on.append(device)
        return fit(*args, device=torch.device("cpu"), **kwargs)

    monkeypatch.setattr(learned, "fit_stage2", fit_on_cpu)
    assert train_main(run_args(tmp_path, "--accelerator", "cuda:1")) == 0

    assert len(asked) >= 3  # stage 0, feature cache, stage 1
    assert stage2_on == [torch.device("cuda", 1)]
    assert all(kw["accelerator"] == "gpu" and kw["devices"] == [1] for kw in asked), asked
    assert [kw.get("precision") for kw in asked if kw.get("max_steps")] == ["bf16-mixed"]  # stage 0 only
    assert sum("precision" in kw for kw in asked) == 1
    assert counted_on == [torch.device("cuda", 1)]
    report = json.loads((tmp_path / "runs" / "gpu1" / "report.json").read_text())
    assert report["backbone"]["precision"] == "bf16-mixed"
    assert report["backbone"]["dtype"] == "float32"


def stage2_block(costs):
    heads = ExitHeads([1, 2, 3], 8, 3, "tanh", im_head="linear")
    variant = JeidnnConfig().variants[0]
    return VariantBlock(variant, heads, 8, costs, [0.1, 0.5], torch.Generator().manual_seed(0))


def test_stage2_keeps_its_float64_costs_on_the_cpu():
    """MPS has no float64: nothing a block moves to its device is float64, and its costs stay exact."""
    costs = torch.tensor([0.1 / 3, 0.4 / 3, 1.0 + 1e-12], dtype=torch.float64)
    block = stage2_block(costs).to("meta")  # as Lightning moves it to its device ("meta": no compute)
    assert all(t.dtype != torch.float64 for t in [*block.parameters(), *block.buffers()])
    assert block.costs.device.type == "cpu" and block.costs.dtype == torch.float64
    assert torch.equal(block.costs, costs)


def test_native_point_sums_the_costs_in_float64():
    costs = torch.tensor([0.1 / 3, 0.4 / 3, 1.0 + 1e-12], dtype=torch.float64)
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.1, 0.2], [0.1, 0.3]])  # exits 0, 1, 2, 2
    logits = torch.zeros(4, 3, 2)
    logits[:, :, 1] = 1.0  # every exit predicts class 1
    accuracy, cost = native_point(logits, scores, torch.tensor([1, 1, 0, 1]), costs)
    assert accuracy == 0.75
    expected = (costs[0] + costs[1] + 2 * costs[2]).item() / 4
    assert cost == pytest.approx(expected, abs=1e-15)  # float32 costs would be off by ~1e-8
