"""A run's cached predictions, as the evaluation reads them: the warm-up exits' and each learned model's.

:class:`RunPredictions` holds them in memory: :meth:`RunPredictions.from_training` takes what training
returned (``python train.py``), :meth:`RunPredictions.read` reads a finished run folder's ``predictions/``
(``jeidnn evaluate RUN``, ``jeidnn export RUN``). The candidate builders read them as :class:`Source` objects.

Example:
    >>> predictions = RunPredictions.read(report, Path("runs/default"))  # doctest: +SKIP
    >>> predictions.warmup_source(len(report["exits"]["cost"])).labels["test"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file
from torch import Tensor

from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import Source

if TYPE_CHECKING:
    from jeidnn.train.results import Stage2Result, WarmupResult

__all__ = ["WARMUP_PREDICTIONS", "RunPredictions", "learned_entry"]

WARMUP_PREDICTIONS = "predictions/warmup.safetensors"
"""Where a run keeps the warm-up exits' predictions, relative to its folder."""

EVAL_SPLITS = ("calib", "test")
"""The splits the evaluation needs. `val` is read too where the run kept it (every run since val
predictions were written): the evaluation picks the reference baseline and the exported method on it."""
OPTIONAL_SPLITS = ("val",)

Tensors = Mapping[str, Tensor]
"""One set of exits' predictions: ``<split>_logits`` ``(N, L, C)``, ``<split>_labels`` ``(N,)`` and, for a
learned model, ``<split>_scores`` ``(N, L-1)``."""


@dataclass(frozen=True)
class RunPredictions:
    """Every set of exits' predictions of one run, in memory."""

    warmup: Tensors
    """The warm-up exits' (``predictions/warmup.safetensors``)."""
    learned: dict[str, list[Tensors]] = field(default_factory=dict)
    """Per learned method name, per model index (report.json's ``models`` order, λ ascending)."""

    @classmethod
    def from_training(cls, warm: WarmupResult, stage2: Stage2Result | None, report: dict) -> RunPredictions:
        """What stage 1 and stage 2 (None: off) returned, as the run also wrote it to ``predictions/``.

        ``report``: the training report; each of its learned methods reads the models of the stage 2 variant
        its ``settings.name`` names (a ``native`` variant's ``<name>_tau`` method shares that variant's).
        """
        learned = {}
        if stage2 is not None:
            for name, entry in (report.get("learned") or {}).items():
                learned[name] = list(stage2.predictions[entry["settings"]["name"]])
        return cls(warm.tensors(), learned)

    @classmethod
    def read(cls, report: dict, run_dir: str | Path) -> RunPredictions:
        """Read the predictions files of a run folder: the warm-up exits' and those of each model of each
        learned method of ``report`` (its ``models[k]["file"]``).

        Raises:
            JeidnnError: report.json's exits or learned entries are malformed; a file is missing, lacks a
                tensor or has the wrong shape for report.json's exits.
        """
        run_dir = Path(run_dir)
        num_exits = _num_exits(report)
        warmup = _read(run_dir, WARMUP_PREDICTIONS, num_exits, False)
        learned, files = {}, {}  # a `native` variant's `<name>_tau` method reads the same files: once
        for name in report.get("learned") or {}:
            entry = learned_entry(report, name)
            for model in entry["models"]:
                if model["file"] not in files:
                    files[model["file"]] = _read(run_dir, model["file"], len(entry["costs"]), True)
            learned[name] = [files[model["file"]] for model in entry["models"]]
        return cls(warmup, learned)

    def warmup_source(self, num_exits: int) -> Source:
        """The warm-up exits' predictions on calib and test."""
        return _source(self.warmup, num_exits, False, "the warm-up predictions")

    def learned_sources(self, report: dict, method: str) -> list[Source]:
        """The predictions of each model of the learned method ``method``, in the order of its ``models``."""
        entry = learned_entry(report, method)
        models = self.learned.get(method, [])
        if len(models) != len(entry["models"]):
            raise JeidnnError(
                f"learned method {method!r} has {len(entry['models'])} models in the report but "
                f"{len(models)} in its predictions; re-run training for this run folder"
            )
        where = lambda k: f"the predictions of learned method {method!r} model {k}"  # noqa: E731
        return [_source(t, len(entry["costs"]), True, where(k)) for k, t in enumerate(models)]


def learned_entry(report: dict, method: str) -> dict:
    """report.json's ``learned[method]``, checked: its operating point, costs and models."""
    try:
        entry = report["learned"][method]
    except (KeyError, TypeError):
        known = sorted((report.get("learned") or {}).keys())
        raise JeidnnError(f"report.json has no learned method {method!r}; learned methods: {known}") from None
    for key in ("operating_point", "costs", "models"):
        if key not in entry:
            raise JeidnnError(f"report.json learned method {method!r} lacks `{key}`; re-run training")
    if entry["operating_point"] not in ("native", "calib_threshold"):
        raise JeidnnError(
            f"learned method {method!r}: operating_point must be 'native' or 'calib_threshold', got "
            f"{entry['operating_point']!r}"
        )
    if not entry["models"]:
        raise JeidnnError(f"learned method {method!r} has no models; re-run training")
    return entry


def _num_exits(report: dict) -> int:
    try:
        return len(report["exits"]["cost"])
    except (KeyError, TypeError):
        raise JeidnnError("report lacks exits.cost; re-run training for this run folder") from None


def _read(run_dir: Path, rel_path: str, num_exits: int, with_scores: bool) -> dict[str, Tensor]:
    """One predictions file's tensors, checked against the report's exits."""
    path = run_dir / rel_path
    if not path.is_file():
        raise JeidnnError(f"missing predictions file {path}; re-run training for this run folder")
    data = load_file(str(path))
    _check(data, num_exits, with_scores, f"predictions file {path}")
    return data


def _check(
    data: Tensors, num_exits: int, with_scores: bool, where: str, splits: tuple[str, ...] = EVAL_SPLITS
) -> None:
    keys = ("logits", "labels") + (("scores",) if with_scores else ())
    missing = [f"{s}_{k}" for s in EVAL_SPLITS for k in keys if f"{s}_{k}" not in data]
    if missing:
        raise JeidnnError(f"{where} lacks tensors {missing}; re-run training for this run folder")
    for s in splits:
        logits, labels = data[f"{s}_logits"], data[f"{s}_labels"]
        if logits.ndim != 3 or logits.shape[1] != num_exits or labels.shape != (len(logits),):
            raise JeidnnError(
                f"{where}: `{s}_logits` has shape {tuple(logits.shape)} and `{s}_labels` "
                f"{tuple(labels.shape)}, expected (N, {num_exits}, C) and (N,) for the {num_exits} exits "
                "in report.json"
            )
        if with_scores and data[f"{s}_scores"].shape != (len(labels), num_exits - 1):
            raise JeidnnError(
                f"{where}: `{s}_scores` has shape {tuple(data[f'{s}_scores'].shape)}, expected "
                f"({len(labels)}, {num_exits - 1})"
            )


def _source(data: Tensors, num_exits: int, with_scores: bool, name: str) -> Source:
    """``data`` on calib, test and (where kept) val as a :class:`Source` (float logits, long labels)."""
    keys = ("logits", "labels") + (("scores",) if with_scores else ())
    splits = EVAL_SPLITS + tuple(s for s in OPTIONAL_SPLITS if all(f"{s}_{k}" in data for k in keys))
    _check(data, num_exits, with_scores, name, splits)
    logits = {s: data[f"{s}_logits"].float() for s in splits}
    labels = {s: data[f"{s}_labels"].long() for s in splits}
    scores = {s: data[f"{s}_scores"].float() for s in splits} if with_scores else None
    return Source(name, logits, labels, scores)
