"""Stage 0 (fine-tune backbone + final head) and stage 1 (IM warm-up on cached features).

Both are LightningModules driven by `pl.Trainer` from :mod:`jeidnn.pipeline`.
"""

from __future__ import annotations

import copy
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from jeidnn.backbone import Backbone
from jeidnn.config import FinetuneConfig, WarmupConfig
from jeidnn.data import model_inputs
from jeidnn.features import FeatureSplit
from jeidnn.heads import ExitHead, ExitHeads


class FinetuneModule(pl.LightningModule):
    """Stage 0: cross-entropy on the final head over the last layer's pooled output."""

    def __init__(self, backbone: Backbone, head: ExitHead, cfg: FinetuneConfig, total_steps: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cfg = cfg
        self.total_steps = max(total_steps, 1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        pooled = self.backbone(
            model_inputs(batch, self.backbone.input_names), layers=[self.backbone.num_layers]
        )
        return self.head(pooled[:, 0])  # (B, C)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("finetune/train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("finetune/val_acc", acc, prog_bar=True, batch_size=len(logits))

    def configure_optimizers(self):
        params = [
            {"params": self.backbone.parameters(), "lr": self.cfg.lr},
            {"params": self.head.parameters(), "lr": self.cfg.head_lr},
        ]
        optimizer = torch.optim.AdamW(params, weight_decay=self.cfg.weight_decay)
        warmup = int(self.cfg.warmup_fraction * self.total_steps)

        def schedule(step: int) -> float:
            # Linear warm-up then linear decay, as in the BERT fine-tuning recipe.
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            return max(0.0, (self.total_steps - step) / max(self.total_steps - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


class WarmupModule(pl.LightningModule):
    """Stage 1: train the IMs on cached features of the frozen backbone.

    Loss Σ_l (L + 1 − l) · CE_l over the IMs still training (docs/method.md). Each IM stops on
    its own when its val accuracy has not improved for `patience` epochs, and its best
    weights are restored; training ends when every IM has stopped.
    """

    def __init__(self, heads: ExitHeads, val: FeatureSplit, cfg: WarmupConfig) -> None:
        super().__init__()
        self.heads = heads
        for p in heads.final.parameters():
            p.requires_grad_(False)
        self.val = val
        self.cfg = cfg
        num_ims = heads.num_exits - 1
        self.best_acc = [-math.inf] * num_ims
        self.best_state = [copy.deepcopy(h.state_dict()) for h in heads.heads[:-1]]
        self.bad_epochs = [0] * num_ims
        self.active = [True] * num_ims
        self.best_epoch = [0] * num_ims
        L = heads.num_exits
        self.register_buffer("weights", torch.tensor([float(L - i) for i in range(num_ims)]))  # (L-1,)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, labels = batch  # (B, L, H), (B,)
        active = [i for i, a in enumerate(self.active) if a]
        losses = torch.stack(
            [F.cross_entropy(self.heads.heads[i](features[:, i]), labels) for i in active]
        )  # (A,)
        loss = (self.weights[active] * losses).sum()
        self.log("warmup/train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        accs = self.val_accuracy()
        for i, acc in enumerate(accs):
            self.log(f"warmup/val_acc_exit{i + 1}", acc)
            if not self.active[i]:
                continue
            if acc > self.best_acc[i]:
                self.best_acc[i] = acc
                self.best_state[i] = copy.deepcopy(self.heads.heads[i].state_dict())
                self.best_epoch[i] = self.current_epoch
                self.bad_epochs[i] = 0
            else:
                self.bad_epochs[i] += 1
                if self.bad_epochs[i] >= self.cfg.patience:
                    self.active[i] = False
                    self.heads.heads[i].load_state_dict(self.best_state[i])
                    for p in self.heads.heads[i].parameters():
                        p.requires_grad_(False)
        if not any(self.active):
            self.trainer.should_stop = True

    @torch.no_grad()
    def val_accuracy(self) -> list[float]:
        was = self.heads.training
        self.heads.eval()
        feats = self.val.features.to(self.device)
        labels = self.val.labels.to(self.device)
        accs = [
            (self.heads.heads[i](feats[:, i]).argmax(-1) == labels).float().mean().item()
            for i in range(self.heads.num_exits - 1)
        ]
        self.heads.train(was)
        return accs

    def restore_best(self) -> None:
        """Load each IM's best weights and make the IMs trainable again (stage 2 trains them)."""
        for i, state in enumerate(self.best_state):
            self.heads.heads[i].load_state_dict(state)
            for p in self.heads.heads[i].parameters():
                p.requires_grad_(True)

    def configure_optimizers(self):
        params = [p for h in self.heads.heads[:-1] for p in h.parameters()]
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def feature_loader(split: FeatureSplit, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(split.features, split.labels),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
    )


@torch.no_grad()
def exit_logits(heads: ExitHeads, split: FeatureSplit, batch_size: int = 4096) -> Tensor:
    """Per-exit logits (N, L, C) of `heads` on cached features."""
    was = heads.training
    heads.eval()
    out = torch.cat([heads(split.features[i : i + batch_size]) for i in range(0, len(split), batch_size)])
    heads.train(was)
    return out


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
