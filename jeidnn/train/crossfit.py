"""`gate_data: crossfit` (an extension): the IM outputs the gates learn on, each train sample read through
IMs that never saw it.

The IMs fitted on train are more confident, and more often right, on train than on unseen data; gates
trained on those outputs learn to trust them too much. Cross-fitting splits train into ``K`` folds and
warms the IMs up ``K`` times (stage 1's recipe on cached features, fresh initial weights), each time on the
other ``K - 1`` folds; a sample's out-of-fold outputs come from the fit that held its fold out. The gates
then train on all of train with those outputs, and the model is deployed with stage 1's IMs (fitted on all
of train): what the gates meet at inference is an IM fitted on data without the sample, as in training,
and the deployed IMs are the best-fitted ones. The cost is ``K`` warm-ups on cached features, no backbone
pass.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor

from jeidnn.io import write_safetensors
from jeidnn.model.heads import ExitHeads
from jeidnn.train.context import RunContext
from jeidnn.train.features import FeatureSplit
from jeidnn.train.modules import exit_logits
from jeidnn.train.results import FeatureCache
from jeidnn.train.warmup import warm_up

logger = logging.getLogger(__name__)

CROSSFIT_PREDICTIONS = "predictions/crossfit.safetensors"
"""In a run with `gate_data: crossfit`: the train rows' IM logits out of fold (what the gates learn on) and in
fold (stage 1's IMs, fitted on all of train), with the final exit's and the labels; for checking how far
each set of outputs is from what the IMs give on unseen data (`benchmarks/gating.py`)."""


def fold_index(num_samples: int, folds: int, seed: int) -> Tensor:
    """Each sample's fold ``(N,)`` in ``0..folds-1``: a seeded permutation dealt round-robin, so the folds'
    sizes differ by at most one."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(num_samples, dtype=torch.long)
    fold[order] = torch.arange(num_samples) % folds
    return fold


def _fresh_ims(heads: ExitHeads, seed: int) -> ExitHeads:
    """A copy of ``heads`` with the IMs drawn again (each layer's own initialisation); the final head kept."""
    heads = copy.deepcopy(heads).train()  # as stage 1 starts them: dropout on
    torch.manual_seed(seed)
    for im in heads.heads[:-1]:
        for module in im.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return heads


def out_of_fold_logits(ctx: RunContext, heads: ExitHeads, cache: FeatureCache, folds: int) -> Tensor:
    """Every train sample's IM logits ``(N, L-1, C)`` from IMs warmed up without its fold (``heads``: the
    run's exits, copied; their IMs drawn afresh for each fold)."""
    train = cache["train"]
    fold = fold_index(len(train), folds, ctx.cfg.seed)
    out: Tensor | None = None
    for k in range(folds):
        held = fold == k
        logger.info(
            "stage 2, crossfit: IM warm-up %d of %d (%d samples held out)", k + 1, folds, int(held.sum())
        )
        part = FeatureCache(
            {**cache.splits, "train": FeatureSplit(train.features[~held], train.labels[~held])}
        )
        fold_heads = _fresh_ims(heads, ctx.cfg.seed * 1_000 + k)
        warm_up(ctx, fold_heads, part, train_final=False)
        logits = exit_logits(fold_heads, FeatureSplit(train.features[held], train.labels[held]))[:, :-1]
        if out is None:
            out = logits.new_empty(len(train), *logits.shape[1:])  # (N, L-1, C)
        out[held] = logits
    assert out is not None
    return out


def write_crossfit_predictions(
    path: Path, heads: ExitHeads, cache: FeatureCache, out_of_fold: Tensor
) -> None:
    """:data:`CROSSFIT_PREDICTIONS` at ``path``: ``train_out_of_fold_logits`` ``(N, L-1, C)``,
    ``train_logits`` ``(N, L, C)`` of ``heads`` (the run's exits, the final one last) and ``train_labels``."""
    train = cache["train"]
    tensors = {
        "train_out_of_fold_logits": out_of_fold,
        "train_logits": exit_logits(heads, train),
        "train_labels": train.labels,
    }
    write_safetensors(path, tensors)
