"""The model and data of a run, loaded and checked once, before any run folder exists."""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from jeidnn.config.schema import RunConfig
from jeidnn.config.validate import check_against_model
from jeidnn.data.datamodule import JeidnnDataModule
from jeidnn.data.sources import RawData, load_raw
from jeidnn.data.splits import Splits, make_splits
from jeidnn.errors import JeidnnError
from jeidnn.model.backbone import Backbone
from jeidnn.model.heads import ExitHeads
from jeidnn.model.preprocess import build_preprocessor
from jeidnn.train.devices import torch_dtype
from jeidnn.train.finetune import exit_weights


@dataclass(frozen=True)
class RunInputs:
    """The model and data of a run, loaded once. Stage 0, the joint phase, stage 1 and the end-to-end stage 2
    train `backbone` / `heads` in place (their docstrings say which)."""

    backbone: Backbone
    heads: ExitHeads
    """Every exit; `heads.layers` are the 1-based exit layers."""
    raw: RawData
    splits: Splits
    dm: JeidnnDataModule
    """The encoded splits (set up)."""
    dtype: torch.dtype = torch.float32
    """What the backbone serves in once trained (`model.dtype` resolved): the feature cache, cost counting,
    the evaluation and the export. `backbone` arrives in float32 for training."""


def exit_layers_of(cfg: RunConfig, num_layers: int) -> list[int]:
    """The 1-based layers carrying an exit: `model.exit_layers` plus the last layer, else every layer."""
    layers = cfg.model.exit_layers
    if layers is None:
        return list(range(1, num_layers + 1))
    bad = [x for x in layers if x > num_layers]
    if bad:
        raise JeidnnError(f"model.exit_layers {bad} exceed the backbone's {num_layers} layers")
    return sorted(set(layers) | {num_layers})


def load_inputs(cfg: RunConfig) -> RunInputs:
    """Load and check model and data (seeded by `cfg.seed`); raises JeidnnError on any bad input, before
    any run folder exists."""
    pl.seed_everything(cfg.seed, verbose=False)
    backbone = Backbone.load(cfg.model)  # in the checkpoint's saved dtype
    dtype = serving_dtype(cfg.model.dtype, backbone)
    # Training keeps float32 weights: AdamW's small updates vanish in bfloat16 parameters. The pipeline
    # casts the backbone to `dtype` once it is trained (exact for a bfloat16 / float16 checkpoint).
    backbone.float()
    check_against_model(cfg, backbone.model.config)
    raw = load_raw(cfg.data, backbone.modality)
    splits = make_splits(len(raw.labels), cfg.data, cfg.seed, raw.test_positions)
    train_inputs = [raw.inputs[i] for i in splits.indices["train"]]
    preprocessor = build_preprocessor(
        cfg.model, backbone, train_inputs if backbone.modality == "text" else None
    )
    dm = JeidnnDataModule(cfg.data, raw, splits, preprocessor, cfg.model.max_length, cfg.seed)
    dm.setup()
    layers = exit_layers_of(cfg, backbone.num_layers)
    if cfg.regime != "disjoint":
        exit_weights(cfg, len(layers))  # one weight per exit, refused before any folder exists
    heads = ExitHeads(
        layers,
        backbone.hidden_size,
        len(raw.label_names),
        backbone.family.head_activation,
        dropout=backbone.classifier_dropout,
        im_head=cfg.model.im_head,
    )
    if backbone.pooling == "cls":
        _init_final_head_from_pooler(backbone, heads)
    return RunInputs(backbone, heads, raw, splits, dm, dtype)


def serving_dtype(name: str, backbone: Backbone) -> torch.dtype:
    """The dtype the backbone serves in (`model.dtype`): `auto` = the dtype its weights were loaded in (the
    checkpoint's saved dtype; float32 for a random config)."""
    if name == "auto":
        return next(backbone.parameters()).dtype
    return torch_dtype(name)


def _init_final_head_from_pooler(backbone: Backbone, heads: ExitHeads) -> None:
    # BERT-style checkpoints ship a trained pooler (dense + tanh): the HF classification head
    # starts from it, and so does our final head.
    pooler = getattr(backbone.model, "pooler", None)
    dense = getattr(pooler, "dense", None)
    first = heads.final.net[0]
    if (
        backbone.family.head_activation == "tanh"
        and isinstance(dense, torch.nn.Linear)
        and dense.weight.shape == first.weight.shape
    ):
        first.load_state_dict(dense.state_dict())
