"""A structurally pruned copy of a finished run's early-exit model (the library behind `jeidnn prune`,
whose command line is :mod:`jeidnn.cli.prune`).

    jeidnn prune runs/default --heads 0.25 --ffn 0.25 --layers auto --recover-steps 200 --out pruned

1. The operating point is the one ``jeidnn export`` would write (default: the run's ``model/`` choice;
   ``--method/--budget`` as in export), built by :func:`jeidnn.export.exporter.build_model`.
2. ``--layers auto`` drops every layer after the deepest exit that operating point takes on calib
   (``--layers N`` keeps the first N layers, N an exit layer); that exit becomes the last one, so a test
   sample the gates would send deeper leaves there.
3. Heads and FFN neurons are scored on val (:func:`jeidnn.compress.importance.importance`, Michel et al.
   2019) and the least important ``--heads`` / ``--ffn`` fraction of all of them is removed.
4. ``--recover-steps N``: N optimizer steps on train of the pruned backbone and exit heads, the
   cross-entropy summed over the exits (the gates stay as they are).
5. The gates, thresholds and exit threshold are kept; the conformal quantiles are refitted on calib half B
   for the pruned model's own exits (groups from its calib-A exit counts), since pruning changes the
   probabilities the sets are built from. Costs are recounted as the run counts them (train split,
   :mod:`jeidnn.compress.measure`), relative to the *unpruned* model's FLOPs, so they compare with
   report.json's.

Rooms: :mod:`~jeidnn.compress.settings` (what to remove), :mod:`~jeidnn.compress.run_data` (the run's
splits), :mod:`~jeidnn.compress.importance` (what matters least), :mod:`~jeidnn.compress.recovery` (the
recovery fine-tune), :mod:`~jeidnn.compress.measure` (costs and accuracies); this module puts them in order.

The folder loads with ``EarlyExitModel.from_pretrained``; its metadata holds ``pruning`` (settings, what
was removed, parameter counts, accuracies before and after, what was refitted).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jeidnn.compress.importance import importance, least_important, removal_count
from jeidnn.compress.measure import exit_flops, measure, num_parameters
from jeidnn.compress.recovery import recover
from jeidnn.compress.run_data import RunData, batches, run_data
from jeidnn.compress.settings import PruneSettings, last_exit
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import split_calib
from jeidnn.evaluate.conformal import fit_at_exits
from jeidnn.export.card import write_card
from jeidnn.export.exporter import build_model, load_backbone
from jeidnn.export.operating_point import Run
from jeidnn.export.selection import select
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.io import atomic_folder
from jeidnn.model.backbone import Backbone
from jeidnn.model.families import family_of
from jeidnn.model.structured import drop_layers, keep_exits, layer_sizes, prune_ffn, prune_heads
from jeidnn.train.devices import run_device

__all__ = ["PruneSettings", "prune_model", "prune_run", "run_data"]


log = logging.getLogger(__name__)


IMPORTANCE = (
    "Michel et al. (2019) gradient importance |dL/dmask| summed over {n} val samples, L = cross-entropy "
    "summed over the exits, l2-normalised per layer, lowest removed across layers; FFN neurons by the same "
    "mask gradient (|sum over tokens of activation x gradient| per sample)"
)


# --------------------------------------------------------------------------- the pruned model


@dataclass
class _Shrunk:
    """The pruned parts and what was removed to get them."""

    backbone: Backbone
    heads: Any
    gates: Any
    removed: dict[str, dict[int, list[int]]]
    importance_samples: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)


def _shrink(
    model: Any, settings: PruneSettings, data: RunData, last: int, device: torch.device, progress: bool
) -> _Shrunk:
    """Copies of ``model``'s parts with the layers after exit ``last`` dropped, the least important heads
    and FFN neurons removed and (``recover_steps``) a recovery fine-tune; on the CPU."""
    check_prunable(model.backbone.arch)
    hf_model = copy.deepcopy(model.backbone.model)
    heads, gates = keep_exits(copy.deepcopy(model.heads), copy.deepcopy(model.gates), last)
    if heads.layers[-1] < model.backbone.num_layers:
        drop_layers(hf_model, heads.layers[-1])
    heads_now, ffn_now = layer_sizes(hf_model)
    removal_count(heads_now, settings.heads, "head", "--heads")  # refuse before the importance pass
    removal_count(ffn_now, settings.ffn, "FFN neuron", "--ffn")
    backbone = Backbone(hf_model, model.backbone.source, model.backbone.pooling, model.backbone.exit_norm).to(
        device
    )
    heads.to(device)
    out = _Shrunk(backbone, heads, gates, {"heads": {}, "ffn": {}})
    if settings.heads or settings.ffn:
        loader = data.dm.loader("val", data.cfg.data.eval_batch_size, limit=settings.importance_samples)
        labelled = ((x, y) for x, y, _ in batches(loader, backbone.input_names, device))
        scores = importance(backbone, heads, labelled)
        out.importance_samples = scores.samples
        if settings.heads:
            out.removed["heads"] = least_important(scores.heads, settings.heads, "head", "--heads")
            prune_heads(hf_model, out.removed["heads"])
        if settings.ffn:
            out.removed["ffn"] = least_important(scores.ffn, settings.ffn, "FFN neuron", "--ffn")
            prune_ffn(hf_model, out.removed["ffn"])
    if settings.recover_steps:
        lr = settings.recover_lr or data.cfg.finetune.lr
        out.losses = recover(backbone, heads, data, settings.recover_steps, lr, device, progress)
    backbone.cpu()
    heads.cpu()
    return out


def check_prunable(model_type: str) -> None:
    """Refuse a backbone family whose structure the pruning cannot cut (before any work)."""
    refusal = family_of(model_type).prune_refusal
    if refusal is not None:
        raise JeidnnError(f"jeidnn prune cannot prune a {model_type} backbone: {refusal}")


def prune_model(
    run: Any,
    model: Any,
    settings: PruneSettings,
    data: RunData,
    *,
    calib_exits: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Any, dict]:
    """A pruned copy of ``model`` (an :class:`~jeidnn.hf.modeling.EarlyExitModel` of ``run``; left unchanged).

    Args:
        data: the run's splits (:func:`run_data`).
        calib_exits: the exits the operating point takes on calib ``(N_calib,)`` (``--layers auto``).
        progress: a progress bar for the recovery fine-tune.

    Returns:
        The pruned model (eval mode, on the CPU) and its ``pruning`` metadata (also in its metadata).
    """
    settings.check()
    device = torch.device(device)
    last = last_exit(settings.layers, list(model.heads.layers), calib_exits)
    _, full_flops = exit_flops(data, model.backbone, model.heads, model.gates)
    shrunk = _shrink(model, settings, data, last, device, progress)
    backbone, heads, gates = shrunk.backbone, shrunk.heads, shrunk.gates
    flops, _ = exit_flops(data, backbone, heads, gates)
    pruned = EarlyExitModel.from_parts(
        backbone,
        heads,
        gates,
        model.preprocessor,
        labels=model.labels,
        costs=[f / full_flops for f in flops],  # relative to the unpruned model, as report.json's
        max_length=model.max_length,
        exit_threshold=model.exit_threshold,
        default_alpha=model.default_alpha,
    ).eval()
    split = split_calib(len(data.dm.datasets["calib"]), run.cfg.seed)
    metrics, calib = measure(pruned, data, split, device)
    refitted = "nothing (the model is unchanged)"
    if not (settings.heads or settings.ffn or settings.recover_steps or last < model.num_exits - 1):
        pruned.conformal_quantiles = model.conformal_quantiles
    elif model.conformal_quantiles:
        min_samples = run.cfg.eval.conformal_min_samples
        alphas = list(model.conformal_quantiles)
        logits, exits, labels = calib
        pruned.conformal_quantiles, groups = fit_at_exits(
            logits.softmax(dim=-1),
            labels,
            exits,
            split.a,
            split.b,
            pruned.num_exits,
            [float(a) for a in alphas],
            min_samples,
        )
        refitted = (
            f"conformal quantiles (alpha {', '.join(alphas)}) on calib half B ({len(split.b)} samples) for "
            f"the pruned model's exits, groups {groups} from its calib-A exits; gates, thresholds and exit "
            "threshold kept as chosen for the unpruned model"
        )
    heads_before, ffn_before = layer_sizes(model.backbone.model)
    heads_after, ffn_after = layer_sizes(backbone.model)
    samples = shrunk.importance_samples
    info = {
        "heads_fraction": settings.heads,
        "ffn_fraction": settings.ffn,
        "layers": settings.layers,
        "layers_kept": backbone.num_layers,
        "exit_layers": list(heads.layers),
        "importance": IMPORTANCE.format(n=samples) if samples else None,
        "heads_removed": {str(i + 1): units for i, units in shrunk.removed["heads"].items() if units},
        "heads_per_layer": {"before": heads_before, "after": heads_after},
        "ffn_per_layer": {"before": ffn_before, "after": ffn_after},
        "recover_steps": settings.recover_steps,
        "recover_lr": (settings.recover_lr or data.cfg.finetune.lr) if settings.recover_steps else None,
        "recover_loss": [shrunk.losses[0], shrunk.losses[-1]] if shrunk.losses else None,
        "parameters_before": num_parameters(model),
        "parameters_after": num_parameters(pruned),
        "costs": pruned.costs,
        "costs_relative_to": "the unpruned backbone + final head (report.json exits.cost), train split",
        "refitted": refitted,
        **metrics,
    }
    pruned.metadata = {**model.metadata, "pruning": info}
    return pruned, info


def prune_run(
    run_dir: str | Path,
    settings: PruneSettings,
    *,
    method: str | None = None,
    budget: float | None = None,
    out: str | Path,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Prune the operating point of a finished run and write it to ``out``; returns its ``pruning`` metadata
    with ``path`` and ``before`` (the unpruned operating point's calib-B / test accuracy and test cost).

    Raises:
        JeidnnError: bad settings, run, method, budget, ``--layers`` or ``out``; nothing is written then.
    """
    settings.check()
    out = Path(out)
    if out.exists() and not overwrite:
        raise JeidnnError(f"{out} already exists; pass --overwrite or choose another --out")
    target = run_device(device, key="--device")
    run = Run.open(run_dir)
    check_prunable(run.report["backbone"]["architecture"])
    if isinstance(settings.layers, int):
        last_exit(settings.layers, list(run.report["exits"]["layers"]), None)  # refuse before any work
    point = select(run, method=method, budget=budget)
    backbone, preprocessor = load_backbone(run)
    if backbone.family.prune_refusal is not None:
        raise JeidnnError(f"cannot prune a {backbone.family.name} backbone: {backbone.family.prune_refusal}")
    data = run_data(run, backbone, preprocessor)  # data that changed since the run is refused here
    model, summary = build_model(run, point, backbone, preprocessor)
    cand, split = point.candidate, run.split
    correct_b = cand.source.correct["calib"][split.b].gather(1, cand.calib_exits[split.b].long()[:, None])
    before = {
        "calib_b_accuracy": float(correct_b.double().mean()),
        "test_accuracy": summary["test_accuracy"],
        "test_cost": summary["test_cost"],
    }
    log.info("operating point: %s (%s), %s", point.method, point.label, point.chosen_by)
    pruned, info = prune_model(
        run, model, settings, data, calib_exits=cand.calib_exits, device=target, progress=progress
    )
    info["before"] = before
    pruned.metadata = {**pruned.metadata, "pruning": info}
    _log_result(info)
    with atomic_folder(out, overwrite) as tmp:
        pruned.save_pretrained(tmp)
        write_card(tmp, run, pruned, summary, pruning=info)
    log.info("wrote %s", out)
    return {"path": str(out), **info}


def _log_result(info: dict) -> None:
    before, after = info["parameters_before"], info["parameters_after"]
    log.info("parameters: %d -> %d (%.1f %% fewer)", before, after, 100 * (1 - after / before))
    log.info(
        "layers kept: %d (exits at %s); heads per layer %s; FFN neurons per layer %s",
        info["layers_kept"],
        info["exit_layers"],
        info["heads_per_layer"]["after"],
        info["ffn_per_layer"]["after"],
    )
    log.info(
        "exit costs (FLOPs relative to the unpruned model): %s", ", ".join(f"{c:.4f}" for c in info["costs"])
    )
    if info["recover_loss"]:
        log.info("recovery: %d steps, loss %.4f -> %.4f", info["recover_steps"], *info["recover_loss"])
    b = info["before"]
    log.info(
        "calib half B accuracy %.4f -> %.4f; test accuracy %.4f -> %.4f, test cost %.4f -> %.4f",
        b["calib_b_accuracy"],
        info["calib_b_accuracy"],
        b["test_accuracy"],
        info["test_accuracy"],
        b["test_cost"],
        info["test_cost"],
    )
    log.info("refitted: %s", info["refitted"])
