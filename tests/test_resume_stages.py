"""`--resume true` with changed settings of later stages: a finished (or unfinished) run redoes the stages
whose config part changed and reuses the earlier ones; it ends with the report.json a fresh run with the
new config writes (timings aside). State files from before per-stage hashes still resume."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import few_steps_argv, write_sentiment_csv

from jeidnn.cli.main import train_main
from jeidnn.train.crossfit import CROSSFIT_PREDICTIONS, fold_index, out_of_fold_logits
from jeidnn.train.report import CROSSFIT_TIMING

ROOT = Path(__file__).resolve().parents[1]

TIMINGS = ("timings_s", "stage2_time_vs_train_pass")
STAGE0 = "stage 0: fine-tune backbone + final head"


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "tweets.csv", n=300)


def argv(csv, out, *extra: str) -> list[str]:
    # `extra` last: few_steps_argv puts its own jeidnn / warmup settings after its extra arguments.
    return [*few_steps_argv([], ["--data.source", "csv", "--data.path", str(csv)], out, "run"), *extra]


def read(run_dir, name="report.json") -> dict:
    return json.loads((run_dir / name).read_text())


@pytest.fixture(scope="module")
def finished(csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    assert train_main(argv(csv, out)) == 0
    return out / "run"


NEW_JEIDNN = ("--jeidnn.lambdas", "[0.05, 0.5]", "--jeidnn.epochs", "2")
NEW_WARMUP = ("--warmup.max_epochs", "3")


@pytest.mark.parametrize("change", [NEW_JEIDNN, NEW_WARMUP], ids=["jeidnn", "warmup"])
def test_a_finished_run_redoes_only_the_changed_stages(csv, finished, tmp_path, change, caplog):
    fresh = tmp_path / "fresh"
    assert train_main(argv(csv, fresh, *change)) == 0
    copy = tmp_path / "copy"  # copied and renamed: `output_dir` and `name` are no training settings
    shutil.copytree(finished, copy / "renamed")
    before = read(copy / "renamed", "state.json")
    assert train_main(argv(csv, copy, "--resume", "true", *change, "--name", "renamed")) == 0
    assert without_timings(read(copy / "renamed")) == without_timings(read(fresh / "run"))
    state = read(copy / "renamed", "state.json")
    # Stage 0 was reused (its recorded time is the first run's), stage 2 ran again.
    assert state["timings"][STAGE0] == before["timings"][STAGE0]
    assert (
        state["done"][-1] == "report"
        and state["stage_hashes"] == read(fresh / "run", "state.json")["stage_hashes"]
    )
    redone = "stage 1 (IM warm-up), stage 2" if change == NEW_WARMUP else "stage 2 (learned gates)"
    assert any(f"redoing {redone}" in r.getMessage() for r in caplog.records)
    # Resuming again with the same config: nothing left to do.
    assert train_main(argv(csv, copy, "--resume", "true", *change, "--name", "renamed")) == 2


def test_an_old_state_file_resumes_or_is_refused_in_one_line(csv, finished, tmp_path, capsys):
    copy = tmp_path / "copy" / "run"
    shutil.copytree(finished, copy)
    state = read(copy, "state.json")
    del state["stage_hashes"]  # as written before per-stage hashes
    (copy / "state.json").write_text(json.dumps(state))
    # The backbone's settings changed: refused, the key named.
    assert train_main(argv(csv, copy.parent, "--resume", "true", "--finetune.lr", "0.5")) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "finetune.lr is 0.5 here but 0.001" in error and "backbone stages cannot be reused" in error

    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config.replace("lr: 0.001", "lr: 0.002", 1))
    assert train_main(argv(csv, copy.parent, "--resume", "true", *NEW_JEIDNN)) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "predates per-stage hashes" in error and "is not the config its hash was taken of" in error

    (copy / "config.yaml").write_text(config)
    assert train_main(argv(csv, copy.parent, "--resume", "true", *NEW_JEIDNN)) == 0
    assert (
        read(copy, "state.json")["stage_hashes"]["backbone"]
        == read(finished, "state.json")["stage_hashes"]["backbone"]
    )


def test_fold_index_deals_every_sample_to_one_fold():
    fold = fold_index(11, 3, seed=0)
    assert sorted(torch.bincount(fold).tolist()) == [3, 4, 4] and fold.min() == 0 and fold.max() == 2
    assert torch.equal(fold, fold_index(11, 3, seed=0)) and not torch.equal(fold, fold_index(11, 3, seed=1))


CROSSFIT = [
    {"name": "gates_on_train", "im_loss": "frozen"},
    {"name": "gates_crossfit", "im_loss": "frozen", "gate_data": "crossfit", "extension": True},
]


def test_a_finished_run_resumed_with_a_crossfit_variant(csv, finished, tmp_path, monkeypatch):
    seen = []

    def spy(ctx, heads, cache, folds):
        logits = out_of_fold_logits(ctx, heads, cache, folds)
        seen.append((len(cache["train"]), folds, logits))
        return logits

    monkeypatch.setattr("jeidnn.train.learned.out_of_fold_logits", spy)
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy / "run")
    change = ("--jeidnn.variants", json.dumps(CROSSFIT), "--jeidnn.crossfit_folds", "3")
    assert train_main(argv(csv, copy, "--resume", "true", *change)) == 0
    report = read(copy / "run")
    assert set(report["learned"]) >= {"gates_on_train", "gates_crossfit"}
    (n, folds, logits) = seen[0]
    assert folds == 3 and logits.shape[0] == n == report["dataset"]["splits"]["train"]
    timing = report["stage2_time_vs_train_pass"]
    assert timing["crossfit_s"] == report["timings_s"][CROSSFIT_TIMING]
    assert timing["stage2_s"] == pytest.approx(
        report["timings_s"]["stage 2: learned gates, every variant and λ"] - timing["crossfit_s"]
    )
    # Same IMs at inference (stage 1's), other gates: the out-of-fold outputs changed what they learned.
    on_train, on_folds = (
        load_file(str(copy / "run" / report["learned"][name]["models"][0]["file"]))
        for name in ("gates_on_train", "gates_crossfit")
    )
    assert torch.equal(on_train["val_logits"], on_folds["val_logits"])
    assert not torch.equal(on_train["val_scores"], on_folds["val_scores"])
    # Both sets of train outputs are kept: the out-of-fold ones the gates learned on, and stage 1's IMs'.
    kept = load_file(str(copy / "run" / CROSSFIT_PREDICTIONS))
    assert torch.equal(kept["train_out_of_fold_logits"], logits)
    assert kept["train_logits"].shape == (n, logits.shape[1] + 1, logits.shape[2])
    assert not torch.equal(kept["train_logits"][:, :-1], logits)
    assert kept["train_labels"].shape == (n,)
    # benchmarks/gating.py compares them with stage 1's IMs on val
    spec = importlib.util.spec_from_file_location("gating", ROOT / "benchmarks" / "gating.py")
    gating = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gating)
    check = gating.im_outputs_check(report, copy / "run")
    labels = kept["train_labels"]
    out_of_fold = check["train, out of fold"]
    assert out_of_fold["accuracy"] == pytest.approx(
        (logits.argmax(-1) == labels[:, None]).double().mean(0).tolist()
    )
    assert len(out_of_fold["ece"]) == len(out_of_fold["auroc"]) == logits.shape[1]
    warm = load_file(str(copy / "run" / "predictions" / "warmup.safetensors"))
    val_correct = warm["val_logits"].argmax(-1) == warm["val_labels"][:, None]
    assert check["val"]["accuracy"] == pytest.approx(val_correct.double().mean(0).tolist())
    assert gating.im_outputs_check(report, finished) is None  # no crossfit variant there
