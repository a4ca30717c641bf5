"""The weights the training stages leave in a run folder, and reading them back into a resumed run.

`backbone/` (a Hugging Face folder) and `checkpoints/final_head.safetensors` after stage 0 or the joint
phase; `checkpoints/joint.safetensors` (backbone and every exit) after the joint phase;
`checkpoints/warmup_heads.safetensors` after stage 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from jeidnn.io import write_json, write_safetensors
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHead, ExitHeads

POOLING_MODES = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "last"}
"""sentence-transformers' name of each pooling (its 1_Pooling/config.json keys)."""
JOINT_WEIGHTS = "checkpoints/joint.safetensors"
FINAL_HEAD = "checkpoints/final_head.safetensors"
WARMUP_HEADS = "checkpoints/warmup_heads.safetensors"


def save_backbone(backbone: Backbone, final_head: ExitHead, preprocessor: Any, run_dir: Path) -> None:
    """The frozen backbone as a Hugging Face folder (safetensors + tokenizer / image processor) in
    `backbone/`, and the final head in `checkpoints/final_head.safetensors`.

    `Backbone.load` of the folder pools as this run does: a run that pools otherwise than the family's
    default also writes the sentence-transformers pooling config that selects it.
    """
    folder = run_dir / "backbone"
    backbone.model.save_pretrained(folder)
    if hasattr(preprocessor, "save_pretrained"):
        preprocessor.save_pretrained(folder)
    if backbone.pooling != backbone.family.pooling_of(backbone.config):
        modes = {f"pooling_mode_{mode}": backbone.pooling == own for mode, own in POOLING_MODES.items()}
        write_json(folder / "1_Pooling" / "config.json", modes, indent=None)
    write_safetensors(run_dir / FINAL_HEAD, final_head.state_dict())


def restore_saved_backbone(backbone: Backbone, final_head: ExitHead, run_dir: Path) -> None:
    """Load the weights :func:`save_backbone` wrote into ``backbone`` and ``final_head`` (in place)."""
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(
        (run_dir / "backbone").glob("model*.safetensors")
    ):  # one file, or shards of a big one
        weights.update(load_file(str(shard)))
    backbone.model.load_state_dict(weights)
    final_head.load_state_dict(load_file(str(run_dir / FINAL_HEAD)))


def save_joint_weights(backbone: Backbone, heads: ExitHeads, run_dir: Path) -> None:
    """The joint phase's backbone and every exit, in `checkpoints/joint.safetensors`."""
    # Clones: safetensors refuses tensors that share memory (tied weights).
    weights = {f"backbone.{k}": v.clone() for k, v in backbone.model.state_dict().items()}
    weights.update({f"heads.{k}": v.clone() for k, v in heads.state_dict().items()})
    write_safetensors(run_dir / JOINT_WEIGHTS, weights)


def restore_joint_weights(backbone: Backbone, heads: ExitHeads, run_dir: Path) -> None:
    """Load the weights :func:`save_joint_weights` wrote into ``backbone`` and ``heads`` (in place)."""
    weights = load_file(str(run_dir / JOINT_WEIGHTS))
    backbone.model.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("backbone.")})
    heads.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("heads.")})


def save_warmup_heads(heads: ExitHeads, run_dir: Path) -> None:
    write_safetensors(run_dir / WARMUP_HEADS, heads.state_dict())


def restore_warmup_heads(heads: ExitHeads, run_dir: Path) -> None:
    """Load stage 1's exits into ``heads`` (in place)."""
    heads.load_state_dict(load_file(str(run_dir / WARMUP_HEADS)))
