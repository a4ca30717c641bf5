"""Stage 0 (fine-tune backbone + final head), the joint phase (backbone + every exit, `regime: joint |
mixed`) and stage 1 (IM warm-up on cached features).

All are LightningModules driven by `pl.Trainer` from :mod:`jeidnn.train.finetune` and
:mod:`jeidnn.train.warmup`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from jeidnn.config.schema import FinetuneConfig, WarmupConfig
from jeidnn.data.datamodule import model_inputs
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHead, ExitHeads
from jeidnn.train.devices import GlobalBatches
from jeidnn.train.features import FeatureSplit
from jeidnn.train.losses import summed_exit_ce, warmup_loss


class FinetuneModule(pl.LightningModule):
    """Stage 0: cross-entropy on the final head over the last layer's pooled output.

    Built to resume exactly: the learning rate is a function of the optimizer step (linear warm-up, then
    linear decay to 0 at `total_steps`, as in the BERT fine-tuning recipe), and a checkpoint also carries
    the random state and how many batches of its epoch were trained on.

    Args:
        batches: the training batch sampler; its global batch sizes scale the loss (see `training_step`),
            and a loaded checkpoint tells it where to resume.
        num_classes: for the validation accuracy (a torchmetrics metric, so it is summed over processes).
    """

    stage = "finetune"
    """Prefix of the logged metrics (`<stage>/val_acc` is what the checkpoints monitor)."""

    def __init__(
        self,
        backbone: Backbone,
        head: ExitHead,
        cfg: FinetuneConfig,
        total_steps: int,
        num_classes: int,
        batches: GlobalBatches,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cfg = cfg
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = int(cfg.warmup_fraction * self.total_steps)
        self.batches = batches
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self._batches_done = 0
        self._restore: dict | None = None

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        pooled = self.backbone(
            model_inputs(batch, self.backbone.input_names), layers=[self.backbone.num_layers]
        )
        return self.head(pooled[:, 0])  # (B, C)

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1))

    def on_train_epoch_start(self) -> None:
        self.batches.set_epoch(self.current_epoch)  # Lightning only tells a batch sampler's inner sampler

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self._restore is not None:
            # The random state of the step after the checkpoint, so dropout draws what it drew then.
            torch.set_rng_state(self._restore["rng"])
            if torch.cuda.is_available() and len(self._restore["cuda_rng"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(self._restore["cuda_rng"])
            self._restore = None
        factor = self.lr_factor(self.global_step)
        for group, lr in zip(self.trainer.optimizers[0].param_groups, (self.cfg.lr, self.cfg.head_lr)):
            group["lr"] = lr * factor

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)  # (b, C): this process's rows of the global batch
        # DDP averages the processes' gradients: a sum over our rows x processes / global rows makes that
        # average the gradient of the mean loss over the whole global batch, as with one process.
        scale = self.trainer.world_size / self.batches.global_size(batch_idx)
        loss = self.loss_sum(logits, batch["labels"]) * scale
        self.log(f"{self.stage}/train_loss", loss, prog_bar=True, sync_dist=self.trainer.world_size > 1)
        return loss

    def loss_sum(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss summed over the rows of `logits` (b, C)."""
        return F.cross_entropy(logits, labels, reduction="sum")

    def val_pairs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The (predictions, labels) the validation accuracy counts."""
        return logits, labels

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._batches_done = batch_idx + 1

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_accuracy.update(*self.val_pairs(self(batch), batch["labels"]))
        self.log(f"{self.stage}/val_acc", self.val_accuracy, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["jeidnn_position"] = {
            "epoch": self.current_epoch,
            "batches_done": self._batches_done,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        position = checkpoint["jeidnn_position"]
        self.batches.resume_at(position["epoch"], position["batches_done"])
        self._restore = position

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [
            {"params": self.backbone.parameters(), "lr": self.cfg.lr},
            {"params": self.head.parameters(), "lr": self.cfg.head_lr},
        ]
        return torch.optim.AdamW(params, weight_decay=self.cfg.weight_decay)


class JointModule(FinetuneModule):
    """The joint phase: backbone, every IM and the final head on Σ_l w_l CE_l (`regime: joint | mixed`).

    Stage 0's loop (step-based learning rate, exact resume, global batches); the exits train at
    `head_lr`. The validation accuracy it reports (and the checkpoints keep the best of) is the mean of the
    exits' val accuracies: every exit serves some samples at inference.

    Args:
        heads: every exit (trained in place).
        exit_layers: 1-based backbone layers of the exits.
        exit_weights: (L,) w_l; ones give the plain sum :func:`jeidnn.train.losses.warmup_loss` trains.
    """

    stage = "joint"

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        exit_layers: list[int],
        cfg: FinetuneConfig,
        total_steps: int,
        batches: GlobalBatches,
        exit_weights: Tensor,
    ) -> None:
        super().__init__(backbone, heads, cfg, total_steps, heads.num_classes, batches)  # type: ignore[arg-type]
        self.exit_layers = list(exit_layers)
        self.register_buffer("exit_weights", exit_weights.float(), persistent=False)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        pooled = self.backbone(
            model_inputs(batch, self.backbone.input_names), layers=self.exit_layers
        )  # (B, L, H)
        return self.head(pooled)  # (B, L, C)

    def loss_sum(self, logits: Tensor, labels: Tensor) -> Tensor:
        return summed_exit_ce(logits, labels, "sum", self.exit_weights)

    def val_pairs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # Every (sample, exit) pair counts once: their accuracy is the mean of the exits' accuracies.
        return logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1])  # (B·L, C), (B·L,)


class WarmupModule(pl.LightningModule):
    """Stage 1: train the IMs on cached features of the frozen backbone.

    Loss Σ_l CE_l over the heads still training (:func:`jeidnn.train.losses.warmup_loss`). Each head stops on
    its own when its val accuracy has not improved for `patience` epochs, and its best
    weights are restored; training ends when every head has stopped.

    Args:
        train_final: also train the final classifier (weight 1), for a backbone that was not
            fine-tuned and brought no trained classifier of its own.
        keep_start: the heads arrive trained (the joint phase of `regime: joint | mixed`): their val
            accuracy is the one to beat, so a head keeps its starting weights (best epoch -1) unless an
            epoch of warm-up improves on them.
    """

    def __init__(
        self,
        heads: ExitHeads,
        val: FeatureSplit,
        cfg: WarmupConfig,
        train_final: bool = False,
        keep_start: bool = False,
    ) -> None:
        super().__init__()
        self.heads = heads
        for p in heads.final.parameters():
            p.requires_grad_(train_final)
        self.val = val
        self.cfg = cfg
        L = heads.num_exits
        self.trained = list(range(L if train_final else L - 1))
        """Indices of the heads this stage trains."""
        n = len(self.trained)
        self.best_acc = [-math.inf] * n
        self.best_state = [copy.deepcopy(heads.heads[i].state_dict()) for i in self.trained]
        self.bad_epochs = [0] * n
        self.active = [True] * n
        self.best_epoch = [0] * n
        if keep_start:
            self.best_acc = self.val_accuracy()
            self.best_epoch = [-1] * n

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, labels = batch  # (B, L, H), (B,)
        active = [j for j, a in enumerate(self.active) if a]
        heads = [self.trained[j] for j in active]
        logits = torch.stack([self.heads.heads[i](features[:, i]) for i in heads], dim=1)  # (B, A, C)
        loss = warmup_loss(logits, labels)
        self.log("warmup/train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        accs = self.val_accuracy()
        for j, acc in enumerate(accs):
            i = self.trained[j]
            self.log(f"warmup/val_acc_exit{i + 1}", acc)
            if not self.active[j]:
                continue
            if acc > self.best_acc[j]:
                self.best_acc[j] = acc
                self.best_state[j] = copy.deepcopy(self.heads.heads[i].state_dict())
                self.best_epoch[j] = self.current_epoch
                self.bad_epochs[j] = 0
            else:
                self.bad_epochs[j] += 1
                if self.bad_epochs[j] >= self.cfg.patience:
                    self.active[j] = False
                    self.heads.heads[i].load_state_dict(self.best_state[j])
                    for p in self.heads.heads[i].parameters():
                        p.requires_grad_(False)
        if not any(self.active):
            self.trainer.should_stop = True

    @torch.no_grad()
    def val_accuracy(self) -> list[float]:
        """Val accuracy of each trained head, in the order of `trained`."""
        was = self.heads.training
        self.heads.eval()
        feats = self.val.features.to(self.device)
        labels = self.val.labels.to(self.device)
        accs = [
            (self.heads.heads[i](feats[:, i]).argmax(-1) == labels).float().mean().item()
            for i in self.trained
        ]
        self.heads.train(was)
        return accs

    def restore_best(self) -> None:
        """Load each head's best weights; the IMs become trainable again (stage 2 trains them), the final
        head stays frozen."""
        for j, state in enumerate(self.best_state):
            i = self.trained[j]
            self.heads.heads[i].load_state_dict(state)
            for p in self.heads.heads[i].parameters():
                p.requires_grad_(i < self.heads.num_exits - 1)

    def configure_optimizers(self):
        params = [p for i in self.trained for p in self.heads.heads[i].parameters()]
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
