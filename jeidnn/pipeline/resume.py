"""A run folder's progress: which stages finished (`state.json`), resuming, and the FAILED marker.

`runs/<name>/state.json` is rewritten atomically after each stage: the stages done so far, their timings,
what report.json will say about them, and one hash per group of stages of the config part it read
(:data:`STAGE_GROUPS`). `--resume true` continues from there. `eval`, `export`, `devices`, `output_dir` and
`name` may change freely (they do not change what the stages computed: a copied folder resumes); a
changed `warmup` or `jeidnn` section redoes stage 1 or stage 2 and everything after it, reusing the
backbone and its feature cache, even in a finished run. Every stage is seeded on its own, so a resumed run
ends with the report.json an uninterrupted run with its config writes (timings aside).
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

from jeidnn.config.parser import config_from_dict
from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError, first_line
from jeidnn.io import write_json, write_text

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
FAILED_FILE = "FAILED"
NOT_HASHED = ("resume", "overwrite", "output_dir", "name", "devices", "eval", "export")
"""Config keys a resumed run may change (`output_dir` and `name`: a run folder copied or renamed resumes)."""
LEGACY_NOT_HASHED = tuple(k for k in NOT_HASHED if k != "name")
"""What the single hash of a state.json from before per-stage hashes left out (older ones kept `name`)."""


def training_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the config the finished stages depend on."""
    data = cfg.to_dict()
    for key in NOT_HASHED:
        data.pop(key, None)
    return data


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: RunConfig) -> str:
    """The hash of the whole training config (what state.json recorded before per-stage hashes)."""
    return _hash(training_config(cfg))


STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "backbone": ("stage0", "joint", "cache:"),
    "warmup": ("warmup",),
    "stage2": ("stage2",),
}
"""The groups of `done` entries (a trailing `:` matches a prefix) that one config part decides, in run
order: the backbone stages read everything but the `warmup` and `jeidnn` sections, stage 1 adds `warmup`,
stage 2 adds `jeidnn`. `report` follows them all."""
GROUP_SECTION = {"warmup": "warmup", "stage2": "jeidnn"}
GROUP_NAMES = {
    "backbone": "stage 0 / joint phase and the feature cache",
    "warmup": "stage 1 (IM warm-up)",
    "stage2": "stage 2 (learned gates)",
}


def stage_hashes(cfg: RunConfig) -> dict[str, str]:
    """One hash per stage group, chained: a group's hash covers its own config part and every earlier one,
    so a changed part changes the hash of its group and of each later group."""
    data = training_config(cfg)
    parts = {name: data.pop(section, None) for name, section in GROUP_SECTION.items()}
    hashes, previous = {}, _hash(data)
    hashes["backbone"] = previous
    for name, part in parts.items():
        previous = _hash([previous, part])
        hashes[name] = previous
    return hashes


def first_changed(old: dict[str, str], new: dict[str, str]) -> str | None:
    """The first stage group (run order) whose hash differs; None when none does."""
    return next((group for group in STAGE_GROUPS if old.get(group) != new[group]), None)


def _in_group(stage: str, group: str) -> bool:
    return any(stage == s or (s.endswith(":") and stage.startswith(s)) for s in STAGE_GROUPS[group])


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
    stage_hashes: dict[str, str] | None = None
    """Per stage group (:data:`STAGE_GROUPS`), the hash of the config part it read; None in a state.json
    written before per-stage hashes."""
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
            hashes = data.get("stage_hashes")
            return cls(
                data["config_hash"],
                dict(hashes) if hashes is not None else None,
                list(data["done"]),
                dict(data["timings"]),
                dict(data["info"]),
            )
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
        redo = "; --resume true redoes stage 1 / stage 2 when the warmup / jeidnn settings changed"
        raise JeidnnError(
            f"run folder {run_dir} already holds {state}; {hint}choose another --name "
            f"or pass --overwrite true{redo if finished else ''}"
        )
    if not exists:
        if cfg.resume:
            logger.info("nothing to resume in %s; starting the run", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = RunState(config_hash(cfg), stage_hashes(cfg), run_dir=run_dir)
        state.write()  # first: a folder with it can always be resumed
        write_text(run_dir / "config.yaml", cfg.to_yaml())
        return state
    state = RunState.read(run_dir)
    if state is None:
        raise JeidnnError(
            f"run folder {run_dir} has no {STATE_FILE} (an older jeidnn made it, or it is no run); it "
            "cannot be resumed: pass --overwrite true or choose another --name"
        )
    new = stage_hashes(cfg)
    changed = first_changed(_recorded_hashes(state, run_dir), new)
    if changed is None and state.finished("report"):
        raise JeidnnError(
            f"run folder {run_dir} holds a finished run; nothing to resume. `jeidnn evaluate {run_dir}` "
            "recomputes its evaluation"
        )
    if changed == "backbone":
        raise JeidnnError(_config_mismatch(run_dir, cfg))
    state.run_dir = run_dir
    if changed is not None:
        _redo_from(state, changed, run_dir)
    state.config_hash, state.stage_hashes = config_hash(cfg), new
    state.write()
    write_text(run_dir / "config.yaml", cfg.to_yaml())  # eval / export / later stages' settings may differ
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    logger.info("resuming %s (%s)", run_dir, _describe(state))
    return state


def _recorded_hashes(state: RunState, run_dir: Path) -> dict[str, str]:
    """The per-stage hashes of the config the folder's stages ran with. A state.json from before them has
    one hash of the whole config: its groups are read from the folder's config.yaml, once that is shown to
    be the config the hash was taken of."""
    if state.stage_hashes is not None:
        return state.stage_hashes
    refuse = (
        f"{run_dir / STATE_FILE} predates per-stage hashes and {run_dir / 'config.yaml'} %s; resume with "
        "the config the run started with, pass --overwrite true, or choose another --name"
    )
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        old = config_from_dict(raw)
    except (OSError, yaml.YAMLError, JeidnnError, TypeError, ValueError, AttributeError) as exc:
        raise JeidnnError(refuse % f"cannot be read ({first_line(exc)})") from None
    # The file as written, not as parsed now: settings added since then would change the parsed hash.
    written = {
        _hash({k: v for k, v in raw.items() if k not in keys}) for keys in (LEGACY_NOT_HASHED, NOT_HASHED)
    }
    if state.config_hash not in written:
        raise JeidnnError(refuse % "is not the config its hash was taken of")
    return stage_hashes(old)


def _redo_from(state: RunState, group: str, run_dir: Path) -> None:
    """Forget `group` and every later stage (their entries, timings and files), so the run redoes them."""
    groups = list(STAGE_GROUPS)
    redo = groups[groups.index(group) :]
    kept = [s for s in state.done if s != "report" and not any(_in_group(s, g) for g in redo)]
    logger.info(
        "resuming %s with changed settings of %s: reusing %s; redoing %s and the evaluation",
        run_dir,
        GROUP_NAMES[group],
        ", ".join(GROUP_NAMES[g] for g in groups if g not in redo) or "nothing",
        ", ".join(GROUP_NAMES[g] for g in redo),
    )
    state.done = kept
    # Timings are named "stage 1: ..." / "stage 2...": the redone stages' go with them.
    prefixes = tuple({"warmup": "stage 1", "stage2": "stage 2"}[g] for g in redo)
    state.timings = {k: v for k, v in state.timings.items() if not k.startswith(prefixes)}
    for leftover in ("checkpoints/stage2", "checkpoints/learned", "predictions/learned"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    for leftover in ("report.json", "report.partial.json"):
        (run_dir / leftover).unlink(missing_ok=True)


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
        f"--resume true: {what}; the backbone stages cannot be reused with it: resume with the config the "
        "run started with (eval, export, devices, output_dir and name may change; warmup and jeidnn redo "
        "stage 1 / stage 2), or choose another --name"
    )


def worker_state(cfg: RunConfig) -> RunState:
    """The state a process other than the first plans with: the folder's when resuming, else a fresh one.

    Read once at start: the first process only records a stage after every process has done its share.
    """
    if cfg.resume and not cfg.overwrite:
        state = RunState.read(cfg.run_dir)
        if state is not None:
            return state
    return RunState(config_hash(cfg), stage_hashes(cfg))


def mark_failed(run_dir: Path, stage: str, exc: BaseException, state: RunState) -> None:
    """Leave a FAILED marker saying which stage failed; every finished artifact stays."""
    reason = first_line(exc) if str(exc) else ""
    write_text(
        run_dir / FAILED_FILE,
        f"{stage} failed: {type(exc).__name__}{': ' + reason if reason else ''}\n"
        f"{_describe(state)}; fix the cause and pass --resume true to continue from there\n",
    )
