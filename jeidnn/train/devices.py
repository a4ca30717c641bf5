"""Where a run computes: the configured device, and several processes for stage 0 and the feature cache.

`accelerator` names the device of every backbone pass (:func:`run_device`). With `devices: N > 1`,
Lightning's `ddp` strategy starts the other processes by running the same command again (a launcher such
as torchrun or SLURM may start them all instead). Each process runs
:func:`jeidnn.pipeline.run.run` from the top, takes its share of stage 0's batches and of the feature cache,
and returns after the cache; process 0 gathers the cache and goes on alone.

The batches of stage 0 are global: every process takes an equal share of the same seeded batch
(:class:`GlobalBatches`), and the loss is scaled so that DDP's gradient average is the single-process
gradient of the whole batch. The number of processes then changes the speed, not the result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import Sampler

from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError


def run_device(name: str, key: str = "accelerator") -> torch.device:
    """The torch device of a Lightning accelerator or torch device name: `auto` (the GPU when there is one,
    else the CPU), `cpu`, `gpu` / `cuda` / `cuda:N`, `mps`. `key` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device("cuda" if name == "gpu" else name)
    except RuntimeError:
        raise JeidnnError(f"unknown {key} {name!r}; use auto, cpu, gpu (or cuda, cuda:N) or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise JeidnnError(f"{key} {name!r} is not supported; use auto, cpu, gpu (or cuda, cuda:N) or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JeidnnError(f"{key} {name} asks for a GPU but torch sees none; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise JeidnnError(f"{key} {name}: torch sees {torch.cuda.device_count()} GPU(s); pick another")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise JeidnnError(f"{key} {name} is not available here; use cpu or auto")
    return device


LIGHTNING_ACCELERATOR = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}


def trainer_device(name: str, processes: int = 1) -> dict[str, Any]:
    """`pl.Trainer`'s `accelerator` and `devices` for the device `name` (:func:`run_device`) in `processes`
    processes: `cuda:N` becomes `devices=[N]` (Lightning refuses the torch name, and `devices=1` would be GPU
    0)."""
    device = run_device(name)
    if device.type == "cuda" and device.index is not None:
        if processes > 1:
            raise JeidnnError(
                f"accelerator {name} names one GPU but devices is {processes}; "
                "use accelerator gpu to run on several GPUs"
            )
        return {"accelerator": "gpu", "devices": [device.index]}
    return {"accelerator": LIGHTNING_ACCELERATOR[device.type], "devices": processes}


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype named `name` (float32, bfloat16 or float16); `key` names the setting in errors."""
    if name not in DTYPES:
        raise JeidnnError(f"{key} {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def run_precision(precision: str, device: torch.device) -> str:
    """Lightning's precision of stage 0 and the joint phase on `device`: `auto` = `32-true` on a CPU or MPS,
    `bf16-mixed` on a CUDA GPU that supports bfloat16, else `16-mixed`; one the device cannot run is
    refused."""
    if precision == "auto":
        if device.type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision not in PRECISIONS:
        raise JeidnnError(f"unknown precision {precision!r}; use auto, {', '.join(PRECISIONS)}")
    if precision != "32-true" and device.type == "cpu":
        raise JeidnnError(
            f"precision {precision} needs a GPU but the run is on the CPU; use precision 32-true (or auto)"
        )
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise JeidnnError(
            f"precision bf16-mixed: GPU {torch.cuda.get_device_name(device)} has no bfloat16; "
            "use precision 16-mixed (or auto)"
        )
    return precision


def stage_logger(cfg: RunConfig, run_dir: Path, stage: str) -> pl.loggers.Logger:
    """The configured logger (`logger: csv | tensorboard`) of one stage, in `runs/<name>/logs/<stage>/`."""
    if cfg.logger == "tensorboard":
        return pl.loggers.TensorBoardLogger(save_dir=str(run_dir / "logs"), name=stage)
    return pl.loggers.CSVLogger(save_dir=str(run_dir / "logs"), name=stage)


def check_logger(cfg: RunConfig) -> None:
    """Refuse `logger: tensorboard` without its package before any work starts (Lightning would fail once
    stage 0 starts)."""
    import importlib.util

    if cfg.logger == "tensorboard" and not any(
        importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
    ):
        raise JeidnnError(
            "logger is 'tensorboard' but the tensorboard package is missing; pip install tensorboard"
        )


def make_trainer(
    cfg: RunConfig, run_dir: Path, stage: str, progress: bool, *, distributed: bool = False, **kwargs
) -> pl.Trainer:
    """A Trainer on the configured device; `distributed` = in `devices` processes (stage 0, feature cache).
    `kwargs` go to `pl.Trainer` (stage 0 and the joint phase pass their `precision`)."""
    device = run_device(cfg.accelerator)
    num_nodes = launcher_num_nodes() if distributed else 1
    placement = trainer_device(cfg.accelerator, cfg.devices if distributed else 1)
    strategy: Any = "auto"
    if cfg.devices * num_nodes > 1 and distributed:
        from pytorch_lightning.strategies import DDPStrategy

        # Stage 0 leaves parts of the backbone unused (its pooler, layers after the last exit).
        strategy = DDPStrategy(
            find_unused_parameters=True, process_group_backend="gloo" if device.type == "cpu" else None
        )
    options = {
        "logger": stage_logger(cfg, run_dir, stage),
        "default_root_dir": str(run_dir),
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "log_every_n_steps": 10,
        "deterministic": False,
        # Our samplers already split the data between processes (GlobalBatches, ShardedBatches below).
        "use_distributed_sampler": False,
        **kwargs,
    }
    return pl.Trainer(
        **placement,
        num_nodes=num_nodes,
        strategy=strategy,
        **options,
    )


def global_rank() -> int:
    """This process's rank among all processes of the run (0 when alone).

    Known before any process group exists: Lightning's launcher, torchrun and SLURM set it in the
    environment of the processes they start, and Lightning reads it when imported.
    """
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes) of the process group in use, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launcher_num_nodes() -> int:
    """Nodes of a run started by torchrun or SLURM (Lightning must be told; 1 otherwise)."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        return max(1, int(env["WORLD_SIZE"]) // max(1, int(env["LOCAL_WORLD_SIZE"])))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_NNODES" in env:
        return int(env["SLURM_NNODES"])
    return 1


class GlobalBatches(Sampler[list[int]]):
    """Seeded batches of `batch_size` samples, each split across the processes.

    Epoch `e` shuffles with its own generator (seed + e), so any epoch can be replayed without the ones
    before it. Process `r` of `w` takes rows `r, r + w, ...` of each batch; a last batch with fewer rows than
    processes is dropped (only when `w > 1`, so that every process takes a step). :meth:`resume_at` skips
    the batches of an epoch that a checkpoint already trained on.

    :class:`~jeidnn.train.modules.FinetuneModule` calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self._num_batches(rank_and_world()[1])

    def _num_batches(self, world: int) -> int:
        full, last = divmod(self.num_samples, self.batch_size)
        return full + int(last >= world)  # a last batch needs a row for every process

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start epoch `epoch` at batch `batches_done` (the first batch a checkpoint has not trained on)."""
        self._resume = (epoch, batches_done)

    def global_size(self, batch_index: int) -> int:
        """Rows of global batch `batch_index` of an epoch (all processes together)."""
        return min(self.batch_size, self.num_samples - batch_index * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = rank_and_world()
        order = torch.randperm(
            self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        for b in range(start, self._num_batches(world)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield rows[rank::world].tolist()


class ShardedBatches(Sampler[list[int]]):
    """Fixed inference batches; process `r` of `w` takes batches `r, r + w, ...` (no padding, no repeats).

    A split with fewer batches than processes is dealt row by row instead, so that every process has a
    batch (Lightning refuses an empty loader and the gather would wait for it).
    """

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def _mine(self) -> list[list[int]]:
        rank, world = rank_and_world()
        if len(self.batches) >= world:
            return self.batches[rank::world]
        rows = [i for batch in self.batches for i in batch]
        if len(rows) < world:
            raise JeidnnError(
                f"a split of {len(rows)} samples cannot be shared by {world} processes; use fewer `devices`"
            )
        return [rows[rank::world]]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._mine())


def gather_to_first(obj: Any) -> list[Any] | None:
    """Every process's `obj` in rank order, in process 0 (None elsewhere); `[obj]` without a process group."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def end_processes() -> None:
    """Leave the process group once the last collective (the feature cache's gather) is done: later stages
    run in one process, and torchmetrics or Lightning would otherwise wait for the others to sync."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
