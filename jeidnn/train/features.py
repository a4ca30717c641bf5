"""Feature cache: the pooled per-exit representations of a frozen backbone, computed once.

Stages 1-3 never need the backbone again after this pass (docs/method.md); memory is
N × L × H floats per split. The pass is a Lightning `predict`, so it runs on the configured
accelerator, and with several processes (`devices` > 1) each takes every w-th batch; process 0
gathers the features back into the split's order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from jeidnn.data.datamodule import JeidnnDataModule, length_sorted_batches, model_inputs
from jeidnn.io import write_safetensors
from jeidnn.model.backbone import Backbone
from jeidnn.train.devices import ShardedBatches, gather_to_first, global_rank


@dataclass
class FeatureSplit:
    features: Tensor
    """(N, L, H) float32 pooled representation after each exit layer."""
    labels: Tensor
    """(N,) int64 class indices."""

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        write_safetensors(
            path, {"features": self.features, "labels": self.labels}
        )  # a kill leaves no half file

    @classmethod
    def load(cls, path: Path) -> FeatureSplit:
        tensors = load_file(str(path))
        # Copies in memory torch allocates: vectorised CPU reductions sum in an order that depends on the
        # alignment of their input, and a file's tensors sit at other offsets than the features computed
        # in memory; stage 2 then drifted in the last bits on a resumed run.
        return cls(tensors["features"].clone(), tensors["labels"].clone())


class FeatureExtractor(pl.LightningModule):
    """`predict` module: pooled exit-layer features of each batch, gathered in process 0 at the end."""

    def __init__(self, backbone: Backbone, exit_layers: list[int], desc: str, progress: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.exit_layers = exit_layers
        self.desc = desc
        self.progress = progress
        self.result: tuple[Tensor, Tensor, Tensor] | None = None
        """(index (N,), features (N, L, H), labels (N,)) of every process, in process 0 only."""

    def on_predict_epoch_start(self) -> None:
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []
        total = int(self.trainer.num_predict_batches[0])
        self._bar = tqdm(
            total=total, desc=self.desc, disable=not self.progress or global_rank() != 0, leave=False
        )

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pooled = self.backbone(
            model_inputs(batch, self.backbone.input_names), layers=self.exit_layers
        )  # (B, L, H)
        self._parts.append((batch["index"].cpu(), pooled.float().cpu(), batch["labels"].cpu()))
        self._bar.update()

    def on_predict_epoch_end(self) -> None:
        self._bar.close()
        mine = tuple(torch.cat(column) for column in zip(*self._parts)) if self._parts else None
        gathered = gather_to_first(mine)
        if gathered is not None:
            parts = [part for part in gathered if part is not None]
            self.result = tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[assignment]


def extract_features(
    backbone: Backbone,
    dm: JeidnnDataModule,
    split: str,
    exit_layers: list[int],
    progress: bool = True,
    trainer: pl.Trainer | None = None,
) -> FeatureSplit | None:
    """Run the frozen backbone once over `split` (length-bucketed batches); keep the exit layers' pooled
    output.

    Args:
        trainer: the Trainer that runs the pass (its accelerator, devices and strategy); None = one
            process on the GPU when there is one, else the CPU.

    Returns:
        The split's features in its own order; None in a process other than the first.
    """
    if trainer is None:
        trainer = pl.Trainer(
            accelerator="auto", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
        )
    dm.setup()
    n = len(dm.datasets[split])
    loader = DataLoader(
        dm.datasets[split],
        batch_sampler=ShardedBatches(length_sorted_batches(dm.lengths(split), dm.cfg.eval_batch_size)),
        collate_fn=dm.collator,
        num_workers=dm.cfg.num_workers,
    )
    module = FeatureExtractor(backbone, exit_layers, f"caching features [{split}]", progress)
    was_training = backbone.training
    with warnings.catch_warnings():
        # ShardedBatches covers every sample exactly once; predict_step keeps its output itself.
        warnings.filterwarnings("ignore", ".*custom batch sampler.*")
        warnings.filterwarnings("ignore", ".*predict returned None.*")
        trainer.predict(module, loader, return_predictions=False)
    backbone.train(was_training)
    if module.result is None:
        return None
    index, pooled, labels = module.result
    features = torch.empty(n, len(exit_layers), backbone.hidden_size)  # (N, L, H)
    features[index] = pooled
    ordered_labels = torch.empty(n, dtype=torch.long)
    ordered_labels[index] = labels
    return FeatureSplit(features, ordered_labels)
