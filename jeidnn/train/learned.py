"""The learned methods of a run: stage 2 for every variant and λ, and what it leaves behind.

Each trained model's predictions (`predictions/learned/<variant>/<k>.safetensors`) and weights
(`checkpoints/learned/<variant>/<k>.safetensors`: heads, gates and, for a model trained end to end, its own
backbone), and report.json's `learned` entries.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from jeidnn.config.schema import GateVariant
from jeidnn.model.cost import ExitCosts
from jeidnn.pipeline.resume import pause_point
from jeidnn.train.devices import make_trainer, stage_logger
from jeidnn.train.features import FeatureSplit, extract_features

if TYPE_CHECKING:
    from jeidnn.pipeline.run import Prepared
    from jeidnn.train.stage2 import TrainedModel


def save_predictions(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def gate_flops(variant: GateVariant, num_exits: int, hidden_size: int, num_classes: int) -> float:
    """FLOPs of one gate of ``variant`` on one sample (:func:`jeidnn.model.cost.gate_flops`)."""
    from jeidnn.model.cost import gate_flops as count_gate_flops

    return count_gate_flops(variant, num_exits, hidden_size)


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


def train_stage2(
    p: Prepared, cache: dict[str, FeatureSplit], costs: ExitCosts, run_dir: Path, progress: bool
) -> tuple[dict[str, dict], dict[str, list], dict[str, dict]]:
    """Stage 2 for every variant and λ; writes each model's predictions and weights.

    Each finished fit is kept in `checkpoints/stage2/` (a resumed run loads it instead of training again).

    Returns:
        report.json's `learned` entries, the trained models per variant (for the export), and every
        predictions file's tensors keyed by its path in the run folder.
    """
    from jeidnn.train.stage2 import fit_stage2

    cfg = p.cfg
    num_exits, hidden = p.heads.num_exits, p.backbone.hidden_size
    variant_costs = {
        v.name: costs.with_gates(gate_flops(v, num_exits, hidden, p.heads.num_classes))
        for v in cfg.jeidnn.variants
    }
    store = run_dir / "checkpoints" / "stage2"
    after_fit = lambda name: pause_point(f"stage2:{name}")  # noqa: E731
    if cfg.jeidnn.train_backbone:
        from jeidnn.train.end_to_end import fit_end_to_end

        costs_of = {name: torch.tensor(c) for name, c in variant_costs.items()}
        trained = fit_end_to_end(p, cache, costs_of, run_dir, progress, store=store, after_fit=after_fit)
        return _outputs(p, cache, variant_costs, trained, run_dir, progress)
    trained = fit_stage2(
        cache["train"].features,
        cache["train"].labels,
        cache["val"].features,
        cache["val"].labels,
        p.heads,
        {name: torch.tensor(c) for name, c in variant_costs.items()},
        cfg.jeidnn,
        seed=cfg.seed,
        trainer_kwargs={
            # Heads and gates on cached features: tensors too small for a GPU to pay off unless asked for.
            "accelerator": "cpu" if cfg.accelerator == "auto" else cfg.accelerator,
            "logger": stage_logger(cfg, run_dir, "stage2"),
            "enable_progress_bar": progress,
            "default_root_dir": str(run_dir),
        },
        store=store,
        after_fit=after_fit,
    )
    return _outputs(p, cache, variant_costs, trained, run_dir, progress)


def own_features(p: Prepared, model: TrainedModel, run_dir: Path, progress: bool) -> dict[str, FeatureSplit]:
    """The val, calib and test features of the backbone a model trained end to end brought."""
    backbone = copy.deepcopy(p.backbone)
    backbone.model.load_state_dict(model.backbone)
    trainer = make_trainer(p.cfg, run_dir, "cache", progress, logger=False)
    cache = {}
    for split in ("val", "calib", "test"):
        cache[split] = extract_features(backbone, p.dm, split, p.exit_layers, progress, trainer=trainer)
    return cache


def _outputs(
    p: Prepared,
    cache: dict[str, FeatureSplit],
    variant_costs: dict[str, list[float]],
    trained: dict[str, list[TrainedModel]],
    run_dir: Path,
    progress: bool,
) -> tuple[dict[str, dict], dict[str, list], dict[str, dict]]:
    """Each trained model's predictions and weights (files and memory) and report.json's entries."""
    cfg = p.cfg
    learned: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    for variant in cfg.jeidnn.variants:
        models = []
        for k, model in enumerate(trained[variant.name]):
            tensors = {}
            # A model trained end to end reads its own backbone's features: computed again here.
            splits = cache if model.backbone is None else own_features(p, model, run_dir, progress)
            for split in ("val", "calib", "test"):
                features = splits[split].features
                with torch.no_grad():
                    logits = model.heads(features)  # (N, L, C)
                    tensors[f"{split}_scores"] = model.gates.scores(logits, features[:, :-1])  # (N, L-1)
                tensors[f"{split}_logits"] = logits
                tensors[f"{split}_labels"] = cache[split].labels
            rel = f"predictions/learned/{variant.name}/{k}.safetensors"
            save_predictions(run_dir / rel, tensors)
            predictions[rel] = tensors
            weights = {f"heads.{n}": v for n, v in model.heads.state_dict().items()}
            weights.update({f"gates.{n}": v for n, v in model.gates.state_dict().items()})
            weights.update({f"backbone.{n}": v for n, v in (model.backbone or {}).items()})
            save_predictions(run_dir / "checkpoints" / "learned" / variant.name / f"{k}.safetensors", weights)
            entry = {
                "lambda": model.lam,
                "file": rel,
                "val_cost": model.val_cost,
                "val_accuracy": model.val_accuracy,
            }
            if model.backbone is not None:
                entry["backbone"] = "its own, trained end to end in stage 2 (in its checkpoint)"
                entry["backbone_updates"] = int(model.history["backbone_updates"][-1])
            models.append(entry)
        learned.update(_learned_entries(variant, variant_costs[variant.name], models))
    return learned, trained, predictions
