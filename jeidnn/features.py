"""Feature cache: the pooled per-exit representations of a frozen backbone, computed once.

Stages 1-3 never need the backbone again after this pass (docs/method.md); memory is
N × L × H floats per split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from jeidnn.backbone import Backbone
from jeidnn.data import JeidnnDataModule, model_inputs


@dataclass
class FeatureSplit:
    features: Tensor
    """(N, L, H) float32 pooled representation after each exit layer."""
    labels: Tensor
    """(N,) int64 class indices."""

    def __len__(self) -> int:
        return len(self.labels)


@torch.inference_mode()
def extract_features(
    backbone: Backbone, dm: JeidnnDataModule, split: str, exit_layers: list[int], progress: bool = True
) -> FeatureSplit:
    """Run the backbone once over `split` (length-bucketed batches); keep the exit layers' pooled output."""
    backbone.eval()
    dm.setup()
    n = len(dm.datasets[split])
    features = torch.empty(n, len(exit_layers), backbone.hidden_size)  # (N, L, H)
    labels = torch.empty(n, dtype=torch.long)
    loader = dm.sorted_loader(split, dm.cfg.eval_batch_size)
    for batch in tqdm(loader, desc=f"caching features [{split}]", disable=not progress, leave=False):
        pooled = backbone(model_inputs(batch, backbone.input_names), layers=exit_layers)  # (B, L, H)
        features[batch["index"]] = pooled.float()
        labels[batch["index"]] = batch["labels"]
    return FeatureSplit(features, labels)
