"""Stage 0 (backbone + final head) and the joint phase (backbone + every exit): train until validation stops
improving.

Bounded by `finetune.epochs`, `max_steps` and `max_time_minutes`; validation every `val_check_interval`
steps, stopping after `patience` validations without a higher val accuracy, and the best validation's
weights restored. The joint phase of `regime: joint | mixed` runs the same loop with the `joint` section's
step budget, learning rates and stopping rules (:func:`phase_config`). With stage 0 off,
:func:`final_head_without_finetune` says where the final classifier comes from instead.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from jeidnn.config.schema import FinetuneConfig, RunConfig
from jeidnn.data.datamodule import JeidnnDataModule, length_sorted_batches
from jeidnn.errors import JeidnnError
from jeidnn.log import pause_point
from jeidnn.model.backbone import Backbone
from jeidnn.model.checkpoint_head import checkpoint_classifier
from jeidnn.model.heads import ExitHead, ExitHeads
from jeidnn.train.devices import GlobalBatches, ShardedBatches, make_trainer
from jeidnn.train.modules import FinetuneModule, JointModule
from jeidnn.train.results import JointResult, Stage0Result

if TYPE_CHECKING:
    from jeidnn.train.context import RunContext

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
    """`stage0:step<N>` / `joint:step<N>` pause points for the resume tests (see
    :func:`jeidnn.log.pause_point`)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        pause_point(f"{self.prefix}:step{trainer.global_step}")


class _StoppedStaysStopped(pl.Callback):
    """A run killed after the validation that ended stage 0 on patience resumes with that validation's
    checkpoint; EarlyStopping only looks again at the next validation, so stop here instead."""

    def __init__(self, stop: pl.callbacks.EarlyStopping) -> None:
        self.stop = stop

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop.wait_count >= max(self.stop.patience, 1):
            trainer.should_stop = True


Phase = Literal["finetune", "joint"]


def phase_config(cfg: RunConfig, phase: Phase) -> FinetuneConfig:
    """The loop settings of `phase`: stage 0's, or stage 0's data settings (batch size, samples, epochs) with
    the `joint` section's step budget, learning rates and stopping rules."""
    if phase == "finetune":
        return cfg.finetune
    jt = cfg.joint
    return dataclasses.replace(
        cfg.finetune,
        max_steps=jt.max_steps,
        lr=jt.lr,
        head_lr=jt.head_lr,
        weight_decay=jt.weight_decay,
        warmup_fraction=jt.warmup_fraction,
        val_check_interval=jt.val_check_interval,
        patience=jt.patience,
        max_time_minutes=jt.max_time_minutes,
    )


def exit_weights(cfg: RunConfig, num_exits: int) -> torch.Tensor:
    """(L,) weights of the joint phase's per-exit cross-entropies (`joint.exit_weights`, default ones)."""
    weights = cfg.joint.exit_weights
    if weights is None:
        return torch.ones(num_exits)
    if len(weights) != num_exits:
        raise JeidnnError(
            f"joint.exit_weights has {len(weights)} weights but the model has {num_exits} exits; "
            "give one weight per exit, first exit first"
        )
    return torch.tensor(weights, dtype=torch.float32)


def stage0(ctx: RunContext, backbone: Backbone, heads: ExitHeads, dm: JeidnnDataModule) -> Stage0Result:
    """Stage 0: fine-tunes ``backbone`` and ``heads.final`` in place (see :func:`finetune`)."""
    return Stage0Result(finetune(ctx, backbone, heads, dm, "finetune"), train_final_head=False)


def joint_phase(ctx: RunContext, backbone: Backbone, heads: ExitHeads, dm: JeidnnDataModule) -> JointResult:
    """The joint phase: trains ``backbone`` and every exit of ``heads`` in place (see :func:`finetune`)."""
    return JointResult(finetune(ctx, backbone, heads, dm, "joint"))


def finetune(
    ctx: RunContext, backbone: Backbone, heads: ExitHeads, dm: JeidnnDataModule, phase: Phase = "finetune"
) -> dict:
    """Stage 0 (backbone + final head) or the joint phase (backbone + every exit) until val accuracy stops
    improving (or a step / time / epoch budget runs out); the best validation's weights are restored into
    ``backbone`` and ``heads`` (trained in place). Returns what it did, for report.json (`finetune` or
    `regime.joint`).

    Every validation saves `checkpoints/<phase>/resume.ckpt`; `ctx.cfg.resume` continues from it.
    """
    run_dir, progress, resume = ctx.run_dir, ctx.progress, ctx.cfg.resume
    cfg = phase_config(ctx.cfg, phase)
    pl.seed_everything(ctx.cfg.seed, verbose=False)
    dm.setup()
    train_set: Any = dm.datasets["train"]
    if cfg.max_samples is not None and cfg.max_samples < len(train_set):
        train_set = Subset(train_set, range(cfg.max_samples))  # splits are already shuffled
    batches = GlobalBatches(len(train_set), cfg.batch_size, ctx.cfg.seed)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    steps = min(total, cfg.max_steps or total)
    if phase == "finetune":
        module = FinetuneModule(backbone, heads.final, cfg, steps, heads.num_classes, batches)
    else:
        weights = exit_weights(ctx.cfg, heads.num_exits)
        module = JointModule(backbone, heads, heads.layers, cfg, steps, batches, weights)
    folder = run_dir / "checkpoints" / phase
    monitor = f"{phase}/val_acc"
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
        ctx.cfg,
        run_dir,
        phase,
        progress,
        distributed=True,
        precision=ctx.precision,
        max_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        max_time={"minutes": cfg.max_time_minutes} if cfg.max_time_minutes else None,
        val_check_interval=cfg.val_check_interval or 1.0,
        check_val_every_n_epoch=None if cfg.val_check_interval else 1,
        num_sanity_val_steps=0,
        callbacks=[record, stop, _StoppedStaysStopped(stop), _PausePoints(_PAUSE[phase]), best, latest],
    )
    # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as found:
    # without this the backbone would fine-tune with dropout off.
    module.train()
    last = folder / "resume.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        logger.info("%s continues from %s", _NAME[phase], last)
    if trainer.world_size > 1:
        logger.info("stage 0 and the feature cache in %d processes (Lightning DDP)", trainer.world_size)
    val_batches = ShardedBatches(length_sorted_batches(dm.lengths("val"), dm.cfg.eval_batch_size))
    train_loader = _loader(dm, train_set, batches, ctx.cfg.seed)
    val_loader = _loader(dm, dm.datasets["val"], val_batches, ctx.cfg.seed)
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return _summary(trainer, record, stop, cfg, steps_per_epoch, phase)


_PAUSE = {"finetune": "stage0", "joint": "joint"}
_NAME = {"finetune": "stage 0", "joint": "the joint phase"}


def _loader(dm: JeidnnDataModule, dataset: Any, batch_sampler: Any, seed: int) -> DataLoader:
    # Its own generator: creating an iterator must not draw from the global random state, or a run resumed
    # from a checkpoint would draw other dropout masks than an uninterrupted one.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=dm.collator,
        num_workers=dm.cfg.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def _summary(
    trainer: pl.Trainer,
    record: ValidationRecord,
    stop: pl.callbacks.EarlyStopping,
    cfg: FinetuneConfig,
    steps_per_epoch: int,
    phase: Phase = "finetune",
) -> dict:
    """report.json's `finetune` (or `regime.joint`): steps, validations, the one kept, and why training
    stopped. The joint phase's val accuracy is the mean over the exits."""
    section = "joint" if phase == "joint" else "finetune"
    steps = int(trainer.global_step)
    timer = next((c for c in trainer.callbacks if isinstance(c, pl.callbacks.Timer)), None)
    if stop.wait_count >= max(cfg.patience, 1):
        why = f"val accuracy did not rise for {cfg.patience} validations ({section}.patience)"
    elif timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        why = f"time budget {section}.max_time_minutes {cfg.max_time_minutes} reached"
    elif cfg.max_steps is not None and steps >= cfg.max_steps:
        why = f"step budget {section}.max_steps {cfg.max_steps} reached"
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
            "%s: %d steps (%.2f epochs), %d validations, kept the best (val accuracy %.4f at step %d); "
            "stopped: %s",
            _NAME[phase], steps, summary["epochs"], len(history), best_acc, best_step, why,
        )  # fmt: skip
    else:
        summary["kept"] = (
            f"the last weights (no validation ran: {section}.val_check_interval exceeds the steps)"
        )
        logger.warning(
            "%s: %d steps and no validation; the last weights are kept (%s)", _NAME[phase], steps, why
        )
    return summary


def final_head_without_finetune(
    cfg: RunConfig, label_names: list[str], pooling: str, final_head: ExitHead
) -> Stage0Result:
    """Where the final classifier comes from when stage 0 does not run: the checkpoint's own trained
    classifier (loaded into ``final_head`` in place), else training with the IMs in stage 1."""
    found = checkpoint_classifier(cfg.model, label_names, pooling)
    off = "finetune.enabled is false" if not cfg.finetune.enabled else "finetune.epochs is 0"
    if found.state is not None:
        final_head.load_state_dict(found.state)
        logger.info("stage 0 skipped (%s): the final exit is %s", off, found.reason)
        return Stage0Result({"skipped": off, "final_head": found.reason}, train_final_head=False)
    if cfg.warmup.max_epochs == 0:
        raise JeidnnError(
            f"{off} and the final classifier would stay untrained ({found.reason}) with warmup.max_epochs 0; "
            "enable finetune or set warmup.max_epochs > 0"
        )
    reason = f"trained with the IMs in stage 1 on frozen features ({found.reason})"
    logger.info("stage 0 skipped (%s): the final exit is %s", off, reason)
    return Stage0Result({"skipped": off, "final_head": reason}, train_final_head=True)
