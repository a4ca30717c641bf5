"""report.json's training part, assembled once from the stages' typed results.

`backbone`, `dataset`, `exits`, `finetune`, `learned`, `stage2_time_vs_train_pass` and `regime`; the
evaluation adds its sections to this dict (:mod:`jeidnn.evaluate`) and the pipeline `timings_s`, last.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jeidnn.config.gating import GateVariant
from jeidnn.config.schema import RunConfig
from jeidnn.data.splits import split_fingerprint
from jeidnn.model.cost import ExitCosts
from jeidnn.train.inputs import RunInputs
from jeidnn.train.learned import predictions_file
from jeidnn.train.results import JointResult, Stage0Result, Stage2Result, WarmupResult
from jeidnn.train.stage2 import TrainedModel

STAGE2_TIMING = "stage 2: learned gates, every variant and λ"
"""Stage 2's entry in `timings_s`."""
CROSSFIT_TIMING = "stage 2 crossfit: IM warm-ups on the folds"
"""The out-of-fold warm-ups of `gate_data: crossfit`, in `timings_s` (also counted in stage 2's)."""
TRAIN_PASS_TIMING = "feature cache [train]"
"""The backbone's pass over the train split, in `timings_s`."""
NO_STAGE0 = {"skipped": "regime joint: the joint phase replaces it"}


def training_report(
    cfg: RunConfig,
    inputs: RunInputs,
    costs: ExitCosts,
    warmup: WarmupResult,
    stage0: Stage0Result | None,
    joint: JointResult | None,
    stage2: Stage2Result | None,
    timings: dict[str, float],
    precision: str = "32-true",
) -> dict[str, Any]:
    """report.json's training part (its keys are listed in README.md and docs/evaluation.md).

    Args:
        stage0: None when the regime has no stage 0 (`joint`).
        joint: None when the regime has no joint phase (`disjoint`).
        stage2: None when stage 2 did not run.
        timings: seconds per stage so far (`timings_s`).
        precision: the Lightning precision stage 0 and the joint phase trained in.
    """
    backbone, heads, raw = inputs.backbone, inputs.heads, inputs.raw
    acc = (warmup.logits["test"].argmax(-1) == warmup.labels["test"][:, None]).float().mean(0)  # (L,)
    report: dict[str, Any] = {
        "backbone": {
            "name": backbone.source,
            "architecture": backbone.arch,
            "num_layers": backbone.num_layers,
            "hidden_size": backbone.hidden_size,
            "pooling": backbone.pooling,
            "exit_norm": backbone.exit_norm,
            "im_head": heads.im_head,
            "dtype": str(inputs.dtype).removeprefix("torch."),
            "precision": precision,
            "gflops_full": costs.gflops_full,
        },
        "dataset": {
            "name": raw.name,
            "num_classes": len(raw.label_names),
            "labels": raw.label_names,
            "splits": dict(inputs.splits.sizes),
            "duplicates_dropped": raw.duplicates_dropped,
            # `jeidnn prune` reads the data again: it refuses data that changed since.
            "fingerprint": split_fingerprint(raw, inputs.splits),
        },
        "exits": {
            "layers": heads.layers,
            "cost": costs.cost,
            "cost_with_gates": costs.cost_with_gates,
            "gflops": costs.gflops,
            "test_accuracy": acc.tolist(),
            "cost_counted_on": costs.counted_on,
        },
        "finetune": stage0.finetune if stage0 is not None else NO_STAGE0,
    }
    if stage2 is not None:
        report["learned"] = {}
        for variant in cfg.jeidnn.variants:
            models = [_model_entry(variant.name, k, m) for k, m in enumerate(stage2.models[variant.name])]
            report["learned"].update(_learned_entries(variant, stage2.costs[variant.name], models))
        if TRAIN_PASS_TIMING in timings:
            train_pass = timings[TRAIN_PASS_TIMING]
            # The crossfit warm-ups are reported apart: stage2_s is the gates' and IMs' training alone.
            crossfit = timings.get(CROSSFIT_TIMING, 0.0)
            stage2_s = timings[STAGE2_TIMING] - crossfit
            report["stage2_time_vs_train_pass"] = {
                "stage2_s": stage2_s,
                "train_pass_s": train_pass,
                "ratio": stage2_s / max(train_pass, 1e-9),
            }
            if CROSSFIT_TIMING in timings:
                report["stage2_time_vs_train_pass"].update(
                    crossfit_s=crossfit, crossfit_ratio=crossfit / max(train_pass, 1e-9)
                )
    report["regime"] = regime_entry(cfg, stage0, joint, stage2.models if stage2 is not None else {})
    return report


def _model_entry(variant: str, k: int, model: TrainedModel) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "lambda": model.lam,
        "file": predictions_file(variant, k),
        "val_cost": model.val_cost,
        "val_accuracy": model.val_accuracy,
    }
    if model.backbone is not None:
        entry["backbone"] = "its own, trained end to end in stage 2 (in its checkpoint)"
        entry["backbone_updates"] = int(model.history["backbone_updates"][-1])
    return entry


LEARNED_LABELS = {
    "jeidnn_paper": "JEI-DNN, paper preset",
}


def _learned_entries(variant: GateVariant, costs: list[float], models: list[dict]) -> dict[str, dict]:
    """report.json `learned` entries of one variant: as configured, and for a `native` variant also with
    the exit threshold chosen on calib (an extension sharing the same models)."""
    label = LEARNED_LABELS.get(variant.name, variant.name.replace("_", " "))
    settings = dataclasses.asdict(variant)
    entry = {
        "label": label + (" (extension)" if variant.extension else ""),
        "extension": variant.extension,
        "operating_point": variant.operating_point,
        "costs": costs,
        "settings": settings,
        "models": models,
    }
    entries = {variant.name: entry}
    if variant.operating_point == "native":
        entries[f"{variant.name}_tau"] = {
            **entry,
            "label": f"{label} + exit threshold on calib (extension)",
            "extension": True,
            "operating_point": "calib_threshold",
        }
    return entries


def _budget(steps: int | None) -> str:
    return "no step limit (epochs only)" if steps is None else f"at most {steps} steps"


def regime_entry(
    cfg: RunConfig,
    stage0: Stage0Result | None,
    joint: JointResult | None,
    trained: dict[str, list[TrainedModel]],
) -> dict:
    """report.json's `regime`: its name, the backbone updates of each phase, and how they were matched
    across regimes.

    Args:
        stage0: stage 0 (None: the regime has none).
        joint: the joint phase (None: the regime has none).
        trained: stage 2's models per variant; a model trained end to end counts its backbone updates.
    """
    updates: dict[str, int] = {}
    if cfg.regime != "joint" and stage0 is not None and "steps" in stage0.finetune:
        updates["stage0"] = int(stage0.finetune["steps"])
    if joint is not None:
        updates["joint"] = int(joint.summary["steps"])
    end_to_end = [m for models in trained.values() for m in models if m.history.get("backbone_updates")]
    if end_to_end:
        updates["stage2"] = int(end_to_end[0].history["backbone_updates"][-1])
    updates["total"] = sum(updates.values())
    f, jt = cfg.finetune, cfg.joint
    if cfg.regime == "disjoint":
        how = f"stage 0 trains the backbone ({_budget(f.max_steps)}, finetune.max_steps)"
    elif cfg.regime == "joint":
        same = "the same budget as" if jt.max_steps == f.max_steps else "NOT the budget of"
        how = (
            f"the joint phase replaces stage 0: {_budget(jt.max_steps)} (joint.max_steps), {same} disjoint's "
            f"stage 0 ({_budget(f.max_steps)}), on stage 0's batches"
        )
    else:
        total = None if f.max_steps is None or jt.max_steps is None else f.max_steps + jt.max_steps
        how = (
            f"stage 0 as in disjoint ({_budget(f.max_steps)}), then the joint phase "
            f"({_budget(jt.max_steps)}): {_budget(total)} in all; mixed cannot match the other regimes "
            "without shortening stage 0, which would no longer be disjoint's stage 0"
        )
    how += (
        "; each phase may stop earlier on patience or its time guard, so the counts taken are the ones above"
    )
    if end_to_end:
        how += "; jeidnn.train_backbone: stage 2's IM-phase steps update the backbone too (stage2)"
    entry: dict[str, Any] = {"name": cfg.regime, "backbone_updates": updates, "how_matched": how}
    if joint is not None:
        entry["joint"] = joint.summary
    return entry
