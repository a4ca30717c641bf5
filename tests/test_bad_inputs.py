"""Bad input through the command line, as a matrix: config, data files, model folders, predict inputs, runs.

Every case runs a real command (`python train.py ...`, `python -m jeidnn.cli.main predict|evaluate ...`) in a
process of its own and must end with exactly one line on stderr, starting with ``error:``, exit status
2, no report.json and no model folder, and a finished run left byte for byte as it was. Commands run
with ``--quiet``: without it, status lines are logged on stderr before the error.

The processes are forked from one warm Python process that has imported torch, transformers and
jeidnn: a cold `python train.py` spends seconds importing them before it can refuse a bad key, which
over ~35 cases would take minutes. The warm process's own start-up output (import-time warnings) is
checked once; each command's output is checked on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tiny_models import write_sentiment_csv

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TEXT = (ROOT / "configs" / "smoke.yaml").read_text()
SMOKE = yaml.safe_load(SMOKE_TEXT)
TRAIN = str(ROOT / "train.py")
CASE_TIMEOUT_S = 120

SERVER = r"""
import json, os, runpy, sys, traceback

import torch, transformers, pytorch_lightning  # what every command imports, imported once
import jeidnn, jeidnn.evaluate.evaluation, jeidnn.pipeline.run, jeidnn.hf.predict

# `python -m jeidnn.cli.main` executes the module afresh; a copy already imported would make runpy warn.
sys.modules.pop("jeidnn.cli.main", None)


def run(case):
    os.chdir(case["cwd"])
    os.environ.update(case["env"])
    for fd, key in ((1, "out"), (2, "err")):
        f = os.open(case[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    argv = case["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:  # what the interpreter does with sys.exit(code)
        code = 0 if exc.code is None else exc.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        run(case)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@dataclass
class Result:
    status: int
    out: str
    err: str


class Server:
    """A warm Python process that runs one command per forked child."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.startup_err = folder / "server.err"
        self.count = 0
        with self.startup_err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                start_new_session=True,  # its own process group: a hung command is killed with it
            )
        assert self._read(300) == "ready", self.startup_err.read_text()

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"no answer within {timeout} s")
        return self.proc.stdout.readline().strip()

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Result:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        case = {"argv": argv, "cwd": str(cwd), "env": env or {}, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self._read(CASE_TIMEOUT_S))
        return Result(status, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Tiny:
    """A finished run trained once for the module, and what the cases build on."""

    server: Server
    data: Path
    """The CSV the run was trained on."""
    run: Path
    """runs/tiny: report.json, model/, predictions/ ..."""

    @property
    def model(self) -> Path:
        return self.run / "model"


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (and the folder list), keyed by relative path."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return hashes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    server = Server(base)
    try:
        data = write_sentiment_csv(base / "data.csv", n=400)
        config = base / "tiny.yaml"
        # A lighter evaluation than the smoke run's: this run only has to exist, finished.
        light = {"eval__bootstrap": 100, "eval__resplits": 2, "eval__budgets": [0.5, 0.8]}
        config.write_text(yaml.safe_dump(smoke_config(data, base / "runs", "tiny", **light)))
        result = server.run([TRAIN, "--config", str(config)], ROOT)
        assert result.status == 0, result.err[-3000:]
        yield Tiny(server, data, base / "runs" / "tiny")
    finally:
        server.close()


@pytest.fixture(scope="module")
def tiny_hashes(tiny):
    return tree_hashes(tiny.run)


def smoke_config(data: Path, output_dir: Path, name: str, **changes) -> dict:
    """configs/smoke.yaml on a CSV, with `changes` as ``section__key=value`` (``None`` deletes the key)."""
    config = json.loads(json.dumps(SMOKE))  # deep copy
    config["data"].update({"source": "csv", "path": str(data)})
    config.update({"output_dir": str(output_dir), "name": name})
    for dotted, value in changes.items():
        *sections, key = dotted.split("__")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return config


# --------------------------------------------------------------------------- the cases
# Each builds its inputs in `tmp` and returns the command line and a regex its error line must match.
Case = Callable[[Path, Tiny], tuple[list[str], str]]


def train(tmp: Path, tiny: Tiny, data: Path | None = None, **changes) -> list[str]:
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(smoke_config(data or tiny.data, tmp / "runs", "case", **changes)))
    return [TRAIN, "--config", str(config)]


def csv_file(tmp: Path, content: str | bytes, name: str = "data.csv") -> Path:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def predict(model: Path, *args: str) -> list[str]:
    return ["-m", "jeidnn.cli.main", "predict", str(model), *args]


def model_copy(tmp: Path, tiny: Tiny, damage: Callable[[Path], None], pattern: str) -> Path:
    """A copy of the run's model with `damage` applied to every file matching `pattern` (format-agnostic)."""
    folder = tmp / "model"
    shutil.copytree(tiny.model, folder)
    files = sorted(folder.rglob(pattern))
    assert files, f"no {pattern} in the saved model"
    for path in files:
        damage(path)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(bytes((7 * i + 3) % 256 for i in range(size)))


def unsupported_type(path: Path) -> None:
    config = json.loads(path.read_text())
    if "model_type" in config:
        config["model_type"] = "opt"
    path.write_text(json.dumps(config))


TEXT = "text,label\n" + "".join(f"sample {i} okay,neutral\n" for i in range(3))
ONE_CLASS = "text,label\n" + "".join(f"sample {i} okay,neutral\n" for i in range(50))
LATIN1 = "text,label\ncaf\u00e9 au lait,positive\nmeh,negative\nfine,neutral\n".encode("latin-1")

CASES: dict[str, Case] = {
    # config
    "config_unknown_key": lambda tmp, t: (train(tmp, t, data__shuffle_words=True), "shuffle_words"),
    "config_wrong_type": lambda tmp, t: (train(tmp, t, finetune__epochs="many"), "finetune.epochs"),
    "config_bad_enum": lambda tmp, t: (train(tmp, t, model__pooling="sideways"), "sideways"),
    "config_truncated_yaml": lambda tmp, t: (
        [TRAIN, "--config", str(csv_file(tmp, SMOKE_TEXT[: SMOKE_TEXT.index("[0.01") + 6], "cut.yaml"))],
        r"cut\.yaml is not valid YAML",
    ),
    "config_missing_file": lambda tmp, t: ([TRAIN, "--config", str(tmp / "nope.yaml")], r"nope\.yaml"),
    "config_not_a_mapping": lambda tmp, t: (
        [TRAIN, "--config", str(csv_file(tmp, "- model\n- data\n", "list.yaml"))],
        r"list\.yaml",
    ),
    "config_unsupported_architecture": lambda tmp, t: (
        train(tmp, t, model__random_config={**SMOKE["model"]["random_config"], "model_type": "opt"}),
        "architecture 'opt'",
    ),
    # data
    "data_missing_file": lambda tmp, t: (train(tmp, t, tmp / "missing.csv"), r"missing\.csv"),
    "data_path_is_a_folder": lambda tmp, t: (train(tmp, t, tmp), "is a folder"),
    "data_missing_text_column": lambda tmp, t: (
        train(tmp, t, data__text_column="review"),
        r"column 'review' not found .*columns: text, label",
    ),
    "data_missing_label_column": lambda tmp, t: (
        train(tmp, t, data__label_column="stars"),
        r"column 'stars' not found .*columns: text, label",
    ),
    "data_one_class": lambda tmp, t: (train(tmp, t, csv_file(tmp, ONE_CLASS)), r"\['neutral'\].*at least 2"),
    "data_duplicate_label_names": lambda tmp, t: (
        train(tmp, t, data__labels=["negative", "neutral", "negative", "positive"]),
        r"\['negative'\] more than once",
    ),
    "data_label_not_in_labels": lambda tmp, t: (
        train(tmp, t, data__labels=["negative", "positive"]),
        r"'neutral' .*not one of data.labels",
    ),
    "data_empty_csv": lambda tmp, t: (train(tmp, t, csv_file(tmp, "")), "is empty"),
    "data_header_only": lambda tmp, t: (train(tmp, t, csv_file(tmp, "text,label\n")), "has no records"),
    "data_not_utf8": lambda tmp, t: (
        train(tmp, t, csv_file(tmp, LATIN1)),
        r"data\.csv is not utf-8 text: byte 0xe9 at offset 14 \(line 2\).*UTF-8",
    ),
    "data_too_few_rows": lambda tmp, t: (
        train(tmp, t, csv_file(tmp, "text,label\na b,x\nc d,y\ne f,x\n")),
        "split .* is empty",
    ),
    "data_bad_jsonl": lambda tmp, t: (
        train(
            tmp, t, csv_file(tmp, '{"text": "a", "label": "x"}\n{"text": \n', "d.jsonl"), data__source="jsonl"
        ),
        r"line 2 of .*d\.jsonl is not valid JSON",
    ),
    "train_over_a_finished_run": lambda tmp, t: (
        [
            TRAIN,
            "--config",
            str(csv_file(tmp, yaml.safe_dump(smoke_config(t.data, t.run.parent, "tiny")), "c.yaml")),
        ],
        "already holds a finished run",
    ),
    # model folders
    "model_missing_folder": lambda tmp, t: (predict(tmp / "no_model", "--text", "hi"), "no_model"),
    "model_not_a_model": lambda tmp, t: (
        predict(csv_file(tmp, "notes", "notes.txt").parent, "--text", "hi"),
        re.escape(str(tmp)),
    ),
    "model_run_folder_instead_of_model": lambda tmp, t: (
        predict(t.run, "--text", "hi"),
        re.escape(str(t.run)),
    ),
    "model_corrupted_safetensors": lambda tmp, t: (
        predict(model_copy(tmp, t, scramble, "*.safetensors"), "--text", "hi"),
        "model",
    ),
    "model_missing_weights": lambda tmp, t: (
        predict(model_copy(tmp, t, Path.unlink, "*.safetensors"), "--text", "hi"),
        "model",
    ),
    "model_truncated_config_json": lambda tmp, t: (
        predict(model_copy(tmp, t, truncate, "config.json"), "--text", "hi"),
        "config.json|model",
    ),
    "model_unsupported_architecture": lambda tmp, t: (
        predict(model_copy(tmp, t, unsupported_type, "config.json"), "--text", "hi"),
        "type 'opt'",
    ),
    # predict inputs
    "predict_empty_text": lambda tmp, t: (predict(t.model, "--text", "  "), "empty text"),
    "predict_image_for_a_text_model": lambda tmp, t: (
        predict(t.model, "--input", str(csv_file(tmp, b"\x89PNG\r\n\x1a\n" + bytes(64), "photo.png"))),
        r"photo\.png",
    ),
    "predict_image_named_csv": lambda tmp, t: (
        predict(t.model, "--input", str(csv_file(tmp, b"\x89PNG\r\n\x1a\n" + bytes(64), "photo.csv"))),
        r"photo\.csv is not utf-8 text: byte 0x89 at offset 0",
    ),
    "predict_missing_input": lambda tmp, t: (
        predict(t.model, "--input", str(tmp / "nope.csv")),
        r"nope\.csv",
    ),
    "predict_missing_column": lambda tmp, t: (
        predict(t.model, "--input", str(csv_file(tmp, TEXT)), "--column", "tweet"),
        r"column 'tweet' not found .*columns: text, label",
    ),
    "predict_not_utf8_input": lambda tmp, t: (
        predict(t.model, "--input", str(csv_file(tmp, LATIN1))),
        "not utf-8 text",
    ),
    "predict_alpha_not_calibrated": lambda tmp, t: (
        predict(t.model, "--text", "hi", "--alpha", "0.37"),
        r"alpha 0\.37 was not calibrated",
    ),
    # evaluate
    "evaluate_missing_run": lambda tmp, t: (
        ["-m", "jeidnn.cli.main", "evaluate", str(tmp / "runs" / "gone")],
        "gone",
    ),
    "evaluate_alpha_out_of_range": lambda tmp, t: (
        ["-m", "jeidnn.cli.main", "evaluate", str(t.run), "--alphas", "1.5"],
        "1.5",
    ),
    "evaluate_unfinished_run": lambda tmp, t: (
        ["-m", "jeidnn.cli.main", "evaluate", str(unfinished_run(tmp, t))],
        "is not a trained run",
    ),
}


def unfinished_run(tmp: Path, tiny: Tiny) -> Path:
    """What a run that failed after stage 0 leaves: its config, logs and a FAILED marker, no report.json."""
    run = tmp / "runs" / "failed"
    run.mkdir(parents=True)
    shutil.copy(tiny.run / "config.yaml", run / "config.yaml")
    (run / "FAILED").write_text("this run did not finish; its outputs are incomplete\n")
    return run


def outputs(folder: Path) -> list[Path]:
    """report.json files and model folders under `folder` that a failed command must not leave."""
    return [p for p in folder.rglob("*") if p.name == "report.json" or (p.is_dir() and p.name == "model")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_one_error_line_and_status_2(name, tiny, tiny_hashes, tmp_path):
    argv, pattern = CASES[name](tmp_path, tiny)
    before = set(outputs(tmp_path))
    result = tiny.server.run([*argv, "--quiet"], tmp_path)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err[-3000:]
    assert result.status == 2
    assert re.search(pattern, lines[0]), lines[0]
    assert set(outputs(tmp_path)) == before
    assert tree_hashes(tiny.run) == tiny_hashes


def test_unreadable_model_folder(tiny, tiny_hashes, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 folder anyway")
    folder = tmp_path / "model"
    shutil.copytree(tiny.model, folder)
    folder.chmod(0)
    try:
        result = tiny.server.run(predict(folder, "--text", "hi"), tmp_path)
    finally:
        folder.chmod(0o755)
    lines = result.err.strip().splitlines()
    assert result.status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "model" in lines[0]
    assert tree_hashes(tiny.run) == tiny_hashes


def test_a_100000_character_text_is_truncated_not_refused(tiny, tmp_path):
    long = ("good " * 20_000)[:100_000]
    inputs = csv_file(tmp_path, f"text\n{long}\nbad\n")
    result = tiny.server.run(predict(tiny.model, "--input", str(inputs)), tmp_path)
    assert result.status == 0 and result.err == "", result.err[-3000:]
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert len(rows) == 2 and all(0 < row["probability"] <= 1 for row in rows)


def test_the_warm_process_started_quietly(tiny):
    # Import-time warnings of torch / transformers / jeidnn would precede every command's error line.
    assert tiny.server.startup_err.read_text() == ""


NO_PICKLE = """
import pickle, sys
import torch
from jeidnn.hf.modeling import EarlyExitModel

def refuse(*args, **kwargs):
    raise AssertionError("a saved model must load without unpickling anything")

for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
    setattr(module, name, refuse)
model = EarlyExitModel.from_pretrained(sys.argv[1])
print(model.predict(["good day", "bad day"])[0].label in model.labels)
"""


def test_loading_a_model_never_unpickles(tiny, tmp_path):
    script = tmp_path / "no_pickle.py"
    script.write_text(NO_PICKLE)
    result = tiny.server.run([str(script), str(tiny.model)], tmp_path)
    assert result.status == 0 and result.out == "True\n", result.err[-3000:]
