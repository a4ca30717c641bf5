"""Stage 0: fine-tune the backbone and the final head until validation stops improving.

Bounded by `finetune.epochs`, `max_steps` and `max_time_minutes`; validation every `val_check_interval`
steps, stopping after `patience` validations without a higher val accuracy, and the best validation's
weights restored. With stage 0 off, :func:`final_head_without_finetune` says where the final classifier
comes from instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from jeidnn.backbone import checkpoint_classifier
from jeidnn.config import FinetuneConfig
from jeidnn.data import length_sorted_batches
from jeidnn.devices import GlobalBatches, ShardedBatches, make_trainer
from jeidnn.errors import JeidnnError
from jeidnn.resume import pause_point
from jeidnn.training import FinetuneModule

if TYPE_CHECKING:
    from jeidnn.pipeline import Prepared

logger = logging.getLogger(__name__)


class ValidationRecord(pl.Callback):
    """Every validation's (step, value of `monitor`); kept in the checkpoints, so a resumed stage 0
    reports the validations of both its parts."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and not trainer.sanity_checking:
            self.history.append((int(trainer.global_step), float(value)))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(value)) for step, value in state_dict["history"]]


class _PausePoints(pl.Callback):
    """`stage0:step<N>` pause points for tests/test_resume.py (see :func:`jeidnn.resume.pause_point`)."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        pause_point(f"stage0:step{trainer.global_step}")


class _StoppedStaysStopped(pl.Callback):
    """A run killed after the validation that ended stage 0 on patience resumes with that validation's
    checkpoint; EarlyStopping only looks again at the next validation, so stop here instead."""

    def __init__(self, stop: pl.callbacks.EarlyStopping) -> None:
        self.stop = stop

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop.wait_count >= max(self.stop.patience, 1):
            trainer.should_stop = True


def finetune(p: Prepared, run_dir: Path, progress: bool, resume: bool) -> dict:
    """Stage 0: backbone + final head until val accuracy stops improving (or a step / time / epoch budget
    runs out); the best validation's weights are restored. Returns what it did, for report.json.

    Every validation saves `checkpoints/finetune/resume.ckpt`; `resume` continues from it.
    """
    cfg = p.cfg.finetune
    pl.seed_everything(p.cfg.seed, verbose=False)
    p.dm.setup()
    train_set: Any = p.dm.datasets["train"]
    if cfg.max_samples is not None and cfg.max_samples < len(train_set):
        train_set = Subset(train_set, range(cfg.max_samples))  # splits are already shuffled
    batches = GlobalBatches(len(train_set), cfg.batch_size, p.cfg.seed)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    module = FinetuneModule(
        p.backbone, p.heads.final, cfg, min(total, cfg.max_steps or total), p.heads.num_classes, batches
    )
    folder = run_dir / "checkpoints" / "finetune"
    monitor = "finetune/val_acc"
    best = pl.callbacks.ModelCheckpoint(
        dirpath=str(folder),
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        save_weights_only=True,
    )
    # Every validation, whether it improved or not (Lightning's save_last only follows a new best).
    latest = pl.callbacks.ModelCheckpoint(dirpath=str(folder), filename="resume", save_top_k=1)
    stop = pl.callbacks.EarlyStopping(
        monitor=monitor, mode="max", patience=cfg.patience, check_on_train_epoch_end=False
    )
    record = ValidationRecord(monitor)
    trainer = make_trainer(
        p.cfg,
        run_dir,
        "finetune",
        progress,
        distributed=True,
        max_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        max_time={"minutes": cfg.max_time_minutes} if cfg.max_time_minutes else None,
        val_check_interval=cfg.val_check_interval or 1.0,
        check_val_every_n_epoch=None if cfg.val_check_interval else 1,
        num_sanity_val_steps=0,
        callbacks=[record, stop, _StoppedStaysStopped(stop), _PausePoints(), best, latest],
    )
    # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as found:
    # without this the backbone would fine-tune with dropout off.
    module.train()
    last = folder / "resume.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        logger.info("stage 0 continues from %s", last)
    if trainer.world_size > 1:
        logger.info("stage 0 and the feature cache in %d processes (Lightning DDP)", trainer.world_size)
    val_batches = ShardedBatches(length_sorted_batches(p.dm.lengths("val"), p.dm.cfg.eval_batch_size))
    train_loader = _loader(p, train_set, batches)
    val_loader = _loader(p, p.dm.datasets["val"], val_batches)
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return _summary(trainer, record, stop, cfg, steps_per_epoch)


def _loader(p: Prepared, dataset: Any, batch_sampler: Any) -> DataLoader:
    # Its own generator: creating an iterator must not draw from the global random state, or a run resumed
    # from a checkpoint would draw other dropout masks than an uninterrupted one.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=p.dm.collator,
        num_workers=p.dm.cfg.num_workers,
        generator=torch.Generator().manual_seed(p.cfg.seed),
    )


def _summary(
    trainer: pl.Trainer,
    record: ValidationRecord,
    stop: pl.callbacks.EarlyStopping,
    cfg: FinetuneConfig,
    steps_per_epoch: int,
) -> dict:
    """report.json's `finetune`: steps, validations, the one kept, and why training stopped."""
    steps = int(trainer.global_step)
    timer = next((c for c in trainer.callbacks if isinstance(c, pl.callbacks.Timer)), None)
    if stop.wait_count >= max(cfg.patience, 1):
        why = f"val accuracy did not rise for {cfg.patience} validations (finetune.patience)"
    elif timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        why = f"time budget finetune.max_time_minutes {cfg.max_time_minutes} reached"
    elif cfg.max_steps is not None and steps >= cfg.max_steps:
        why = f"step budget finetune.max_steps {cfg.max_steps} reached"
    else:
        why = f"finetune.epochs {cfg.epochs} done"
    history = record.history
    summary: dict[str, Any] = {
        "processes": int(trainer.world_size),
        "steps": steps,
        "epochs": round(steps / max(steps_per_epoch, 1), 3),
        "validations": [{"step": step, "val_accuracy": acc} for step, acc in history],
        "stopped": why,
    }
    if history:
        best_step, best_acc = max(history, key=lambda h: h[1])  # the first of equal ones, as the checkpoint
        summary.update(best_step=best_step, best_val_accuracy=best_acc, kept="the best validation's weights")
        logger.info(
            "stage 0: %d steps (%.2f epochs), %d validations, kept the best (val accuracy %.4f at step %d); "
            "stopped: %s",
            steps, summary["epochs"], len(history), best_acc, best_step, why,
        )  # fmt: skip
    else:
        summary["kept"] = (
            "the last weights (no validation ran: finetune.val_check_interval exceeds the steps)"
        )
        logger.warning("stage 0: %d steps and no validation; the last weights are kept (%s)", steps, why)
    return summary


def final_head_without_finetune(p: Prepared) -> tuple[dict, bool]:
    """Where the final classifier comes from when stage 0 does not run: the checkpoint's own trained
    classifier, else training with the IMs in stage 1. Returns report.json's `finetune` entry and whether
    stage 1 trains the final head."""
    found = checkpoint_classifier(p.cfg.model, p.raw.label_names, p.backbone.pooling)
    off = "finetune.enabled is false" if not p.cfg.finetune.enabled else "finetune.epochs is 0"
    if found.state is not None:
        p.heads.final.load_state_dict(found.state)
        logger.info("stage 0 skipped (%s): the final exit is %s", off, found.reason)
        return {"skipped": off, "final_head": found.reason}, False
    if p.cfg.warmup.max_epochs == 0:
        raise JeidnnError(
            f"{off} and the final classifier would stay untrained ({found.reason}) with warmup.max_epochs 0; "
            "enable finetune or set warmup.max_epochs > 0"
        )
    reason = f"trained with the IMs in stage 1 on frozen features ({found.reason})"
    logger.info("stage 0 skipped (%s): the final exit is %s", off, reason)
    return {"skipped": off, "final_head": reason}, True
