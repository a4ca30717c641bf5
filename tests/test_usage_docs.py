"""Every example of docs/usage.md runs: the Python blocks are executed and each command of the bash blocks
goes through the CLI, in a folder where `runs/default` is a tiny trained run."""

import re
import shlex
from pathlib import Path

import pytest
from tiny_models import tiny_run_overrides, write_sentiment_csv

from jeidnn.cli.main import main, train_main

ROOT = Path(__file__).resolve().parent.parent
USAGE = ROOT / "docs" / "usage.md"
FAST = ["--warmup.max_epochs", "5", "--eval.bootstrap", "100", "--eval.resplits", "2", "--quiet"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", USAGE.read_text(), flags=re.S)


def commands() -> list[str]:
    lines = [line.split("  #")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding `runs/default` (a tiny run) and `configs/` (the repository's), as after training."""
    tmp = tmp_path_factory.mktemp("usage")
    (tmp / "configs").symlink_to(ROOT / "configs")
    csv = write_sentiment_csv(tmp / "tweets.csv", n=300)
    args = [
        "--config",
        str(ROOT / "configs" / "smoke.yaml"),
        *tiny_run_overrides(csv, tmp / "runs", "default"),
    ]
    assert train_main([*args, *FAST]) == 0
    return tmp


def test_the_page_has_examples_of_each_kind():
    verbs = {shlex.split(c)[1] if c.startswith("jeidnn") else "train.py" for c in commands()}
    assert verbs == {"train.py", "evaluate", "export", "predict"}
    assert len(blocks("python")) >= 3


def test_every_command_runs(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    for command in commands():
        argv = shlex.split(command)
        if argv[:2] == ["python", "train.py"]:
            if "--help" in argv:
                with pytest.raises(SystemExit) as done:
                    train_main(argv[2:])
                assert done.value.code == 0
            else:  # the examples print configs: they must parse and validate, and train nothing
                assert "--print_config" in argv, command
                assert train_main(argv[2:]) == 0, command
        else:
            assert argv[0] == "jeidnn", command
            assert main(argv[1:]) == 0, f"{command}: {capsys.readouterr().err}"
    out = capsys.readouterr().out
    assert '"prediction_set"' in out and "name: demo" in out and "name: '2024'" in out


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_example_runs(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    exec(compile(blocks("python")[index], f"docs/usage.md python block {index + 1}", "exec"), {})
