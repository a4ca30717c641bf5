"""Recovery fine-tune of a pruned model: a few optimizer steps on train, the cross-entropy summed over
the exits (the gates stay as they are)."""

from __future__ import annotations

from typing import Any

import torch

from jeidnn.compress.run_data import RunData, batches
from jeidnn.model.backbone import Backbone
from jeidnn.train.losses import summed_exit_ce


def recover(
    backbone: Backbone,
    heads: Any,
    data: RunData,
    steps: int,
    lr: float,
    device: torch.device,
    progress: bool,
) -> list[float]:
    """``steps`` AdamW steps on train batches, the cross-entropy summed over exits; returns the losses."""
    from tqdm.auto import tqdm

    cfg = data.cfg
    torch.manual_seed(cfg.seed)  # dropout draws; the loader's order is seeded by the data module
    params = [p for module in (backbone, heads) for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.finetune.weight_decay)
    loader = data.dm.loader("train", cfg.finetune.batch_size, shuffle=True)
    backbone.train()
    heads.train()
    losses: list[float] = []
    with tqdm(total=steps, desc="recover", disable=not progress) as bar:
        while len(losses) < steps:
            for inputs, labels, _ in batches(loader, backbone.input_names, device):
                logits = heads(backbone(inputs, heads.layers))  # (B, L, C)
                loss = summed_exit_ce(logits.float(), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update()
                if len(losses) == steps:
                    break
    backbone.eval()
    heads.eval()
    return losses
