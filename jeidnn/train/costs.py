"""Exit costs of a run: the FLOPs of leaving at each exit, counted once on the train split.

The costs feed stage 2's λ·c, the gate targets and the budget choices on calib, so they are counted on the
split the models train on; the test cost a report gives is the mean of these costs over the exits taken.
"""

from __future__ import annotations

import torch

from jeidnn.data.datamodule import JeidnnDataModule, model_inputs
from jeidnn.model.backbone import Backbone
from jeidnn.model.cost import ExitCosts, exit_costs, text_cost_samples
from jeidnn.model.heads import ExitHeads


def count_exit_costs(
    backbone: Backbone, heads: ExitHeads, dm: JeidnnDataModule, device: torch.device, split: str = "train"
) -> ExitCosts:
    """FLOPs of every exit of ``heads`` on ``split`` (text: the mean over its real token lengths, unpadded;
    images: all the same size), counted on ``device``; ``backbone`` and ``heads`` go back to the CPU."""
    ds = dm.datasets[split]
    if backbone.modality == "text":
        samples = text_cost_samples(ds.encoded)
        counted = f"mean over the {split} split's real token lengths ({len(ds)} samples, unpadded)"
    else:
        batch = dm.collator([ds[i] for i in range(min(8, len(ds)))])
        samples = [(model_inputs(batch, backbone.input_names), 1.0)]
        counted = f"{split} images (all the same size)"
    samples = [({k: v.to(device) for k, v in inputs.items()}, weight) for inputs, weight in samples]
    backbone.to(device)
    heads.to(device)
    try:
        return exit_costs(backbone, heads, samples, counted)
    finally:
        backbone.cpu()
        heads.cpu()
