"""Stage 3-4: evaluate a finished run folder (DESIGN.md §5-6) and write its report.

:func:`evaluate_run` reads ``runs/<name>/report.json``, ``config.yaml`` and the cached
per-exit predictions in ``predictions/``, fits everything that needs fitting (baseline
thresholds, temperatures, conformal quantiles) on the ``calib`` split, reports every
operating point on ``test``, and adds ``methods`` / ``summary`` / ``evaluation`` to report.json.

Choices worth knowing:

* Exit decisions always use raw probabilities; temperature scaling (per exit, fitted on
  calib for the IMs in question) only changes the reported confidences, so
  ``ece_temperature_scaled`` is the same exits and accuracy with recalibrated probabilities.
  Conformal sets use the raw probabilities.
* ``jeidnn_ims_threshold_maxprob`` puts max-prob thresholds on the IMs of ONE λ, the one the
  export picks on val (:func:`choose_lambda`), one point per p, ``param = {"lambda", "p"}``.
  Taking the envelope over every λ's IMs would pick the best of several models on test.
* GFLOPs per sample = mean normalised cost × ``backbone.gflops_full`` (the definition of the cost).
* ``fallback_exits`` are 0-based exit indices (the column in ``exits.layers``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from jeidnn import baselines as bl
from jeidnn.calibration import ReliabilityDiagram, apply_temperatures, fit_temperatures, reliability_diagram
from jeidnn.config import EvalConfig, ExportConfig, config_from_dict
from jeidnn.conformal import evaluate_sets
from jeidnn.errors import JeidnnError
from jeidnn.metrics import ExitHistogram, ExpectedCost, common_cost_range, envelope_auc, interpolate_envelope

__all__ = ["METHODS", "NOTES", "alpha_key", "choose_lambda", "evaluate_run"]


def choose_lambda(lambdas: list[float], val_costs: list[float], lam: float | None, budget: float) -> int:
    """Index of the λ to export: `lam` when given, else the λ whose val cost is closest to `budget`."""
    if lam is not None:
        return min(range(len(lambdas)), key=lambda i: abs(lambdas[i] - lam))
    return min(range(len(lambdas)), key=lambda i: abs(val_costs[i] - budget))


NOTES = [
    "Exit decisions use raw probabilities; ece_temperature_scaled keeps the same exits and rescales the "
    "reported probabilities with per-exit temperatures fitted on calib. Conformal sets use raw "
    "probabilities.",
    "Conformal quantiles, baseline thresholds and temperatures are fitted on calib; every number is on test.",
    "jeidnn points use exits.cost_with_gates; all other methods use exits.cost (IMs only).",
    "jeidnn_ims_threshold_maxprob uses the IMs of one lambda, chosen on val like the exported model "
    "(val cost closest to export.cost_budget, or export.lam), with one point per p.",
    "fallback_exits are 0-based exits with fewer calib samples than conformal_min_samples that some test "
    "samples take; they use the pooled quantile.",
    "gflops = mean normalised cost x backbone.gflops_full.",
    "The oracle (first correct exit) is an upper bound, excluded from the AUC cost range and comparisons.",
]

METHODS: dict[str, tuple[str, str]] = {
    "jeidnn": ("learned", "JEI-DNN (learned gates)"),
    "threshold_maxprob": ("threshold", "max-prob thresholds"),
    "threshold_entropy": ("threshold", "entropy thresholds"),
    "threshold_margin": ("threshold", "margin thresholds"),
    "global_maxprob": ("threshold", "global max-prob threshold"),
    "patience": ("patience", "patience (PABEE)"),
    "static": ("static", "static depth"),
    "oracle": ("oracle", "oracle (upper bound)"),
    "jeidnn_ims_threshold_maxprob": ("threshold", "JEI-DNN IMs + max-prob thresholds"),
}
"""name -> (kind, label). Order = order in report.json and the plots."""

_SPLIT_KEYS = ("calib", "test")


@dataclass
class _Split:
    logits: Tensor  # (N, L, C)
    probs: Tensor  # (N, L, C)
    labels: Tensor  # (N,)
    gates: Tensor | None = None  # (N, L - 1)


def _load_predictions(path: Path, with_gates: bool, num_exits: int) -> dict[str, _Split]:
    if not path.is_file():
        raise JeidnnError(
            f"missing predictions file {path}; re-run training for this run folder (it writes predictions/)"
        )
    tensors = load_file(str(path))
    need = [
        f"{s}_{k}" for s in _SPLIT_KEYS for k in ("logits", "labels") + (("gates",) if with_gates else ())
    ]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise JeidnnError(
            f"predictions file {path} lacks tensors {missing}; re-run training for this run folder"
        )
    splits = {}
    for s in _SPLIT_KEYS:
        logits = tensors[f"{s}_logits"].float()
        if logits.ndim != 3 or logits.shape[1] != num_exits:
            raise JeidnnError(
                f"{path}: `{s}_logits` has shape {tuple(logits.shape)}, expected (N, {num_exits}, C) to "
                f"match the {num_exits} exits in report.json"
            )
        gates = tensors[f"{s}_gates"].float() if with_gates else None
        splits[s] = _Split(logits, logits.softmax(dim=-1), tensors[f"{s}_labels"].long(), gates)
    return splits


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN/inf -> None, tensors and numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (Tensor, np.ndarray)):
        return _json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def alpha_key(alpha: float) -> str:
    """JSON key of a conformal level: 0.05 -> "0.05", 0.1 -> "0.1"."""
    return format(alpha, "g")


class _PointEvaluator:
    """Turns calib and test exits of one policy into one report point."""

    def __init__(
        self,
        splits: dict[str, _Split],
        costs: list[float],
        gflops_full: float | None,
        cfg: EvalConfig,
        temperatures: Tensor | None,
    ) -> None:
        self.calib, self.test = splits["calib"], splits["test"]
        self.costs = torch.tensor(costs, dtype=torch.float64)
        self.num_exits = len(costs)
        self.gflops_full = gflops_full
        self.cfg = cfg
        self.test_probs_ts = (
            apply_temperatures(self.test.logits, temperatures) if temperatures is not None else None
        )

    def __call__(
        self, param: Any, calib_exits: Tensor, test_exits: Tensor
    ) -> tuple[dict, ReliabilityDiagram]:
        t = self.test
        probs = bl.select_exit(t.probs, test_exits)  # (N, C) at the exit taken
        cost_metric, hist = ExpectedCost(self.costs), ExitHistogram(self.num_exits)
        cost_metric.update(test_exits)
        hist.update(test_exits)
        cost = float(cost_metric.compute())
        reliability = reliability_diagram(probs, t.labels, self.cfg.ece_bins)
        ece_ts = None
        if self.test_probs_ts is not None:
            ece_ts = reliability_diagram(
                bl.select_exit(self.test_probs_ts, test_exits), t.labels, self.cfg.ece_bins
            ).ece
        # Quantiles from the calib exits of this same policy, coverage and set size on test.
        calib_args = (bl.select_exit(self.calib.probs, calib_exits), self.calib.labels, calib_exits)
        test_args = (probs, t.labels, test_exits)
        min_samples = self.cfg.conformal_min_samples
        conformal = {
            alpha_key(a): evaluate_sets(*calib_args, *test_args, self.num_exits, a, min_samples)
            for a in self.cfg.alphas
        }
        point = {
            "param": param,
            "accuracy": float((probs.argmax(dim=1) == t.labels).double().mean()),
            "cost": cost,
            "gflops": cost * self.gflops_full if self.gflops_full is not None else None,
            "exit_fractions": hist.compute().tolist(),
            "ece": reliability.ece,
            "ece_temperature_scaled": ece_ts,
            "conformal": conformal,
        }
        return point, reliability


def _threshold_points(
    evaluate: _PointEvaluator,
    splits: dict[str, _Split],
    measure: bl.ConfidenceMeasure,
    ps: list[float],
    tag: Callable,
) -> tuple[list[dict], list[ReliabilityDiagram]]:
    """Budgeted-batch thresholds fitted on calib for each geometric target q_k ∝ p^k."""
    conf = {s: bl.confidence(splits[s].probs, measure) for s in _SPLIT_KEYS}  # (N, L) each
    num_exits = conf["calib"].shape[1]
    points, diagrams = [], []
    for p in ps:
        thresholds = bl.fit_budgeted_thresholds(conf["calib"], bl.geometric_exit_distribution(p, num_exits))
        exits = {s: bl.apply_thresholds(conf[s], thresholds) for s in _SPLIT_KEYS}
        point, diagram = evaluate(tag(p), exits["calib"], exits["test"])
        points.append(point)
        diagrams.append(diagram)
    return points, diagrams


def _policy_points(
    evaluate: _PointEvaluator,
    splits: dict[str, _Split],
    params: list,
    policy: Callable[[_Split, Any], Tensor],
) -> tuple[list[dict], list[ReliabilityDiagram]]:
    points, diagrams = [], []
    for param in params:
        point, diagram = evaluate(param, policy(splits["calib"], param), policy(splits["test"], param))
        points.append(point)
        diagrams.append(diagram)
    return points, diagrams


def _run_settings(
    run_dir: Path, alphas: list[float] | None, ece_bins: int | None
) -> tuple[EvalConfig, ExportConfig]:
    """The run's eval settings (with the caller's overrides) and export settings, from config.yaml."""
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
    sections = {k: loaded[k] for k in ("export", "jeidnn") if k in loaded}
    sections["eval"] = dict(loaded.get("eval") or {})
    if alphas is not None:
        sections["eval"]["alphas"] = list(alphas)
    if ece_bins is not None:
        sections["eval"]["ece_bins"] = ece_bins
    # Reuse the config loader's type checks and messages.
    cfg = config_from_dict(sections)
    return cfg.eval, cfg.export


def _matched_baseline(points: list[dict], cost: float, set_key: str, set_size: Callable) -> dict:
    """A baseline's envelope (by accuracy) interpolated at `cost`, carrying ECE and set size along."""
    costs, accs = [p["cost"] for p in points], [p["accuracy"] for p in points]

    def at(values: list) -> float:
        return float(
            interpolate_envelope(costs, accs, [cost], [np.nan if v is None else v for v in values])[0]
        )

    ece_raw = at([p["ece"] for p in points])
    ece_ts = at([p["ece_temperature_scaled"] for p in points])
    finite = [v for v in (ece_raw, ece_ts) if math.isfinite(v)]
    return {
        "accuracy": at(accs),
        "ece": ece_raw,
        "ece_temperature_scaled": ece_ts,
        # DESIGN.md §6: compare JEI-DNN with the better of raw and temperature-scaled.
        "ece_best": min(finite) if finite else None,
        set_key: at([set_size(p) for p in points]),
    }


def _summary(methods: dict[str, dict], alphas: list[float]) -> dict:
    """cost_range, AUC per method (oracle excluded) and the matched-cost rows (one per JEI-DNN point).

    Set sizes in the matched-cost rows are at α = 0.05, or at the middle configured α when 0.05 is absent
    (the key, ``set_size_<α>``, says which).
    """
    curves = {n: m["points"] for n, m in methods.items() if n != "oracle" and m["points"]}
    lo, hi = common_cost_range({n: [p["cost"] for p in pts] for n, pts in curves.items()})
    auc = {
        n: envelope_auc([p["cost"] for p in pts], [p["accuracy"] for p in pts], lo, hi)
        for n, pts in curves.items()
    }
    set_alpha = alpha_key(0.05 if 0.05 in alphas else alphas[len(alphas) // 2]) if alphas else None
    set_key = f"set_size_{set_alpha}"

    def set_size(point: dict) -> float | None:
        return point["conformal"][set_alpha]["mean_set_size"] if set_alpha else None

    matched = []
    for jp in methods.get("jeidnn", {}).get("points", []):
        row: dict[str, Any] = {
            "cost": jp["cost"],
            "lambda": jp["param"],
            "jeidnn": {"accuracy": jp["accuracy"], "ece": jp["ece"], set_key: set_size(jp)},
        }
        for name, pts in curves.items():
            if name != "jeidnn":
                row[name] = _matched_baseline(pts, jp["cost"], set_key, set_size)
        matched.append(row)
    baseline_auc = {n: v for n, v in auc.items() if n != "jeidnn" and math.isfinite(v)}
    return {
        "cost_range": [lo, hi],
        "auc": auc,
        "auc_note": "mean accuracy of each method's upper envelope over cost_range; oracle excluded",
        "best_baseline": max(baseline_auc, key=baseline_auc.get) if baseline_auc else None,
        "matched_cost": matched,
    }


def _reliability_panels(
    methods: dict, diagrams: dict[str, list[ReliabilityDiagram]], best: str | None
) -> list:
    """Reliability curves of up to three JEI-DNN points next to the best baseline's nearest-cost point."""
    panels = []
    jeidnn_pts = methods.get("jeidnn", {}).get("points", [])
    base_pts = methods[best]["points"] if best else []
    reference = "jeidnn" if jeidnn_pts else best
    if reference is None:
        return panels
    ref_pts = methods[reference]["points"]
    order = sorted(range(len(ref_pts)), key=lambda i: ref_pts[i]["cost"])
    chosen = sorted({order[0], order[len(order) // 2], order[-1]}, key=lambda i: ref_pts[i]["cost"])
    for i in chosen:
        curves = [(f"{METHODS[reference][1]}", diagrams[reference][i])]
        if reference == "jeidnn" and base_pts:
            j = min(range(len(base_pts)), key=lambda k: abs(base_pts[k]["cost"] - ref_pts[i]["cost"]))
            curves.append((f"{METHODS[best][1]} (cost {base_pts[j]['cost']:.2f})", diagrams[best][j]))
        panels.append({"title": f"cost {ref_pts[i]['cost']:.2f}", "curves": curves})
    return panels


def evaluate_run(
    run_dir: str | Path, *, alphas: list[float] | None = None, ece_bins: int | None = None, write: bool = True
) -> dict:
    """Evaluate all methods of a run folder on its test split and (optionally) write the report.

    Args:
        run_dir: ``runs/<name>/`` holding report.json, config.yaml and predictions/.
        alphas: conformal miscoverage levels (default: the run's ``eval.alphas``).
        ece_bins: ECE bins (default: the run's ``eval.ece_bins``).
        write: update report.json in place (atomically) and write report.md and the PNG plots.

    Returns:
        The full report dict, with ``methods``, ``summary`` and ``evaluation`` added.

    Raises:
        JeidnnError: the folder, report.json or a predictions file is missing or malformed.

    Example:
        >>> report = evaluate_run("runs/default")  # doctest: +SKIP
        >>> report["summary"]["auc"]["jeidnn"]  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise JeidnnError(
            f"run folder {run_dir} does not exist; pass the folder a training run wrote (runs/<name>)"
        )
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise JeidnnError(
            f"{report_path} not found; {run_dir} is not a finished training run, re-run training"
        )
    try:
        report = json.loads(report_path.read_text())
        costs, costs_gated = report["exits"]["cost"], report["exits"]["cost_with_gates"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise JeidnnError(
            f"{report_path} is malformed ({exc!r}); re-run training for this run folder"
        ) from None
    cfg, export = _run_settings(run_dir, alphas, ece_bins)
    num_exits = len(costs)
    layers = report["exits"].get("layers") or list(range(1, num_exits + 1))
    gflops_full = report.get("backbone", {}).get("gflops_full")
    lambdas = list(report.get("jeidnn_lambdas") or [])
    pred_dir = run_dir / "predictions"

    methods: dict[str, dict] = {}
    diagrams: dict[str, list[ReliabilityDiagram]] = {}

    def add(name: str, points_and_diagrams: tuple[list, list]) -> None:
        kind, label = METHODS[name]
        points, diags = points_and_diagrams
        entry = methods.setdefault(name, {"kind": kind, "label": label, "points": []})
        entry["points"].extend(points)
        diagrams.setdefault(name, []).extend(diags)

    # Warm-up IMs: every baseline.
    warm = _load_predictions(pred_dir / "warmup.safetensors", False, num_exits)
    warm_t = fit_temperatures(warm["calib"].logits, warm["calib"].labels)
    ev = _PointEvaluator(warm, costs, gflops_full, cfg, warm_t)
    for measure in ("maxprob", "entropy", "margin"):
        add(f"threshold_{measure}", _threshold_points(ev, warm, measure, cfg.threshold_ps, lambda p: p))

    def global_policy(s: _Split, t: float) -> Tensor:
        return bl.global_threshold_exits(bl.confidence(s.probs, "maxprob"), t)

    add("global_maxprob", _policy_points(ev, warm, cfg.global_thresholds, global_policy))
    patience = cfg.patience_values if cfg.patience_values is not None else list(range(0, num_exits))
    add("patience", _policy_points(ev, warm, patience, lambda s, t: bl.patience_exits(s.probs.argmax(-1), t)))
    exit_of_layer = {layer: exit_ for exit_, layer in enumerate(layers)}  # param = 1-based backbone layer

    def static_policy(s: _Split, layer: int) -> Tensor:
        return bl.static_exits(len(s.labels), exit_of_layer[layer])

    add("static", _policy_points(ev, warm, list(layers), static_policy))
    add(
        "oracle", _policy_points(ev, warm, [None], lambda s, _: bl.oracle_exits(s.probs.argmax(-1), s.labels))
    )
    methods["oracle"]["upper_bound"] = True

    # JEI-DNN: learned gates on the JEI-DNN-trained IMs, and the same IMs with thresholds.
    # Per-exit temperatures: warm-up IMs, and one list per λ (same order as jeidnn_lambdas).
    temperatures: dict[str, Any] = {"warmup": warm_t.tolist(), "jeidnn_ims": []}
    if lambdas:
        from jeidnn.gates import exit_decision  # lazy: the evaluation of baselines needs no gates

        val_costs = report.get("jeidnn_val_cost") or [0.0] * len(lambdas)
        chosen = choose_lambda(lambdas, val_costs, export.lam, export.cost_budget)

        for i, lam in enumerate(lambdas):
            jei = _load_predictions(pred_dir / f"jeidnn_{i}.safetensors", True, num_exits)
            ev_gated = _PointEvaluator(jei, costs_gated, gflops_full, cfg, None)
            add("jeidnn", _policy_points(ev_gated, jei, [lam], lambda s, _: exit_decision(s.gates)))
            jei_t = fit_temperatures(jei["calib"].logits, jei["calib"].labels)
            temperatures["jeidnn_ims"].append(jei_t.tolist())
            if i != chosen:
                continue
            ev_ims = _PointEvaluator(jei, costs, gflops_full, cfg, jei_t)
            tag = lambda p, lam=lam: {"lambda": lam, "p": p}  # noqa: E731
            add(
                "jeidnn_ims_threshold_maxprob",
                _threshold_points(ev_ims, jei, "maxprob", cfg.threshold_ps, tag),
            )

    methods = {name: methods[name] for name in METHODS if name in methods}
    summary = _summary(methods, cfg.alphas)
    report["methods"] = methods
    report["summary"] = summary
    report["evaluation"] = {
        "alphas": cfg.alphas,
        "ece_bins": cfg.ece_bins,
        "conformal_min_samples": cfg.conformal_min_samples,
        "threshold_ps": cfg.threshold_ps,
        "global_thresholds": cfg.global_thresholds,
        "patience_values": patience,
        "temperatures": temperatures,
        "notes": NOTES,
    }
    report = _json_safe(report)
    if write:
        tmp = report_path.with_name(report_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, report_path)  # atomic on POSIX: readers see the old or the new file, never half
        from jeidnn.report import write_report

        write_report(
            run_dir, report, reliability=_reliability_panels(methods, diagrams, summary["best_baseline"])
        )
    return report
