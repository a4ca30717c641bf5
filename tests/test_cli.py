"""The CLI as a user meets it: --help documents every key, --print_config shows what would run, bad
input -> one line, exit 2, no run folder that looks complete."""

import ast
import dataclasses
import json
import logging
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_run_overrides, write_sentiment_csv

from jeidnn.cli.main import evaluate_main, main, predict_main, train_main
from jeidnn.config.gating import GateVariant
from jeidnn.config.parser import load_config
from jeidnn.config.schema import RunConfig
from jeidnn.log import setup_logging

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
        (["--model.random_config", "{model_type: opt}"], "unsupported architecture 'opt'"),
        (
            ["--model.random_config", "null", "--model.name_or_path", "/no/such/model"],
            "model folder not found",
        ),
        (["--data.max_train_sampls", "3"], "unknown config key `data.max_train_sampls`"),
        (["--finetune.epochs", "two"], "`finetune.epochs` expects int"),
        (["--eval.threshold_ps", "[0.5, 0]"], "eval.threshold_ps must be a non-empty list of values > 0"),
        (["--eval.patience_values", "[-1]"], "eval.patience_values must be null or a non-empty list"),
        (
            ["--export.selection", "method", "--export.method", "nope"],
            "export.method 'nope' is not a method of this run; choose one of",
        ),
        (
            ["--export.selection", "method", "--export.method", "oracle"],
            "export.method 'oracle' is not a method of this run",
        ),
        (["--export.method", "patience"], "set export.selection: method to export that method"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(extra, needle, corpus, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["--config", SMOKE, *tiny_run_overrides(corpus, out), *extra, "--quiet"]
    code, err = run_train(args, capsys)
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
            "--quiet",
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


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls`, read from its source (not through jsonargparse)."""
    import inspect

    docs = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # GateVariant's base too
        body = ast.parse(inspect.getsource(base)).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(getattr(after, "value", None), ast.Constant):
                docs[node.target.id] = after.value.value
    return docs


def _leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, type, str]]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append((f"{prefix}{f.name}", cls, f.name))
    return keys


def _squashed(text: str) -> str:
    # The help formatter wraps lines, also after a hyphen: compare without any whitespace.
    return "".join(text.split())


def _help(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        train_main(args)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_key_with_its_documentation(capsys):
    text = _help(["--help"], capsys)
    for key, cls, name in _leaf_keys(RunConfig):
        doc = _field_docs(cls).get(name)
        assert doc, f"{key} has no docstring"
        assert f"  --{key} " in text or f"  --{key}\n" in text
        assert _squashed(doc) in _squashed(text), key
    for flag in ("--config FILE", "--print_config", "--quiet"):
        assert f"  {flag}" in text
    # The fields of each learned method have their own help page.
    text = _help(["--jeidnn.variants.help"], capsys)
    assert set(_field_docs(GateVariant)) == {f.name for f in dataclasses.fields(GateVariant)}
    for name, doc in _field_docs(GateVariant).items():
        assert f"  --jeidnn.variants.{name} " in text and _squashed(doc) in _squashed(text), name


def test_print_config_prints_the_resolved_config_and_does_nothing_else(tmp_path, capsys):
    out = tmp_path / "runs"
    overrides = ["--output_dir", str(out), "--name", "2024", "--data.labels", "[no, yes]"]
    code = train_main(["--config", SMOKE, *overrides, "--print_config"])
    printed, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert not out.exists()
    expected = load_config(SMOKE, overrides)
    assert yaml.safe_load(printed)["name"] == "2024"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert load_config(path) == expected
    # Without --config: the packaged configs/default.yaml.
    assert train_main(["--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config(ROOT / "configs" / "default.yaml").to_dict()


def test_print_config_refuses_a_bad_config(capsys):
    assert train_main(["--print_config", "--finetune.lr", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: finetune.lr must be a finite number > 0, got 0.0\n"


def test_quiet_logs_warnings_only(capsys):
    status = logging.getLogger("jeidnn.pipeline.run")
    try:
        setup_logging(quiet=False)
        setup_logging(quiet=False)  # twice: still one handler
        status.info("stage done")
        assert capsys.readouterr().err == "[jeidnn] stage done\n"
        setup_logging(quiet=True)
        status.info("stage done")
        status.warning("careful")
        assert capsys.readouterr().err == "[jeidnn] careful\n"
    finally:
        setup_logging(quiet=False)


def test_jeidnn_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "export"):
        assert f"\n  {command} " in out
    assert main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "command, args, needle",
    [
        (
            predict_main,
            [],
            "error: the following arguments are required: model_dir; see jeidnn predict --help",
        ),
        (predict_main, ["m", "--alpha", "x"], "error: argument --alpha: invalid float value: 'x'"),
        (
            evaluate_main,
            ["r", "--bins", "3"],
            "error: unrecognized arguments: --bins 3; see jeidnn evaluate --help",
        ),
    ],
)
def test_other_commands_get_one_line_errors(command, args, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        command(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--quiet" in capsys.readouterr().out


def test_lightning_banners_stay_quiet_even_when_lightning_is_imported_later():
    import logging

    from jeidnn.log import setup_logging

    setup_logging()
    logging.getLogger("pytorch_lightning").setLevel(logging.INFO)  # what `import pytorch_lightning` does
    banner = logging.getLogger("pytorch_lightning.utilities.rank_zero")  # "GPU available: ...", tips
    assert not banner.isEnabledFor(logging.INFO) and banner.isEnabledFor(logging.WARNING)


def test_a_run_evaluated_after_a_failure_still_offers_resume(tmp_path):
    """`jeidnn evaluate` writes report.json for a run that failed in stages 3-4; state.json still says it is
    unfinished, so a plain re-run points to --resume, not to --overwrite alone."""
    from jeidnn.config.schema import RunConfig
    from jeidnn.errors import JeidnnError
    from jeidnn.pipeline.resume import RunState, config_hash, open_run_dir

    cfg = RunConfig(name="r", output_dir=str(tmp_path))
    state = open_run_dir(cfg)
    state.mark("stage0")
    (cfg.run_dir / "report.json").write_text("{}")  # what `jeidnn evaluate` leaves
    with pytest.raises(JeidnnError, match=r"an unfinished run \(finished: stage0\); pass --resume true"):
        open_run_dir(cfg)
    state.mark("report")
    assert RunState.read(cfg.run_dir).finished("report") and state.config_hash == config_hash(cfg)
    with pytest.raises(JeidnnError, match="already holds a finished run; choose another --name"):
        open_run_dir(cfg)
