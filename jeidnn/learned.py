"""The learned methods of a run: stage 2 for every variant and λ, and what it leaves behind.

Each trained model's predictions (`predictions/learned/<variant>/<k>.safetensors`) and weights
(`checkpoints/learned/<variant>/<k>.safetensors`), and report.json's `learned` entries.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from jeidnn.config import GateVariant
from jeidnn.cost import ExitCosts
from jeidnn.devices import stage_logger
from jeidnn.features import FeatureSplit
from jeidnn.resume import pause_point

if TYPE_CHECKING:
    from jeidnn.pipeline import Prepared


def save_predictions(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def gate_flops(variant: GateVariant, num_exits: int, hidden_size: int, num_classes: int) -> float:
    """FLOPs of one gate of ``variant`` on one sample, counted like every other component."""
    from jeidnn.cost import count_flops
    from jeidnn.gates import Gates
    from jeidnn.stage2 import gate_settings

    gates = Gates(num_exits, gate_settings(variant), hidden_size).eval()
    logits, hidden = torch.zeros(1, num_exits, num_classes), torch.zeros(1, num_exits - 1, hidden_size)
    with torch.no_grad():
        return count_flops(lambda: gates(logits, hidden)) / (num_exits - 1)


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
    from jeidnn.stage2 import fit_stage2

    cfg = p.cfg
    num_exits, hidden = p.heads.num_exits, p.backbone.hidden_size
    variant_costs = {
        v.name: costs.with_gates(gate_flops(v, num_exits, hidden, p.heads.num_classes))
        for v in cfg.jeidnn.variants
    }
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
        store=run_dir / "checkpoints" / "stage2",
        after_fit=lambda name: pause_point(f"stage2:{name}"),
    )
    learned: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    for variant in cfg.jeidnn.variants:
        models = []
        for k, model in enumerate(trained[variant.name]):
            tensors = {}
            for split in ("val", "calib", "test"):
                features = cache[split].features
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
            save_predictions(run_dir / "checkpoints" / "learned" / variant.name / f"{k}.safetensors", weights)
            models.append(
                {
                    "lambda": model.lam,
                    "file": rel,
                    "val_cost": model.val_cost,
                    "val_accuracy": model.val_accuracy,
                }
            )
        learned.update(_learned_entries(variant, variant_costs[variant.name], models))
    return learned, trained, predictions
