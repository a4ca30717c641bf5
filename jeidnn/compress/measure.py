"""What a pruned model costs and how well it does: FLOPs per exit counted as the run counts them,
parameter counts, and calib-B / test accuracy, test cost and exit fractions."""

from __future__ import annotations

from typing import Any

import torch

from jeidnn.compress.run_data import RunData, forward_split
from jeidnn.evaluate.metrics import exit_outcome
from jeidnn.model.backbone import Backbone
from jeidnn.model.cost import gate_flops
from jeidnn.model.gates import Gates
from jeidnn.train.costs import count_exit_costs


def exit_flops(data: RunData, backbone: Backbone, heads: Any, gates: Any) -> tuple[list[float], float]:
    """FLOPs per sample of leaving at each exit (heads and gates up to it included) and of the plain
    backbone + its final head, counted as the run counts them (:func:`jeidnn.train.costs.count_exit_costs`,
    on the train split)."""
    costs = count_exit_costs(backbone, heads, data.dm, torch.device("cpu"))
    # Rules cost nothing, as in report.json.
    gate = (
        gate_flops(gates.settings, heads.num_exits, gates.hidden_mean.shape[-1])
        if isinstance(gates, Gates)
        else 0.0
    )
    last = heads.num_exits - 1
    flops = [c * costs.full_flops + min(e + 1, last) * gate for e, c in enumerate(costs.cost)]
    return flops, costs.full_flops


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(pruned: Any, data: RunData, split: Any, device: torch.device) -> tuple[dict, tuple]:
    """Calib-B and test accuracy, test cost and exit fractions of ``pruned``, and its calib predictions."""
    pruned.to(device)
    calib = forward_split(pruned, data, "calib", device)
    logits, exits, labels = forward_split(pruned, data, "test", device)
    pruned.cpu()
    b = split.b
    correct_b = calib[0][b].argmax(-1).gather(1, calib[1][b, None]).squeeze(1) == calib[2][b]
    outcome = exit_outcome(logits.argmax(-1) == labels[:, None], exits, pruned.costs)
    metrics = {
        "calib_b_accuracy": float(correct_b.double().mean()),
        **{f"test_{k}": v for k, v in outcome.items()},
    }
    return metrics, calib
