"""Stage 2's λ search: rounds of side-by-side fits, each adding the λ values that widen or fill a variant's
val-cost range, until the range is covered or the rounds run out."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jeidnn.config.gating import JeidnnConfig
from jeidnn.train.stage2 import TrainedModel
from jeidnn.train.stage2_fit import train_models
from jeidnn.train.stage2_store import load_models, save_models

logger = logging.getLogger(__name__)


def next_lambdas(models: Sequence[TrainedModel], first_cost: float, cfg: JeidnnConfig) -> list[float]:
    """New λ values that widen or fill a variant's val-cost range (the automatic λ choice).

    Larger λ means cheaper models. Adds ``min λ / 10`` while the most expensive model's val cost is below
    ``cfg.target_max_cost``, ``max λ · 10`` while the cheapest costs more than the first exit (+0.02), and the
    geometric mean of neighbouring λ whose val costs differ by more than ``cfg.max_cost_gap``.
    """
    ordered = sorted(models, key=lambda m: m.lam)
    lams = [m.lam for m in ordered]
    costs = [m.val_cost for m in ordered]
    new: list[float] = []
    if max(costs) < cfg.target_max_cost and lams[0] > 1e-6:
        new.append(lams[0] / 10)
    if min(costs) > first_cost + 0.02 and lams[-1] < 1e4:
        new.append(lams[-1] * 10)
    for (lo, c_lo), (hi, c_hi) in zip(zip(lams, costs), zip(lams[1:], costs[1:])):
        if abs(c_lo - c_hi) > cfg.max_cost_gap and lo > 0 and hi / lo > 1.05:
            new.append(math.sqrt(lo * hi))
    return sorted(set(new))


def fit_stage2(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    heads: nn.Module,
    costs: dict[str, Tensor],
    cfg: JeidnnConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], Any] = logger.info,
    store: Path | None = None,
    after_fit: Callable[[str], Any] | None = None,
    crossfit_logits: Tensor | None = None,
) -> dict[str, list[TrainedModel]]:
    """Train every variant of ``cfg.variants`` over its λ values; λ chosen automatically when ``cfg.lambdas``
    is None (rounds of :func:`next_lambdas`, each round one side-by-side fit of all new models).

    Args:
        costs: per variant name, its exit costs ``(L,)`` (IMs and its own gates).
        log: called with one progress line per round.
        store: a folder keeping each finished fit (``round<r>-<data>.safetensors``); a fit found there is
            loaded instead of trained, so a resumed run continues where it stopped. Each fit is seeded on its
            own, so the result is the same either way: with ``seed`` in every round under ``lambda_init:
            shared`` (a later round's model is trained as it would have been in the first: same initial
            gates, batches and dropout masks), ``seed + round`` under ``independent``.
        after_fit: called with each fit's name once it is stored.
        crossfit_logits: the train rows' out-of-fold IM logits ``(N, L-1, C)``
            (:func:`jeidnn.train.crossfit.out_of_fold_logits`); needed by `gate_data: crossfit` variants.

    Returns:
        Per variant name, its models sorted by λ.
    """
    todo = {v.name: list(cfg.lambdas if cfg.lambdas is not None else cfg.lambda_grid) for v in cfg.variants}
    rounds = 1 + (cfg.lambda_rounds if cfg.lambdas is None else 0)
    trained: dict[str, list[TrainedModel]] = {v.name: [] for v in cfg.variants}
    hidden_size = train_features.shape[-1]
    for round_ in range(rounds):
        plan = [(v, costs[v.name], todo[v.name]) for v in cfg.variants if todo[v.name]]
        if not plan:
            break
        count = sum(len(lams) for _, _, lams in plan)
        log(f"stage 2, round {round_ + 1}: {count} models side by side ({len(plan)} variants)")
        # Gates that learn on val (IMs frozen) train in their own fit, with val as their training data; so do
        # gates that learn on train through out-of-fold IM outputs (crossfit).
        for source in ("train", "val", "crossfit"):
            part = [entry for entry in plan if entry[0].gate_data == source]
            if not part:
                continue
            name = f"round{round_ + 1}-{source}"
            path = store / f"{name}.safetensors" if store is not None else None
            if path is not None and path.is_file():
                log(f"stage 2, {name}: loaded from {path}")
                models = load_models(path, [v for v, _, _ in part], heads, hidden_size)
            else:
                fit_x, fit_y = (
                    (train_features, train_labels) if source == "train" else (val_features, val_labels)
                )
                results = train_models(
                    fit_x, fit_y, val_features, val_labels, heads, part, cfg,
                    seed=seed if cfg.lambda_init == "shared" else seed + round_, device=device,
                    im_logits=crossfit_logits if source == "crossfit" else None,
                )  # fmt: skip
                models = [m for block in results for m in block]
                if path is not None:
                    save_models(path, models)
                    if after_fit is not None:
                        after_fit(name)
            for model in models:
                trained[model.variant.name].append(model)
        todo = {
            v.name: [
                lam
                for lam in next_lambdas(trained[v.name], float(costs[v.name][0]), cfg)
                if all(abs(lam - m.lam) > 1e-12 for m in trained[v.name])
            ]
            for v in cfg.variants
        }
    return {name: sorted(models, key=lambda m: m.lam) for name, models in trained.items()}
