"""The learned methods of a run: stage 2 for every variant and λ, and what it leaves behind.

Each trained model's predictions (`predictions/learned/<variant>/<k>.safetensors`) and weights
(`checkpoints/learned/<variant>/<k>.safetensors`: heads, gates and, for a model trained end to end, its own
backbone), kept in memory as a :class:`~jeidnn.train.results.Stage2Result`.
"""

from __future__ import annotations

import copy
import time

import torch

from jeidnn.data.datamodule import JeidnnDataModule
from jeidnn.io import write_safetensors
from jeidnn.log import pause_point
from jeidnn.model.backbone import Backbone
from jeidnn.model.cost import ExitCosts, gate_flops
from jeidnn.model.heads import ExitHeads
from jeidnn.train.context import RunContext
from jeidnn.train.crossfit import CROSSFIT_PREDICTIONS, out_of_fold_logits, write_crossfit_predictions
from jeidnn.train.devices import make_trainer, run_device
from jeidnn.train.end_to_end import fit_end_to_end
from jeidnn.train.features import FeatureSplit, extract_features
from jeidnn.train.lambda_search import fit_stage2
from jeidnn.train.results import EVAL_SPLITS, FeatureCache, Stage2Result
from jeidnn.train.stage2 import TrainedModel


def cost_tensors(costs: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Per variant, its exit costs as a float64 tensor ``(L,)``: a float32 copy would move val costs off the
    costs the evaluation compares budgets with at 1e-9."""
    return {name: torch.tensor(c, dtype=torch.float64) for name, c in costs.items()}


def predictions_file(variant: str, k: int) -> str:
    """Where model ``k`` (λ ascending) of ``variant`` keeps its predictions, relative to the run folder."""
    return f"predictions/learned/{variant}/{k}.safetensors"


def train_stage2(
    ctx: RunContext,
    backbone: Backbone,
    heads: ExitHeads,
    dm: JeidnnDataModule,
    cache: FeatureCache,
    costs: ExitCosts,
) -> Stage2Result:
    """Stage 2 for every variant and λ; writes each model's predictions and weights. ``backbone`` and
    ``heads`` (the warmed-up exits) stay as they are: each model holds copies.

    Each finished fit is kept in `checkpoints/stage2/` (a resumed run loads it instead of training again).
    """
    cfg, run_dir = ctx.cfg, ctx.run_dir
    num_exits, hidden = heads.num_exits, backbone.hidden_size
    variant_costs = {v.name: costs.with_gates(gate_flops(v, num_exits, hidden)) for v in cfg.jeidnn.variants}
    store = run_dir / "checkpoints" / "stage2"
    after_fit = lambda name: pause_point(f"stage2:{name}")  # noqa: E731
    crossfit_logits, crossfit_s = None, None
    if any(v.gate_data == "crossfit" for v in cfg.jeidnn.variants):
        start = time.perf_counter()
        crossfit_logits = out_of_fold_logits(ctx, heads, cache, cfg.jeidnn.crossfit_folds)
        crossfit_s = round(time.perf_counter() - start, 2)
        write_crossfit_predictions(run_dir / CROSSFIT_PREDICTIONS, heads, cache, crossfit_logits)
    if cfg.jeidnn.train_backbone:
        trained = fit_end_to_end(
            ctx, backbone, heads, dm, cache, cost_tensors(variant_costs), store=store, after_fit=after_fit
        )
    else:
        trained = fit_stage2(
            cache["train"].features,
            cache["train"].labels,
            cache["val"].features,
            cache["val"].labels,
            heads,
            cost_tensors(variant_costs),
            cfg.jeidnn,
            seed=cfg.seed,
            # Heads and gates on cached features: tensors too small for a GPU to pay off unless asked for.
            device=run_device("cpu" if cfg.accelerator == "auto" else cfg.accelerator),
            store=store,
            after_fit=after_fit,
            crossfit_logits=crossfit_logits,
        )
    predictions = {
        variant.name: [
            _save_model(ctx, backbone, heads, dm, cache, variant.name, k, model)
            for k, model in enumerate(trained[variant.name])
        ]
        for variant in cfg.jeidnn.variants
    }
    return Stage2Result(variant_costs, trained, predictions, crossfit_s)


def own_features(
    ctx: RunContext, backbone: Backbone, layers: list[int], dm: JeidnnDataModule, model: TrainedModel
) -> dict[str, FeatureSplit]:
    """The val, calib and test features of the backbone a model trained end to end brought (``backbone``:
    the run's, copied)."""
    backbone = copy.deepcopy(backbone)
    backbone.model.load_state_dict(model.backbone)
    trainer = make_trainer(ctx.cfg, ctx.run_dir, "cache", ctx.progress, logger=False)
    cache = {}
    for split in EVAL_SPLITS:
        cache[split] = extract_features(backbone, dm, split, layers, ctx.progress, trainer=trainer)
    return cache


def _save_model(
    ctx: RunContext,
    backbone: Backbone,
    heads: ExitHeads,
    dm: JeidnnDataModule,
    cache: FeatureCache,
    variant: str,
    k: int,
    model: TrainedModel,
) -> dict[str, torch.Tensor]:
    """Model ``k`` of ``variant``: its predictions on every evaluated split (returned, and written with its
    weights)."""
    tensors = {}
    # A model trained end to end reads its own backbone's features: computed again here.
    splits = cache.splits if model.backbone is None else own_features(ctx, backbone, heads.layers, dm, model)
    for split in EVAL_SPLITS:
        features = splits[split].features
        with torch.no_grad():
            logits = model.heads(features)  # (N, L, C)
            tensors[f"{split}_scores"] = model.gates.scores(logits, features[:, :-1])  # (N, L-1)
        tensors[f"{split}_logits"] = logits
        tensors[f"{split}_labels"] = cache[split].labels
    write_safetensors(ctx.run_dir / predictions_file(variant, k), tensors)
    weights = {f"heads.{n}": v for n, v in model.heads.state_dict().items()}
    weights.update({f"gates.{n}": v for n, v in model.gates.state_dict().items()})
    weights.update({f"backbone.{n}": v for n, v in (model.backbone or {}).items()})
    write_safetensors(ctx.run_dir / "checkpoints" / "learned" / variant / f"{k}.safetensors", weights)
    return tensors
