"""A run folder's progress: which stages finished (`state.json`), resuming, and the FAILED marker.

`runs/<name>/state.json` is rewritten atomically after each stage: the stages done so far, their timings,
what report.json will say about them, and the hash of the config they ran with. `--resume true` continues
from there with the same config (`eval`, `export`, `devices` and `output_dir` may change: they do not
change what the finished stages computed). Every stage is seeded on its own, so a resumed run ends with the
report.json an uninterrupted one writes (timings aside).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError, first_line
from jeidnn.io import write_json, write_text

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
FAILED_FILE = "FAILED"
NOT_HASHED = ("resume", "overwrite", "output_dir", "devices", "eval", "export")
"""Config keys a resumed run may change."""


def training_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the config the finished stages depend on."""
    data = cfg.to_dict()
    for key in NOT_HASHED:
        data.pop(key, None)
    return data


def config_hash(cfg: RunConfig) -> str:
    text = json.dumps(training_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


@dataclass
class RunState:
    """Progress of one run folder (state.json)."""

    config_hash: str
    done: list[str] = field(default_factory=list)
    """Finished stages in order: `stage0` and / or `joint` (the regime's backbone training), `cache:<split>`,
    `warmup`, `stage2`, `report`."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of each stage, as report.json's `timings_s`."""
    info: dict[str, Any] = field(default_factory=dict)
    """What report.json says about finished stages (e.g. `finetune`: what stage 0 did; `joint`: the joint
    phase)."""
    run_dir: Path | None = None
    """Where state.json lives; None in processes other than the first (they never write it)."""

    def finished(self, stage: str) -> bool:
        return stage in self.done

    def mark(self, stage: str, timings: dict[str, float] | None = None, **info: Any) -> None:
        """Record `stage` as finished (with its timings and report entries) and write state.json."""
        if stage not in self.done:
            self.done.append(stage)
        self.timings.update(timings or {})
        self.info.update(info)
        self.write()

    def write(self) -> None:
        if self.run_dir is None:
            return
        data = {k: v for k, v in asdict(self).items() if k != "run_dir"}
        write_json(self.run_dir / STATE_FILE, data)  # a kill leaves the old state or the new one, never half

    @classmethod
    def read(cls, run_dir: Path) -> RunState | None:
        path = run_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(data["config_hash"], list(data["done"]), dict(data["timings"]), dict(data["info"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise JeidnnError(
                f"{path} is malformed ({first_line(exc)}); the run cannot be resumed, pass --overwrite true"
            ) from None


def _describe(state: RunState | None) -> str:
    if state is None or not state.done:
        return "no finished stage"
    return "finished: " + ", ".join(state.done)


def open_run_dir(cfg: RunConfig) -> RunState:
    """Create the run folder, or (with `cfg.resume`) reopen it; returns its state. First process only.

    Raises:
        JeidnnError: the folder exists and neither resume nor overwrite was asked for; or it cannot be
            resumed (another config, no state.json, already finished).
    """
    run_dir = cfg.run_dir
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and cfg.overwrite:
        shutil.rmtree(run_dir)
        exists = False
    if exists and not cfg.resume:
        # state.json decides: `jeidnn evaluate` may have written a report.json for a run that failed later.
        previous = RunState.read(run_dir)
        finished = previous.finished("report") if previous is not None else (run_dir / "report.json").exists()
        state = "a finished run" if finished else f"an unfinished run ({_describe(previous)})"
        hint = "" if finished else "pass --resume true to continue it, "
        raise JeidnnError(
            f"run folder {run_dir} already holds {state}; {hint}choose another --name "
            "or pass --overwrite true"
        )
    if not exists:
        if cfg.resume:
            logger.info("nothing to resume in %s; starting the run", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = RunState(config_hash(cfg), run_dir=run_dir)
        state.write()  # first: a folder with it can always be resumed
        write_text(run_dir / "config.yaml", cfg.to_yaml())
        return state
    state = RunState.read(run_dir)
    if state is None:
        raise JeidnnError(
            f"run folder {run_dir} has no {STATE_FILE} (an older jeidnn made it, or it is no run); it "
            "cannot be resumed: pass --overwrite true or choose another --name"
        )
    if state.finished("report"):
        raise JeidnnError(
            f"run folder {run_dir} holds a finished run; nothing to resume. `jeidnn evaluate {run_dir}` "
            "recomputes its evaluation"
        )
    if state.config_hash != config_hash(cfg):
        raise JeidnnError(_config_mismatch(run_dir, cfg))
    state.run_dir = run_dir
    write_text(run_dir / "config.yaml", cfg.to_yaml())  # eval / export settings may have changed
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    logger.info("resuming %s (%s)", run_dir, _describe(state))
    return state


def _config_mismatch(run_dir: Path, cfg: RunConfig) -> str:
    old: Any = None
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            old = None
    new = training_config(cfg)
    found = (
        _first_difference({k: v for k, v in old.items() if k in new}, new) if isinstance(old, dict) else None
    )
    what = f"{found[0]} is {found[2]!r} here but {found[1]!r} in {path}" if found else "the config differs"
    return (
        f"--resume true: {what}; resume with the config the run started with (only eval, export, devices and "
        "output_dir may change), or choose another --name"
    )


def worker_state(cfg: RunConfig) -> RunState:
    """The state a process other than the first plans with: the folder's when resuming, else a fresh one.

    Read once at start: the first process only records a stage after every process has done its share.
    """
    if cfg.resume and not cfg.overwrite:
        state = RunState.read(cfg.run_dir)
        if state is not None:
            return state
    return RunState(config_hash(cfg))


def mark_failed(run_dir: Path, stage: str, exc: BaseException, state: RunState) -> None:
    """Leave a FAILED marker saying which stage failed; every finished artifact stays."""
    reason = first_line(exc) if str(exc) else ""
    write_text(
        run_dir / FAILED_FILE,
        f"{stage} failed: {type(exc).__name__}{': ' + reason if reason else ''}\n"
        f"{_describe(state)}; fix the cause and pass --resume true to continue from there\n",
    )
