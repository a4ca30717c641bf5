"""`jeidnn export`: any method's operating point of a finished run as a deployable early-exit model.

The operating point is the configuration the run's budgeted evaluation chose for the method at the budget
(:mod:`jeidnn.export.operating_point`), so the exported model leaves where that row of report.md leaves, on
calib and on test; which method is exported is ``export.selection``'s (:mod:`jeidnn.export.selection`). Its
conformal quantiles are fitted on calib half B with exit groups from the calib-A exit counts (a certified
operating point: by its certificate), for every ``eval.alphas`` and the model's default level. The folder
gets a model card, ``README.md`` (:mod:`jeidnn.export.card`).

What each method exports:

* a learned method (report.json ``learned``): one stage-2 model's heads and gates and its exit threshold
  (0.5 for ``native`` methods, chosen on calib for ``calib_threshold`` ones); ``--lam`` fixes the model;
* ``threshold_maxprob|entropy|margin``: threshold gates with the budgeted-batch thresholds fitted on calib
  half A; ``global_maxprob``: one threshold at every exit; ``threshold_search``: the searched thresholds;
  ``jeidnn_ims_threshold_maxprob``: max-prob thresholds on a ``jeidnn_paper`` model's IMs;
* ``patience``: PABEE patience gates; ``static``: every sample at the chosen layer.

Baselines use the warm-up IMs; every model shares the run's fine-tuned backbone (``backbone/``), except a
learned model trained end to end (``jeidnn.train_backbone``), which brings its own in its checkpoint (so do
thresholds on its IMs). ``python train.py`` exports the run's ``export.selection``
(:func:`jeidnn.export.selection.default_choice`) to ``runs/<name>/model/``.

    jeidnn export runs/default                      # the run's export.selection (default: best on val)
    jeidnn export runs/default --method threshold_search --budget 0.5
    jeidnn export runs/default --method jeidnn_paper --lam 0.01 --out my-model
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError, first_line
from jeidnn.evaluate.selection import Evaluation
from jeidnn.export.card import write_card
from jeidnn.export.operating_point import OperatingPoint, Run
from jeidnn.export.selection import default_choice, select
from jeidnn.io import atomic_folder, json_safe
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHeads

__all__ = ["build_model", "export_run", "export_trained", "load_backbone"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the model's parts


def _weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise JeidnnError(f"{path} not found; re-run training for this run (it keeps every model's weights)")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise JeidnnError(f"cannot read {path}: {first_line(exc)}; re-run training for this run") from None


def _load(module: nn.Module, weights: Mapping[str, Tensor], prefix: str, path: Path) -> None:
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise JeidnnError(
            f"{path} does not fit this run's exits ({first_line(exc)}); re-run training"
        ) from None


def _new_heads(run: Run, backbone: Backbone) -> ExitHeads:
    return ExitHeads(
        list(run.report["exits"]["layers"]),
        backbone.hidden_size,
        len(run.report["dataset"]["labels"]),
        backbone.family.head_activation,
        im_head=run.report["backbone"].get("im_head", "mlp"),
    )


def _learned_parts(run: Run, method: str, k: int, backbone: Backbone, trained: Mapping | None):
    """Heads, gates and own backbone (a state dict; None = the run's shared one) of model ``k`` of a learned
    method: in memory after training, else its checkpoint."""
    from jeidnn.config.gating import GateSettings
    from jeidnn.model.gates import Gates

    settings = run.learned[method]["settings"]
    if trained is not None:
        model = trained[settings["name"]][k]
        return model.heads, model.gates, model.backbone
    path = run.folder / "checkpoints" / "learned" / settings["name"] / f"{k}.safetensors"
    weights = _weights(path)
    heads = _new_heads(run, backbone)
    _load(heads, weights, "heads.", path)
    gates = Gates(len(heads.layers), GateSettings.from_dict(settings, extra=True), backbone.hidden_size)
    _load(gates, weights, "gates.", path)
    own = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
    return heads, gates, own or None


def _with_weights(backbone: Backbone, own: Mapping[str, Tensor] | None, method: str) -> Backbone:
    """``backbone``, or a copy of it holding the own backbone weights ``own`` of a model of ``method``."""
    if own is None:
        return backbone
    copied = copy.deepcopy(backbone)
    try:
        copied.model.load_state_dict(own)
    except RuntimeError as exc:
        raise JeidnnError(
            f"the backbone {method}'s model trained end to end does not fit the run's ({first_line(exc)}); "
            "re-run training"
        ) from None
    return copied


def exit_parts(
    run: Run,
    point: OperatingPoint,
    backbone: Backbone,
    trained: Mapping | None = None,
    warmup_heads: ExitHeads | None = None,
) -> tuple[Backbone, ExitHeads, nn.Module, float | None]:
    """The backbone, the heads, the gates and (learned gates only) the exit threshold that play ``point``.

    The backbone is ``backbone`` (the run's shared one) unless the model was trained end to end.
    ``trained`` (stage 2's models per variant) and ``warmup_heads`` are the training run's objects in
    memory; without them the weights are read from the run's ``checkpoints/``.
    """
    if point.kind == "learned":
        heads, gates, own = _learned_parts(run, point.method, point.param["model"], backbone, trained)
        return _with_weights(backbone, own, point.method), heads, gates, float(point.param["tau"])
    own, reads = None, point.choice.spec.reads
    if reads is not None:  # thresholds on a learned model's IMs
        heads, _, own = _learned_parts(run, reads, point.param["model"], backbone, trained)
    elif warmup_heads is not None:
        heads = warmup_heads
    else:
        path = run.folder / "checkpoints" / "warmup_heads.safetensors"
        heads = _new_heads(run, backbone)
        _load(heads, _weights(path), "", path)
    return _with_weights(backbone, own, reads or point.method), heads, point.choice.rule_gates(), None


def load_backbone(run: Run, dtype: str = "auto") -> tuple[Backbone, Any]:
    """The run's fine-tuned backbone and preprocessor: from ``backbone/`` if there, else from ``model/``;
    in ``dtype`` (``auto`` = the dtype the run served it in, report.json ``backbone.dtype``)."""
    from jeidnn.hf.modeling import EarlyExitModel
    from jeidnn.model.early_exit import _no_progress_bars
    from jeidnn.train.devices import torch_dtype

    if dtype == "auto":
        dtype = run.report["backbone"].get("dtype", "auto")  # runs before model.dtype: the saved one
    loaded: Any = "auto" if dtype == "auto" else torch_dtype(dtype, "--dtype")

    folder = run.folder / "backbone"
    if (folder / "config.json").is_file():
        from transformers import AutoImageProcessor, AutoModel

        from jeidnn.model.preprocess import load_saved_tokenizer

        info = run.report["backbone"]
        try:
            with _no_progress_bars():
                model = AutoModel.from_pretrained(folder, dtype=loaded)
                backbone = Backbone(
                    model, info.get("name", str(folder)), info["pooling"], info.get("exit_norm")
                )
                if backbone.modality == "text":
                    return backbone, load_saved_tokenizer(folder)
                return backbone, AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise JeidnnError(f"cannot load the fine-tuned backbone in {folder}: {first_line(exc)}") from None
    if (run.folder / "model").is_dir():
        model = EarlyExitModel.from_pretrained(run.folder / "model", dtype=loaded)
        return model.backbone, model.preprocessor
    raise JeidnnError(
        f"{run.folder} has neither backbone/ nor model/ (the fine-tuned backbone); re-run training"
    )


# --------------------------------------------------------------------------- the model


def build_model(
    run: Run,
    point: OperatingPoint,
    backbone: Backbone,
    preprocessor: Any,
    alpha: float | None = None,
    trained: Mapping | None = None,
    warmup_heads: ExitHeads | None = None,
) -> tuple[Any, dict]:
    """The early-exit model that plays ``point``, and the summary of the choice (kept as its metadata).

    Args:
        alpha: the model's default conformal level (default ``export.alpha``); quantiles are fitted for it
            and for every ``eval.alphas``.
        trained, warmup_heads: see :func:`exit_parts`.

    Returns:
        The model (eval mode) and ``{method, label, kind, param, budget, selection, calib_cost,
        calib_accuracy, val_accuracy, val_cost, test_accuracy, test_cost, test_exit_fractions, chosen_by,
        considered, guarantee, conformal_alphas, conformal_fit, conformal_groups}``, plus ``lambda``,
        ``model_index`` and ``exit_threshold`` where they apply. ``considered``: what the selection
        compared (per method: param, calib-A and val accuracy and cost, or why it was skipped);
        ``guarantee``: the certificate (``selection: guarantee``), else None.
    """
    from jeidnn.hf.modeling import EarlyExitModel

    cfg = run.cfg
    alpha = cfg.export.alpha if alpha is None else float(alpha)
    if not 0 < alpha < 1:
        raise JeidnnError(f"--alpha must lie strictly between 0 and 1, got {alpha}")
    backbone, heads, gates, tau = exit_parts(run, point, backbone, trained, warmup_heads)
    alphas = sorted(set(cfg.eval.alphas) | {alpha})
    quantiles, groups = point.conformal(alphas, cfg.eval.conformal_min_samples)
    param = json_safe(point.param)
    trained_model = isinstance(param, dict) and "model" in param  # learned, or thresholds on learned IMs
    model_of = {"lambda": param["lambda"], "model_index": param["model"]} if trained_model else {}
    summary = {
        "method": point.method,
        "label": point.label,
        "kind": point.kind,
        "param": param,
        "budget": point.budget,
        **model_of,
        **({"exit_threshold": tau} if tau is not None else {}),
        "selection": point.selection,
        "calib_cost": point.candidate.calib_cost,
        "calib_accuracy": point.candidate.calib_accuracy,
        **point.val_metrics(),
        **point.test_metrics(),
        "chosen_by": point.chosen_by,
        "considered": point.considered,
        "guarantee": None if point.certificate is None else json_safe(point.certificate.to_dict()),
        "conformal_alphas": alphas,
        "conformal_fit": point.conformal_fit,
        "conformal_groups": groups,
    }
    # Learned models pay for their gates too (report.json learned.<method>.costs).
    costs = run.learned[point.method]["costs"] if point.kind == "learned" else run.costs
    model = EarlyExitModel.from_parts(
        backbone,
        heads,
        gates,
        preprocessor,
        labels=run.report["dataset"]["labels"],
        costs=costs,
        conformal_quantiles=quantiles,
        max_length=cfg.model.max_length,
        exit_threshold=0.5 if tau is None else tau,
        default_alpha=alpha,
        metadata={**summary, "run": cfg.name, "gflops_full": run.report["backbone"].get("gflops_full")},
    )
    return model.eval(), summary


def _log_choice(run: Run, point: OperatingPoint, summary: dict) -> None:
    for row in point.considered if point.selection == "budget" else []:
        if "skipped" in row:
            log.info("  %-30s skipped: %s", row["method"], row["skipped"])
        else:
            log.info(
                "  %-30s val accuracy %.4f, cost %.4f (calib A %.4f, %.4f)",
                row["method"], row["val_accuracy"], row["val_cost"], row["calib_accuracy"], row["calib_cost"],
            )  # fmt: skip
    log.info("method %s (%s), param %s", point.method, point.label, json.dumps(summary["param"]))
    log.info("chosen (selection %s): %s", point.selection, point.chosen_by)
    log.info("calib half A: accuracy %.4f, cost %.4f", summary["calib_accuracy"], summary["calib_cost"])
    rows = run.report.get("summary", {}).get("budgeted", {}).get("rows", [])
    row = None
    if point.budget is not None and not point.by_lambda:
        row = next((r for r in rows if r["method"] == point.method and r["budget"] == point.budget), None)
    fractions = ", ".join(f"{f:.3f}" for f in summary["test_exit_fractions"])
    log.info(
        "test (%s): accuracy %.4f, cost %.4f, exit fractions [%s]",
        f"the evaluation's row at budget {point.budget:g}" if row else "not a row of report.md",
        summary["test_accuracy"],
        summary["test_cost"],
        fractions,
    )
    if row and (row["param"] != summary["param"] or row["accuracy"] != summary["test_accuracy"]):
        log.warning(
            "report.json's row plays param %s (test accuracy %s): it was written by another version of "
            "jeidnn; `jeidnn evaluate %s` refreshes it",
            json.dumps(row["param"]),
            row["accuracy"],
            run.folder,
        )


def export_run(
    run_dir: str | Path,
    method: str | None = None,
    *,
    selection: str | None = None,
    budget: float | None = None,
    lam: float | None = None,
    alpha: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
) -> dict:
    """Export an operating point of a finished run (default: what ``python train.py`` exports), with its
    model card.

    Args:
        run_dir: ``runs/<name>/``.
        method: any learned or baseline method of the run (the oracle excepted); implies ``selection``
            ``method``.
        selection: ``budget``, ``guarantee`` or ``method`` (:mod:`jeidnn.export.selection`; default: the
            run's ``export.selection``, or ``method`` with ``method``).
        budget: calib-A cost budget (default: the run's ``export.cost_budget``).
        lam: learned methods only, instead of ``budget``: the λ of the model to export.
        alpha: default conformal level saved with the model (default: ``export.alpha``).
        out: output folder (default ``runs/<name>/export/<method>-<budget>``, or ``<method>-lam<λ>``).
        overwrite: replace an existing ``out``.
        dtype: the exported backbone's dtype, ``float32``, ``bfloat16`` or ``float16`` (``auto`` = the one
            the run evaluated; exit heads and gates stay float32).

    Returns:
        The summary of :func:`build_model` and ``path``, the folder written.

    Raises:
        JeidnnError: a bad run folder, selection, method, budget, λ, α or output folder; nothing is
            written then.

    Example:
        >>> export_run("runs/default", "patience", budget=0.5)["param"]  # doctest: +SKIP
        2
    """
    if budget is not None and lam is not None:
        raise JeidnnError(
            "pass --budget or --lam, not both: --lam fixes the model and uses export.cost_budget"
        )
    if lam is not None and method is None:
        raise JeidnnError("--lam picks a model of one learned method: name it with --method")
    from jeidnn.train.devices import torch_dtype

    if dtype != "auto":
        torch_dtype(dtype, "--dtype")  # refused before any work
    run = Run.open(run_dir)
    point = select(run, selection, method=method, budget=budget, lam=lam)
    if out is None:
        g = run.cfg.export.guarantee
        if point.selection == "guarantee":
            tag = f"{g.risk}-eps{g.epsilon:g}-delta{g.delta:g}"
        else:
            tag = f"lam{lam!r}" if lam is not None else f"{point.budget:g}"
        out = run.folder / "export" / f"{point.method}-{tag}"
    out = Path(out)
    if out.exists() and not overwrite:
        raise JeidnnError(f"{out} already exists; pass --overwrite or choose another --out")
    backbone, preprocessor = load_backbone(run, dtype)
    model, summary = build_model(run, point, backbone, preprocessor, alpha)
    _log_choice(run, point, summary)
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        write_card(tmp, run, model, summary)
    log.info("wrote %s", out)
    return {"path": str(out), **summary}


def export_trained(
    cfg: RunConfig,
    evaluation: Evaluation,
    run_dir: Path,
    backbone: Backbone,
    preprocessor: Any,
    *,
    trained: Mapping,
    warmup_heads: ExitHeads,
) -> dict:
    """The training run's export, from memory: the operating point ``export.selection`` picks among what
    ``evaluation`` chose (:func:`jeidnn.export.selection.default_choice`), written to ``runs/<name>/model/``
    with its model card."""
    run = Run(Path(run_dir), evaluation.report, cfg, evaluation)
    point = default_choice(run)
    model, summary = build_model(
        run, point, backbone, preprocessor, trained=trained, warmup_heads=warmup_heads
    )
    _log_choice(run, point, summary)
    # model/ belongs to the run: a run resumed after being killed while exporting replaces it.
    with atomic_folder(run.folder / "model", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        write_card(tmp, run, model, summary)
    return {"path": "model", **summary}
