"""Training regimes (disjoint / joint / mixed) and end-to-end stage 2 (`jeidnn.train_backbone`) on the smoke
config: what each trains, what report.json says about it, the exported model of an end-to-end run, resume
of a run killed in the joint phase, and the one-line refusals."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import kill_at

import jeidnn.pipeline.run
from jeidnn.cli.main import train_main
from jeidnn.config.schema import FinetuneConfig, ModelConfig
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHeads
from jeidnn.train.devices import GlobalBatches
from jeidnn.train.modules import JointModule

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")
E2E = [
    "--jeidnn.train_backbone",
    "true",
    "--jeidnn.lambdas",
    "[0.01]",
    "--jeidnn.variants",
    "[{name: jeidnn_paper}]",
    "--export.selection",  # the export of the model trained end to end, which carries its own backbone
    "method",
    "--export.method",
    "jeidnn_paper",
]


def args(out: Path, *more: str) -> list[str]:
    return ["--config", SMOKE, "--output_dir", str(out), "--no-progress", *more]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One folder for the runs below, named as benchmarks/regimes.py names them."""
    return tmp_path_factory.mktemp("runs")


def test_joint_module_trains_backbone_and_every_exit_on_the_weighted_sum_of_exit_ces():
    torch.manual_seed(0)
    random = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2}
    backbone = Backbone.load(ModelConfig(random_config={**random, "intermediate_size": 24, "vocab_size": 50}))
    heads = ExitHeads([1, 2, 3], 16, 3, "tanh", im_head="linear")
    weights = torch.tensor([0.5, 0.0, 2.0])
    module = JointModule(backbone, heads, [1, 2, 3], FinetuneConfig(), 10, GlobalBatches(4, 4, 0), weights)
    ids = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0], [2, 4, 4, 3], [2, 8, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.tensor([0, 2, 1, 2])}
    module.eval()
    logits = module(batch)  # (4, 3 exits, 3 classes)
    assert logits.shape == (4, 3, 3)
    expected = sum(
        w * F.cross_entropy(logits[:, exit_], batch["labels"], reduction="sum")
        for exit_, w in enumerate(weights)
    )
    loss = module.loss_sum(logits, batch["labels"])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # The backbone and the exits with a weight learn; an exit weighted 0 gets no gradient.
    assert backbone.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert (
        heads.heads[0].net[-1].weight.grad.abs().sum() > 0 and heads.final.net[-1].weight.grad.abs().sum() > 0
    )
    assert heads.heads[1].net[-1].weight.grad.abs().sum() == 0
    # The validation accuracy counts every (sample, exit) pair: the mean of the exits' accuracies.
    predictions, labels = module.val_pairs(logits, batch["labels"])
    per_exit = (logits.argmax(-1) == batch["labels"][:, None]).float().mean(0)
    assert (predictions.argmax(-1) == labels).float().mean() == pytest.approx(per_exit.mean().item())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def joint_run(runs):
    """A joint run; the joint phase's inputs and outputs are kept (backbone and heads before and after)."""
    seen = {}
    original = jeidnn.pipeline.run.joint_phase

    def watched(ctx, inputs, *rest):
        seen["before"] = snapshot(inputs.backbone), snapshot(inputs.heads)
        result = original(ctx, inputs, *rest)
        seen["after"] = snapshot(inputs.backbone), snapshot(inputs.heads)
        return result

    mp = pytest.MonkeyPatch()
    mp.setattr(jeidnn.pipeline.run, "joint_phase", watched)
    try:
        assert train_main(args(runs, "--regime", "joint", "--name", "regimes-joint")) == 0
    finally:
        mp.undo()
    return runs / "regimes-joint", seen


def test_joint_trains_backbone_and_ims_from_the_pretrained_weights(joint_run):
    run_dir, seen = joint_run
    report = json.loads((run_dir / "report.json").read_text())
    regime = report["regime"]
    steps = regime["joint"]["steps"]
    assert regime["name"] == "joint" and regime["backbone_updates"] == {"joint": steps, "total": steps}
    assert 0 < steps <= 20  # 300 samples in batches of 32, two epochs at most
    assert "same budget as disjoint's stage 0" in regime["how_matched"]
    assert report["finetune"] == {"skipped": "regime joint: the joint phase replaces it"}
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"][:2] == ["joint", "cache:train"]  # no stage 0
    (backbone0, heads0), (backbone1, heads1) = seen["before"], seen["after"]
    assert any(not torch.equal(backbone0[k], backbone1[k]) for k in backbone0)
    for exit_ in range(3):  # every IM and the final head moved
        keys = [k for k in heads0 if k.startswith(f"heads.{exit_}.")]
        assert any(not torch.equal(heads0[k], heads1[k]) for k in keys), exit_
    # backbone/ (what the cache, the export and a resume read) holds the joint phase's backbone.
    saved = load_file(str(run_dir / "backbone" / "model.safetensors"))
    assert all(torch.equal(saved[k], backbone1[f"model.{k}"]) for k in saved)
    assert "Training regime: joint" in (run_dir / "report.md").read_text()
    assert not (run_dir / "checkpoints" / "joint.safetensors").exists()  # only a resume needs it


@pytest.fixture(scope="module")
def mixed_run(runs):
    assert train_main(args(runs, "--regime", "mixed", "--name", "regimes-mixed")) == 0
    return json.loads((runs / "regimes-mixed" / "report.json").read_text())


def test_mixed_runs_stage0_then_the_joint_phase(mixed_run):
    regime = mixed_run["regime"]
    stage0, joint = mixed_run["finetune"]["steps"], regime["joint"]["steps"]
    assert stage0 > 0 and joint > 0
    assert regime["backbone_updates"] == {"stage0": stage0, "joint": joint, "total": stage0 + joint}
    assert "at most 400 steps in all" in regime["how_matched"]  # finetune.max_steps + joint.max_steps
    timings = list(mixed_run["timings_s"])
    assert timings.index("stage 0: fine-tune backbone + final head") < timings.index(
        jeidnn.pipeline.run.JOINT
    )


@pytest.fixture(scope="module")
def e2e_run(runs) -> Path:
    assert train_main(args(runs, *E2E, "--name", "regimes-e2e")) == 0
    return runs / "regimes-e2e"


def test_end_to_end_stage2_trains_its_own_backbone_and_exports_it(e2e_run):
    run_dir = e2e_run
    report = json.loads((run_dir / "report.json").read_text())
    # 300 samples in batches of 64: 5 steps an epoch, 10 in all; phases of 3 steps, gates first, so the IM
    # phases (the backbone's updates) are steps 3, 4, 5 and 9.
    (model,) = report["learned"]["jeidnn_paper"]["models"]
    assert model["backbone_updates"] == 4
    stage0 = report["finetune"]["steps"]
    assert report["regime"]["backbone_updates"] == {"stage0": stage0, "stage2": 4, "total": stage0 + 4}
    shared = load_file(str(run_dir / "backbone" / "model.safetensors"))
    weights = load_file(str(run_dir / "checkpoints" / "learned" / "jeidnn_paper" / "0.safetensors"))
    own = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
    assert set(own) == set(shared) and any(not torch.equal(own[k], shared[k]) for k in own)

    # The exported model carries that backbone, and on the test texts it scores what the report says.
    from jeidnn import EarlyExitModel
    from jeidnn.config.parser import load_config
    from jeidnn.data.sources import load_raw
    from jeidnn.data.splits import make_splits

    exported = EarlyExitModel.from_pretrained(run_dir / "model")
    state = exported.backbone.model.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in own)
    cfg = load_config(run_dir / "config.yaml")
    raw = load_raw(cfg.data, "text")
    test = make_splits(len(raw.labels), cfg.data, cfg.seed).indices["test"]
    predictions = exported.predict([raw.inputs[i] for i in test], alpha=None)
    correct = [p.label == raw.label_names[raw.labels[i]] for p, i in zip(predictions, test)]
    assert sum(correct) / len(test) == pytest.approx(report["export"]["test_accuracy"], abs=1.5 / len(test))

    # `jeidnn export` of thresholds on its IMs, from the checkpoints: the IMs come with their backbone.
    from jeidnn.export.exporter import export_run

    method = "jeidnn_ims_threshold_maxprob"
    row = next(r for r in report["summary"]["budgeted"]["rows"] if r["method"] == method and r["accuracy"])
    out = export_run(run_dir, method, budget=row["budget"], out=run_dir / "export" / "ims")
    thresholds = EarlyExitModel.from_pretrained(out["path"])
    state = thresholds.backbone.model.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in own)
    predictions = thresholds.predict([raw.inputs[i] for i in test], alpha=None)
    correct = [p.label == raw.label_names[raw.labels[i]] for p, i in zip(predictions, test)]
    assert sum(correct) / len(test) == pytest.approx(row["accuracy"], abs=1.5 / len(test))


def test_a_mixed_run_killed_in_the_joint_phase_resumes_to_the_uninterrupted_report(mixed_run, tmp_path):
    """Killed mid-phase (after its first validation checkpoint), the run resumes the joint phase from that
    checkpoint on top of stage 0's backbone and ends with the uninterrupted report (timings aside)."""
    train = [
        sys.executable,
        str(ROOT / "train.py"),
        *args(tmp_path, "--regime", "mixed", "--name", "regimes-mixed"),
    ]
    kill_at("joint:step7", train, tmp_path / "killed.log")
    run_dir = tmp_path / "regimes-mixed"
    assert json.loads((run_dir / "state.json").read_text())["done"] == ["stage0"]
    assert (run_dir / "checkpoints" / "joint" / "resume.ckpt").is_file()
    assert train_main(args(tmp_path, "--regime", "mixed", "--name", "regimes-mixed", "--resume", "true")) == 0
    resumed = json.loads((run_dir / "report.json").read_text())
    drop = ("timings_s", "stage2_time_vs_train_pass")
    assert {k: v for k, v in resumed.items() if k not in drop} == {
        k: v for k, v in mixed_run.items() if k not in drop
    }


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ["--regime", "sequential"],
            "config key `regime` expects 'disjoint' | 'joint' | 'mixed', got sequential",
        ),
        (
            ["--jeidnn.train_backbone", "true"],
            "it needs one variant and one λ, got 3 variants and lambdas [0.01, 0.5]",
        ),
        (
            ["--regime", "joint", "--joint.exit_weights", "[1, 1]"],
            "joint.exit_weights has 2 weights but the model has 3",
        ),
        (["--regime", "mixed", "--finetune.enabled", "false"], "regime mixed runs stage 0 first"),
        (
            [
                "--regime",
                "joint",
                "--jeidnn.variants",
                '[{"name": "oof", "im_loss": "frozen", "gate_data": "crossfit", "extension": true}]',
            ],
            "jeidnn.variants[oof]: gate_data crossfit needs regime disjoint, got joint",
        ),
    ],
)
def test_bad_regime_settings_get_one_line_and_exit_2(override, message, tmp_path, capsys):
    assert train_main(args(tmp_path, *override)) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # logging aside, one line
    assert message in line and "Traceback" not in err, err
    assert not (tmp_path / "smoke").exists()  # refused before any work


def test_the_benchmark_collects_each_regime_and_the_end_to_end_pair(
    runs, joint_run, mixed_run, e2e_run, tmp_path
):
    """benchmarks/regimes.py --reuse on finished smoke runs: per-exit accuracies, the test-blind best learned
    gate and best baseline per budget, and end to end against the frozen backbone, in regimes.md and .json."""
    import importlib.util

    assert train_main(args(runs, *E2E[2:], "--name", "regimes-e2e-frozen")) == 0  # the same, backbone frozen
    spec = importlib.util.spec_from_file_location("regimes_benchmark", ROOT / "benchmarks" / "regimes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--config", "configs/smoke.yaml", "--regimes", "joint", "mixed", "--end-to-end", "--reuse"]
    argv += ["--runs-dir", str(runs), "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    text = (tmp_path / "regimes.md").read_text()
    assert f"Generated by `python benchmarks/regimes.py {' '.join(argv[:7])}" in text
    results = json.loads((tmp_path / "regimes.json").read_text())
    joint = json.loads((runs / "regimes-joint" / "report.json").read_text())
    cells = " | ".join(f"{100 * a:.2f}" for a in joint["exits"]["test_accuracy"])
    assert f"| regimes-joint | joint {joint['regime']['joint']['steps']}, total" in text and cells in text
    for regime, report in (("joint", joint), ("mixed", mixed_run)):
        assert results["regimes"][regime]["regime"] == report["regime"]
        for row in results["regimes"][regime]["budgeted"]:
            here = [r for r in report["summary"]["budgeted"]["rows"] if r["budget"] == row["budget"]]
            here = [r for r in here if r["accuracy"] is not None]
            for side, learned in (("learned", True), ("baseline", False)):
                pool = [r for r in here if (r["kind"] == "learned") == learned]
                if not pool:
                    assert row[side] is None
                    continue
                # Chosen on calib half A: no configuration of its side is more accurate there.
                chosen = next(r for r in pool if r["method"] == row[side]["method"])
                assert chosen["calib_accuracy"] == max(r["calib_accuracy"] for r in pool)
                assert row[side]["accuracy"] == chosen["accuracy"]
            if row["learned"] and row["baseline"]:
                assert row["delta"] == pytest.approx(row["learned"]["accuracy"] - row["baseline"]["accuracy"])
    e2e = json.loads((e2e_run / "report.json").read_text())
    for record in results["end_to_end"]["budgeted"]:
        row = next(
            r
            for r in e2e["summary"]["budgeted"]["rows"]
            if (r["budget"], r["method"]) == (record["budget"], "jeidnn_paper")
        )
        assert record["jeidnn_paper"]["end_to_end"] == row["accuracy"]
    assert "## End-to-end stage 2 vs frozen backbone (jeidnn_paper, λ = 0.01)" in text
