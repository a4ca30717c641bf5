"""The CLI as a user meets it: bad input -> one line, exit 2, no run folder that looks complete."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_run_overrides, write_sentiment_csv

from jeidnn.cli import main, train_main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "d.csv", n=300)


def run_train(args, capsys):
    code = train_main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data.path", "/nonexistent/file.csv"], "data file not found: /nonexistent/file.csv"),
        (["--data.text_column", "review"], "column 'review' not found"),
        (["--data.labels", "[good, bad]"], "not one of data.labels"),
        (["--data.test_fraction", "0.001"], "split 'test' is empty"),
        (["--model.random_config", "{model_type: gpt2}"], "unsupported architecture 'gpt2'"),
        (
            ["--model.random_config", "null", "--model.name_or_path", "/no/such/model"],
            "model folder not found",
        ),
        (["--data.max_train_sampls", "3"], "unknown config key `data.max_train_sampls`"),
        (["--finetune.epochs", "two"], "`finetune.epochs` expects int"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(extra, needle, corpus, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_train(["--config", SMOKE, *tiny_run_overrides(corpus, out), *extra], capsys)
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "Traceback" not in err
    assert not (out / "t" / "report.json").exists()


def test_missing_config_file(capsys):
    code, err = run_train(["--config", "/no/such.yaml"], capsys)
    assert code == 2 and "config file not found: /no/such.yaml" in err


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            SMOKE,
            "--data.source",
            "csv",
            "--data.path",
            str(tmp_path / "missing.csv"),
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data file not found: {tmp_path / 'missing.csv'}; check data.path"
    ]


def test_existing_run_is_not_overwritten(corpus, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps({"keep": True}))
    code, err = run_train(["--config", SMOKE, *tiny_run_overrides(corpus, tmp_path / "runs")], capsys)
    assert code == 2 and "already holds a finished run" in err
    assert json.loads((run_dir / "report.json").read_text()) == {"keep": True}
