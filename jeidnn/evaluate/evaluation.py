"""Stages 3-4: evaluate a run's methods on test and write its report (docs/evaluation.md).

:func:`evaluate` takes the report dict the training run built (``exits``, ``backbone``,
``learned``...) and the cached per-exit predictions (:class:`RunPredictions`), and adds ``methods``
(every operating point of every method on test), ``summary`` and ``evaluation``.
:func:`evaluate_run` does the same for a finished run folder and writes report.json back.

Headline: ``summary.budgeted``, the test-blind budgeted protocol of :mod:`jeidnn.evaluate.budgeted`.
The ``methods`` points and the AUC / matched-cost views are the envelope on test, which picks
the best point per cost with test labels: optimistic, and labelled so.

Choices worth knowing:

* Exit decisions always use raw probabilities (or a learned model's exit scores); temperature
  scaling only changes the reported confidences, so ``ece_temperature_scaled`` keeps the same exits
  and accuracy. Conformal sets use the raw probabilities.
* Baseline thresholds are fitted on calib half A only; temperatures and conformal quantiles on half B.
* GFLOPs per sample = mean normalised cost × ``backbone.gflops_full`` (the definition of the cost).
* ``merged_groups`` hold 0-based exit indices (the column in ``exits.layers``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from tqdm.auto import tqdm

from jeidnn.config.parser import config_from_dict
from jeidnn.config.schema import EvalConfig, GuaranteeConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import (
    DEFAULT_BUDGETS,
    Candidate,
    Method,
    Settings,
    budgeted_rows,
    evaluate_config,
)
from jeidnn.evaluate.candidates import TAU_GRID
from jeidnn.evaluate.guarantees import DEFAULT_RESPLITS, guarantees_summary
from jeidnn.evaluate.metrics import envelope_summary
from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.evaluate.selection import Choice, Evaluation, build_methods
from jeidnn.io import json_safe, write_json

log = logging.getLogger(__name__)

__all__ = ["NOTES", "evaluate", "evaluate_run"]

ENVELOPE_NOTE = (
    "envelope on test (optimistic): `methods` points, `auc` and `matched_cost` take each method's best "
    "points per cost as measured on test; the test-blind comparison is `budgeted`."
)

NOTES = [
    "Headline: summary.budgeted. For each budget every method plays the configuration with the best "
    "calib-A accuracy among those with calib-A cost <= budget; temperatures and conformal quantiles are "
    "fitted on calib B; every number is on test. See docs/evaluation.md.",
    "reference_baseline at a budget is the non-learned method whose calib-A choice is the most accurate on "
    "val (calib A when the run kept no val predictions); headline compares the best learned method, picked "
    "the same way, with it. best_baseline is the test-best baseline, a maximum over noisy test estimates "
    "that favours the baselines. delta_vs_reference and delta_vs_best_baseline are paired bootstrap 95 % "
    "percentile intervals of test accuracy differences; a reference's own row has delta 0 [0, 0].",
    "Exit decisions use raw probabilities (learned models: exit scores); ece_temperature_scaled keeps the "
    "same exits with per-exit temperatures fitted on calib B. Conformal sets use raw probabilities.",
    "Conformal quantiles are per group of exits; merged_groups lists groups of several exits, merged "
    "because an exit had fewer calib-A samples than conformal_min_samples.",
    "Thresholds and taus of null stand for infinity (JSON has none): nobody exits early there.",
    "Learned methods use their own costs (IMs + gates); every other method uses exits.cost (IMs only).",
    "gflops = mean normalised cost x backbone.gflops_full.",
    "The oracle (first correct exit) is an upper bound, excluded from the budgeted rows, the AUC cost "
    "range and comparisons.",
]


def _settings(cfg: Any, seed: int, gflops_full: float | None) -> Settings:
    """Settings from an EvalConfig-like object; budgets / bootstrap / resplits default when absent."""
    budgets = list(getattr(cfg, "budgets", None) or DEFAULT_BUDGETS)
    bootstrap, resplits = getattr(cfg, "bootstrap", 1000), getattr(cfg, "resplits", 20)
    if not all(isinstance(b, (int, float)) and 0 < b for b in budgets):
        raise JeidnnError(f"Expected `eval.budgets` to be positive numbers but got {budgets}")
    for key, value in (("bootstrap", bootstrap), ("resplits", resplits)):
        if not isinstance(value, int) or value < 1:
            raise JeidnnError(f"Expected `eval.{key}` to be a positive integer but got {value!r}")
    return Settings(
        list(cfg.alphas),
        cfg.ece_bins,
        cfg.conformal_min_samples,
        budgets,
        bootstrap,
        resplits,
        seed,
        gflops_full,
    )


def _envelope_candidates(method: Method, chosen: dict) -> list[Candidate]:
    """Envelope points: learned methods at tau 0.5 only; threshold_search (made per budget) and methods with
    ``envelope_points: chosen`` as chosen per budget."""
    if method.kind == "learned":
        return [c for c in method.candidates_at(0.0) if c.param["tau"] == 0.5]
    if callable(method.candidates) or method.envelope_points == "chosen":
        picked = [cand for (_, name), (cand, _) in chosen.items() if name == method.name]
        return list({id(c): c for c in picked}.values())
    return method.candidates


def _reliability_panels(budgeted: dict, chosen: dict, labels: dict[str, str]) -> list[dict]:
    """At the budget nearest 0.5: each learned method's chosen config next to the reference baseline's."""
    budgets = [b for b in budgeted["budgets"] if any(k[0] == b for k in chosen)]
    if not budgets:
        return []
    budget = min(budgets, key=lambda b: abs(b - 0.5))
    rows = [r for r in budgeted["rows"] if r["budget"] == budget and r["accuracy"] is not None]
    best = next((r["reference_baseline"] for r in rows if r["reference_baseline"]), None)
    learned = [r["method"] for r in rows if r["kind"] == "learned"] or ([best] if best else [])
    panels = []
    for name in learned[:3]:
        curves = [(labels[name], chosen[(budget, name)][1])]
        if best and name != best:
            curves.append((f"{labels[best]} (reference baseline)", chosen[(budget, best)][1]))
        panels.append({"title": f"budget {budget:g}: {labels[name]}", "curves": curves})
    return panels


def evaluate(
    report: dict,
    run_dir: str | Path,
    cfg: Any,
    seed: int,
    *,
    predictions: RunPredictions,
    write_markdown: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Evaluate every method of a run in memory; report.json itself is left to the caller.

    Args:
        report: the training run's report dict (``exits``, ``backbone``, optional ``learned``).
        run_dir: the run folder, where report.md and the plots are written.
        cfg: the run's ``EvalConfig`` (``budgets``, ``bootstrap``, ``resplits`` default to 0.2..0.9,
            1000 and 20 when the object has no such attribute).
        seed: the run's seed; fixes the calib halves, the bootstrap and the conformal re-splits.
        predictions: the warm-up exits' and each learned model's predictions
            (:meth:`RunPredictions.from_training`, or :meth:`RunPredictions.read` for a run folder).
        write_markdown: write report.md and the PNG plots into ``run_dir``.
        progress: a progress bar over the configurations evaluated on test.

    Returns:
        ``report``: a copy of ``report`` (JSON-safe) with ``methods``, ``summary`` and ``evaluation`` added;
        ``chosen``: the configuration of each (budget, method) row of ``summary.budgeted``; ``methods``:
        every method's candidates, for a choice at another budget (:meth:`Evaluation.choice`).

    Raises:
        JeidnnError: a report entry is missing or malformed, or the predictions do not fit it.

    Example:
        >>> run_dir = Path("runs/default")  # doctest: +SKIP
        >>> predictions = RunPredictions.read(report, run_dir)  # doctest: +SKIP
        >>> out = evaluate(report, run_dir, cfg.eval, cfg.seed, predictions=predictions)  # doctest: +SKIP
        >>> out.report["summary"]["budgeted"]["rows"][0]["accuracy"]  # doctest: +SKIP
        >>> out.choice("patience", 0.5).param  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    try:
        report["exits"]["cost"]
    except (KeyError, TypeError):
        raise JeidnnError("report lacks exits.cost; re-run training for this run folder") from None
    settings = _settings(cfg, seed, report.get("backbone", {}).get("gflops_full"))
    built = build_methods(report, predictions, cfg, seed)
    methods, split = built.methods, built.split

    cache: dict = {}  # each candidate is evaluated on test once, whichever view asks
    budgeted, chosen = budgeted_rows(methods, split, settings, cache)
    envelope_candidates = {m.name: _envelope_candidates(m, chosen) for m in methods}
    out_methods: dict[str, dict] = {}
    total = sum(map(len, envelope_candidates.values()))
    with tqdm(total=total, desc="evaluate on test", unit="config", disable=not progress, leave=False) as bar:
        for m in methods:
            points = []
            for cand in envelope_candidates[m.name]:
                points.append(evaluate_config(cand, split, settings, cache)[0])
                bar.update()
            out_methods[m.name] = {
                "kind": m.kind,
                "label": m.label,
                "extension": m.extension,
                "points": points,
            }
            if m.settings is not None:
                out_methods[m.name]["settings"] = m.settings
    out_methods["oracle"]["upper_bound"] = True
    out = dict(report)
    out["methods"] = out_methods
    envelope = envelope_summary(out_methods, settings.alphas)
    out["summary"] = {"budgeted": budgeted, "envelope_note": ENVELOPE_NOTE, **envelope}
    guarantees = _guarantees(cfg)
    out["summary"]["guarantees"] = guarantees_summary(built, guarantees, seed) if guarantees else []
    out["evaluation"] = {
        "alphas": settings.alphas,
        "ece_bins": settings.ece_bins,
        "conformal_min_samples": settings.min_samples,
        **built.inputs.grids(),
        "tau_grid": TAU_GRID,
        "budgets": settings.budgets,
        "bootstrap": settings.bootstrap,
        "resplits": settings.resplits,
        "seed": seed,
        "guarantees": [dataclasses.asdict(g) for g in guarantees],
        "guarantee_resplits": DEFAULT_RESPLITS,
        "temperatures": built.temperatures,
        "notes": NOTES,
    }
    out = json_safe(out)
    if write_markdown:
        from jeidnn.evaluate.report import write_report

        panels = _reliability_panels(budgeted, chosen, {m.name: m.label for m in methods})
        write_report(run_dir, out, reliability=panels)
    choices = {key: Choice(built.specs[key[1]], key[0], cand, split) for key, (cand, _) in chosen.items()}
    return Evaluation(out, built, choices)


def _guarantees(cfg: Any) -> list[GuaranteeConfig]:
    """``eval.guarantees`` as GuaranteeConfig objects (a settings namespace holds them as dicts)."""
    items = getattr(cfg, "guarantees", None) or []
    return [g if isinstance(g, GuaranteeConfig) else GuaranteeConfig(**g) for g in items]


_NEW_EVAL_KEYS = {"budgets": None, "bootstrap": 1000, "resplits": 20}


def _run_settings(run_dir: Path, alphas: list[float] | None, ece_bins: int | None) -> tuple[Any, int]:
    """The run's eval settings (with the caller's overrides) and seed, from config.yaml."""
    loaded: Any = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise JeidnnError(f"{config_path} is not valid YAML ({first}); fix or delete it") from None
    if not isinstance(loaded, dict):
        loaded = {}
    section = dict(loaded.get("eval") or {})
    if alphas is not None:
        section["alphas"] = list(alphas)
    if ece_bins is not None:
        section["ece_bins"] = ece_bins
    # Keys this EvalConfig may not know yet are read here; the rest goes through the config loader's checks.
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    extra = {k: section.pop(k) for k in list(section) if k in _NEW_EVAL_KEYS and k not in known}
    sections = {"eval": section, **({"seed": loaded["seed"]} if "seed" in loaded else {})}
    cfg = config_from_dict(sections)
    values = {**{k: v for k, v in _NEW_EVAL_KEYS.items() if k not in known}, **extra}
    eval_cfg = SimpleNamespace(**dataclasses.asdict(cfg.eval), **values) if values else cfg.eval
    return eval_cfg, cfg.seed


def evaluate_run(
    run_dir: str | Path,
    *,
    alphas: list[float] | None = None,
    ece_bins: int | None = None,
    write: bool = True,
    progress: bool = False,
) -> dict:
    """Evaluate all methods of a run folder on its test split and (optionally) write the report.

    Args:
        run_dir: ``runs/<name>/`` holding report.json, config.yaml and predictions/.
        alphas: conformal miscoverage levels (default: the run's ``eval.alphas``).
        ece_bins: ECE bins (default: the run's ``eval.ece_bins``).
        write: update report.json in place (atomically) and write report.md and the PNG plots.
        progress: a progress bar over the configurations evaluated on test.

    Returns:
        The full report dict, with ``methods``, ``summary`` and ``evaluation`` added.

    Raises:
        JeidnnError: the folder, report.json or a predictions file is missing or malformed.

    Example:
        >>> report = evaluate_run("runs/default")  # doctest: +SKIP
        >>> report["summary"]["budgeted"]["rows"][0]  # doctest: +SKIP
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise JeidnnError(
            f"run folder {run_dir} does not exist; pass the folder a training run wrote (runs/<name>)"
        )
    report_path = run_dir / "report.json"
    source = report_path
    if not report_path.is_file():
        # A run that failed in stages 3-4 kept what training finished: evaluate that.
        source = run_dir / "report.partial.json"
        if not source.is_file():
            raise JeidnnError(
                f"{report_path} not found; {run_dir} is not a trained run: re-run training (or continue it "
                "with --resume true)"
            )
        log.warning(
            "%s did not finish (no report.json): evaluating the trained stages from %s; its model was not "
            "exported, `python train.py ... --resume true` finishes the run",
            run_dir,
            source.name,
        )
    try:
        report = json.loads(source.read_text())
        report["exits"]["cost"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise JeidnnError(f"{source} is malformed ({exc!r}); re-run training for this run folder") from None
    cfg, seed = _run_settings(run_dir, alphas, ece_bins)
    predictions = RunPredictions.read(report, run_dir)
    evaluation = evaluate(
        report, run_dir, cfg, seed, predictions=predictions, write_markdown=write, progress=progress
    )
    if write:
        write_json(report_path, evaluation.report)
    return evaluation.report
