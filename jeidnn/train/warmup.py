"""Stage 1: the IM warm-up on cached features, and the warmed-up exits' predictions."""

from __future__ import annotations

import pytorch_lightning as pl

from jeidnn.model.heads import ExitHeads
from jeidnn.train.context import RunContext
from jeidnn.train.devices import make_trainer
from jeidnn.train.modules import WarmupModule, exit_logits, feature_loader
from jeidnn.train.results import EVAL_SPLITS, FeatureCache, WarmupResult


def warm_up(ctx: RunContext, heads: ExitHeads, cache: FeatureCache, train_final: bool = False) -> list[int]:
    """Stage 1: trains the IMs of ``heads`` (and the final head when ``train_final``) in place on cached
    features; returns each trained head's best epoch (-1: the joint phase's weights were kept). ``heads``
    end in eval mode."""
    cfg = ctx.cfg.warmup
    pl.seed_everything(ctx.cfg.seed, verbose=False)
    # IMs trained in the joint phase: keep them unless beaten on val.
    keep_start = ctx.cfg.regime != "disjoint"
    module = WarmupModule(heads, cache["val"], cfg, train_final=train_final, keep_start=keep_start)
    if module.trained and cfg.max_epochs > 0:
        trainer = make_trainer(
            ctx.cfg,
            ctx.run_dir,
            "warmup",
            ctx.progress,
            max_epochs=cfg.max_epochs,
            enable_checkpointing=False,
        )
        trainer.fit(module, feature_loader(cache["train"], cfg.batch_size, True, ctx.cfg.seed))
        module.restore_best()
    heads.eval()
    return module.best_epoch


def warmup_result(heads: ExitHeads, cache: FeatureCache, best_epoch: list[int] | None) -> WarmupResult:
    """The warmed-up exits' logits on every split the evaluation reads."""
    heads.eval()
    logits = {s: exit_logits(heads, cache[s]) for s in EVAL_SPLITS}
    return WarmupResult(best_epoch, logits, {s: cache[s].labels for s in EVAL_SPLITS})
