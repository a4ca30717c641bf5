"""A finished run's data for pruning: its splits encoded as training encoded them, and every exit's
predictions of a model on a split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jeidnn.config.schema import RunConfig
from jeidnn.data.datamodule import JeidnnDataModule
from jeidnn.data.sources import load_raw
from jeidnn.data.splits import check_fingerprint, make_splits
from jeidnn.model.backbone import Backbone


@dataclass(frozen=True)
class RunData:
    """A run's config and its splits, encoded by the model's preprocessor as training encoded them."""

    cfg: RunConfig
    dm: JeidnnDataModule


def run_data(run: Any, backbone: Backbone, preprocessor: Any) -> RunData:
    """The run's splits, encoded by the model's preprocessor as training encoded them (no model parts);
    refused when the data no longer gives the splits the run recorded."""
    cfg = run.cfg
    raw = load_raw(cfg.data, backbone.modality)
    splits = make_splits(len(raw.labels), cfg.data, cfg.seed, raw.test_positions)
    check_fingerprint(raw, splits, run.report["dataset"].get("fingerprint"), cfg.data)
    dm = JeidnnDataModule(cfg.data, raw, splits, preprocessor, cfg.model.max_length, cfg.seed)
    dm.setup()
    return RunData(cfg, dm)


def batches(
    loader: Any, names: tuple[str, ...], device: torch.device
) -> Iterator[tuple[dict, Tensor, Tensor]]:
    """``(inputs on device, labels (B,) on device, positions in the split (B,))`` per batch."""
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k in names}
        yield inputs, batch["labels"].to(device), batch["index"]


@torch.no_grad()
def forward_split(
    model: Any, data: RunData, split: str, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Every exit's logits ``(N, L, C)``, the exit taken ``(N,)`` and the labels ``(N,)`` of ``split``, in
    split order (the full path; the layer-skipping path takes the same exits)."""
    n = len(data.dm.datasets[split])
    loader = data.dm.sorted_loader(split, data.cfg.data.eval_batch_size)
    logits = torch.zeros(n, model.num_exits, model.num_classes)
    exits, labels = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for inputs, y, index in batches(loader, model.backbone.input_names, device):
        out = model.forward_full(inputs)
        logits[index], exits[index], labels[index] = (
            out.exit_logits.float().cpu(),
            out.exit_index.cpu(),
            y.cpu(),
        )
    return logits, exits, labels
