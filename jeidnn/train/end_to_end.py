"""End-to-end stage 2 (`jeidnn.train_backbone`): the IM phases also update the backbone and the final head.

Stage 2 of :mod:`jeidnn.train.stage2` for one variant and one λ (config validation refuses more: each model
would need a backbone of its own). Gate phases as there, on features the backbone computes in eval mode
without gradient. IM phases run the backbone in train mode and let the variant's IM loss (every exit's CE, the
final exit's included, weighted as `im_loss` says) reach it: the backbone and the final head take AdamW steps
at `jeidnn.backbone_lr`, the IMs stage 2's SGD step. The features come from the backbone in the loop, not the
cache; the cache (the backbone before stage 2) only sets the gates' input statistics and initial BCE weights,
as in stage 2. The trained model keeps its own backbone (:attr:`jeidnn.train.stage2.TrainedModel.backbone`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from jeidnn.config.gating import JeidnnConfig
from jeidnn.data.datamodule import JeidnnDataModule, length_sorted_batches, model_inputs
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHeads
from jeidnn.train.context import RunContext
from jeidnn.train.devices import make_trainer
from jeidnn.train.results import FeatureCache
from jeidnn.train.stage2 import TrainedModel, VariantBlock
from jeidnn.train.stage2_fit import Stage2Module, alternation_phase, eval_logits, start_blocks
from jeidnn.train.stage2_store import load_models, save_models

logger = logging.getLogger(__name__)


class EndToEndModule(Stage2Module):
    """One variant block, the backbone and the final head; batches are the data module's tokenized batches.

    Args:
        block: the variant's block (``K = 1``).
        backbone: trained in place (pass a copy to keep the original).
        final_head: trained in place.
        exit_layers: 1-based backbone layers of the exits.
    """

    def __init__(
        self,
        block: VariantBlock,
        cfg: JeidnnConfig,
        backbone: Backbone,
        final_head: nn.Module,
        exit_layers: list[int],
    ) -> None:
        super().__init__([block], cfg)
        self.backbone = backbone
        self.final_head = final_head
        self.exit_layers = list(exit_layers)
        self.backbone_updates = 0
        for p in [*backbone.parameters(), *final_head.parameters()]:
            p.requires_grad_(True)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        cfg = self.cfg
        sgd = torch.optim.SGD(
            self.blocks.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=total, eta_min=cfg.min_lr)
        # AdamW, not stage 2's SGD at lr 0.01: a pretrained transformer needs the fine-tuning step size.
        shared = [*self.backbone.parameters(), *self.final_head.parameters()]
        return [sgd, torch.optim.AdamW(shared, lr=cfg.backbone_lr)], [scheduler]

    def exit_inputs(self, batch: dict[str, Tensor], train: bool) -> tuple[Tensor, Tensor]:
        """IM features ``(B, L-1, H)`` and final logits ``(B, C)`` of a batch; with gradient and dropout only
        when ``train``."""
        self.backbone.train(train)
        self.final_head.train(train)
        with torch.set_grad_enabled(train):
            pooled = self.backbone(
                model_inputs(batch, self.backbone.input_names), layers=self.exit_layers
            )  # (B, L, H)
            return pooled[:, :-1], self.final_head(pooled[:, -1])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        sgd, adamw = self.optimizers()
        phase = alternation_phase(self._steps, self.cfg.alternate_steps)
        self._steps += 1
        block = self.blocks[0]
        features, final_logits = self.exit_inputs(batch, train=phase == "im")
        labels = batch["labels"]
        if phase == "gate":
            loss = block.gate_phase_loss(features, labels, final_logits)  # (1,)
        else:
            loss = block.im_phase_loss(features, labels, final_logits)  # (1,)
        sgd.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        self.manual_backward(loss.sum())
        sgd.step()  # parameters without a gradient (the idle phase's) are skipped
        if phase == "im":
            adamw.step()
            self.backbone_updates += 1
        self.lr_schedulers().step()
        self._losses[phase].append([loss.detach()])

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.history[0][0].setdefault("backbone_updates", []).append(self.backbone_updates)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        features, final_logits = self.exit_inputs(batch, train=False)
        super().validation_step((features, batch["labels"], final_logits), batch_idx)


def train_end_to_end(
    ctx: RunContext,
    backbone: Backbone,
    heads: ExitHeads,
    dm: JeidnnDataModule,
    cache: FeatureCache,
    costs: Tensor,
) -> TrainedModel:
    """Train the single (variant, λ) of ``ctx.cfg.jeidnn`` end to end on a copy of ``backbone`` (``backbone``
    and ``heads`` stay as they are).

    Args:
        cache: the cached features of the backbone before stage 2 (train and val: gate statistics and
            initial BCE weights).
        costs: the variant's exit costs ``(L,)``.
    """
    cfg = ctx.cfg.jeidnn
    (variant,), (lam,) = cfg.variants, cfg.lambdas or []
    seed = ctx.cfg.seed
    pl.seed_everything(seed, verbose=False)
    val = cache["val"]
    val_final = eval_logits(heads.heads[-1], val.features[:, -1])
    (block,) = start_blocks(
        cache["train"].features,
        (val.features[:, :-1], val.labels, val_final),
        heads,
        [(variant, costs, [lam])],
        cfg,
        seed,
    )
    # Trained in float32 whatever dtype the run's backbone serves in; its weights are cast back when loaded
    # into a copy of that backbone (own features, export).
    backbone = copy.deepcopy(backbone).float()
    final_head = copy.deepcopy(heads.heads[-1])
    module = EndToEndModule(block, cfg, backbone, final_head, heads.layers)
    train = DataLoader(
        dm.datasets["train"],
        batch_sampler=BatchSampler(
            RandomSampler(dm.datasets["train"], generator=torch.Generator().manual_seed(seed)),
            cfg.batch_size,
            drop_last=False,
        ),
        collate_fn=dm.collator,
        num_workers=dm.cfg.num_workers,
    )
    val_loader = DataLoader(
        dm.datasets["val"],
        batch_sampler=length_sorted_batches(dm.lengths("val"), dm.cfg.eval_batch_size),
        collate_fn=dm.collator,
        num_workers=dm.cfg.num_workers,
    )
    trainer = make_trainer(
        ctx.cfg,
        ctx.run_dir,
        "stage2",
        ctx.progress,
        max_epochs=cfg.epochs,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )
    module.train()  # the backbone copy arrives in eval mode; each step sets the mode its phase needs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, train, val_loader)
    module.cpu().eval()
    model_heads = copy.deepcopy(heads).cpu().eval()
    block.ims.write_into(0, model_heads.heads[:-1])
    model_heads.heads[-1].load_state_dict(final_head.state_dict())
    for param in [*model_heads.parameters(), *backbone.parameters()]:
        param.requires_grad_(False)
    own = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    history = module.history[0][0]
    logger.info(
        "stage 2 end to end: %d backbone updates (IM-phase steps); val accuracy %.4f at cost %.3f",
        module.backbone_updates,
        history["val_accuracy"][-1] if history["val_accuracy"] else float("nan"),
        history["val_cost"][-1] if history["val_cost"] else float("nan"),
    )
    return TrainedModel(variant, float(lam), model_heads, block.gates.select(0).eval(), history, own)


def fit_end_to_end(
    ctx: RunContext,
    backbone: Backbone,
    heads: ExitHeads,
    dm: JeidnnDataModule,
    cache: FeatureCache,
    costs: dict[str, Tensor],
    store: Path | None = None,
    after_fit: Callable[[str], Any] | None = None,
) -> dict[str, list[TrainedModel]]:
    """:func:`train_end_to_end`, or its result kept in ``store`` (``round1-train.safetensors``, as stage 2
    names its fits) by an earlier, interrupted run. Returns ``{variant name: [the model]}``."""
    (variant,) = ctx.cfg.jeidnn.variants
    path = store / "round1-train.safetensors" if store is not None else None
    if path is not None and path.is_file():
        logger.info("stage 2 end to end: loaded from %s", path)
        (model,) = load_models(path, [variant], heads, backbone.hidden_size)
    else:
        model = train_end_to_end(ctx, backbone, heads, dm, cache, costs[variant.name])
        if path is not None:
            save_models(path, [model])
            if after_fit is not None:
                after_fit("round1-train")
    return {variant.name: [model]}
