"""Cross-field checks of a run configuration: values that types alone cannot refuse.

:func:`validate` runs on every config the parser builds (jeidnn/config/parser.py), before any work;
:func:`check_against_model` runs once the backbone's `transformers` config is known. Every refusal is a
one-line JeidnnError naming the key and what to do.
"""

from __future__ import annotations

import math
import re
from typing import Any

from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    d = cfg.data
    keys = ("val_fraction", "calib_fraction") + (("test_fraction",) if d.test_split is None else ())
    fractions = tuple(getattr(d, key) for key in keys)
    if any(f <= 0 or f >= 1 for f in fractions) or sum(fractions) >= 1:
        named = ", ".join(f"data.{key}" for key in keys[:-1]) + f" and data.{keys[-1]}"
        raise JeidnnError(f"{named} must each lie in (0, 1) and sum to less than 1, got {fractions}")
    if d.source in ("csv", "jsonl", "hf") and not d.path:
        raise JeidnnError(f"data.source is {d.source!r} but data.path is not set; name the file or dataset")
    if d.test_split is not None and d.source != "hf":
        raise JeidnnError(
            f"data.test_split names a split of a `datasets` dataset, but data.source is {d.source!r}; "
            "set data.source hf or remove data.test_split"
        )
    if d.test_split is not None and d.hf_splits is not None and d.test_split not in d.hf_splits:
        raise JeidnnError(
            f"data.test_split {d.test_split!r} is not one of data.hf_splits {d.hf_splits}; add it there"
        )
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise JeidnnError(f"data.{key} must be a positive integer or null, got {value}")
    if cfg.model.max_length < 2:
        raise JeidnnError(f"model.max_length must be at least 2, got {cfg.model.max_length}")
    if cfg.model.exit_layers is not None and any(layer < 1 for layer in cfg.model.exit_layers):
        raise JeidnnError(f"model.exit_layers are 1-based layer numbers, got {cfg.model.exit_layers}")
    if cfg.model.random_config is not None and "model_type" not in cfg.model.random_config:
        raise JeidnnError("model.random_config needs a `model_type` key, e.g. model_type: bert")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise JeidnnError(f"name must be a plain folder name, got {cfg.name!r}")
    for a in cfg.eval.alphas:
        if not 0 < a < 1:
            raise JeidnnError(f"eval.alphas must lie in (0, 1), got {a}")
    if cfg.eval.ece_bins < 1:
        raise JeidnnError(f"eval.ece_bins must be a positive integer, got {cfg.eval.ece_bins}")
    if not 0 < cfg.export.alpha < 1:
        raise JeidnnError(f"export.alpha must lie in (0, 1), got {cfg.export.alpha}")
    guarantees = [(f"eval.guarantees[{i}]", g) for i, g in enumerate(cfg.eval.guarantees)]
    for where, g in [*guarantees, ("export.guarantee", cfg.export.guarantee)]:
        for key in ("epsilon", "delta"):
            if not 0 < getattr(g, key) < 1:
                raise JeidnnError(f"{where}.{key} must lie in (0, 1), got {getattr(g, key)}")
    j = cfg.jeidnn
    if j.lambdas is not None and (not j.lambdas or any(lam < 0 for lam in j.lambdas)):
        raise JeidnnError(f"jeidnn.lambdas must be null or a non-empty list of values >= 0, got {j.lambdas}")
    if not j.lambda_grid or any(lam <= 0 for lam in j.lambda_grid):
        raise JeidnnError(f"jeidnn.lambda_grid must be a non-empty list of values > 0, got {j.lambda_grid}")
    if j.enabled and not j.variants:
        raise JeidnnError(
            "jeidnn.variants is empty; list at least one learned method or set jeidnn.enabled false"
        )
    names = [v.name for v in j.variants]
    for v in j.variants:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", v.name) or names.count(v.name) > 1:
            raise JeidnnError(f"jeidnn.variants: name {v.name!r} must be unique, of letters, digits and `_`")
        if v.gate_data in ("val", "crossfit") and v.im_loss != "frozen":
            raise JeidnnError(
                f"jeidnn.variants[{v.name}]: gate_data {v.gate_data} needs im_loss frozen (the IMs train on "
                "train only)"
            )
    if j.crossfit_folds < 2:
        raise JeidnnError(f"jeidnn.crossfit_folds must be an integer >= 2, got {j.crossfit_folds}")
        if v.width < 1 or v.projection < 1:
            raise JeidnnError(f"jeidnn.variants[{v.name}]: width and projection must be positive integers")
    if not 0 < cfg.export.cost_budget <= 2:
        raise JeidnnError(f"export.cost_budget must lie in (0, 2], got {cfg.export.cost_budget}")
    _check_export_selection(cfg)
    if any(not 0 < b <= 2 for b in cfg.eval.budgets) or not cfg.eval.budgets:
        raise JeidnnError(f"eval.budgets must be a non-empty list of costs in (0, 2], got {cfg.eval.budgets}")
    if cfg.eval.bootstrap < 100 or cfg.eval.resplits < 1:
        raise JeidnnError("eval.bootstrap must be >= 100 and eval.resplits >= 1")
    if cfg.jeidnn.alternate_steps < 1:
        raise JeidnnError(f"jeidnn.alternate_steps must be >= 1, got {cfg.jeidnn.alternate_steps}")
    for section, key in (("finetune", "epochs"), ("warmup", "max_epochs"), ("jeidnn", "epochs")):
        if getattr(getattr(cfg, section), key) < 0:
            raise JeidnnError(f"{section}.{key} must be >= 0")
    for section in ("finetune", "warmup", "jeidnn"):
        if getattr(cfg, section).batch_size < 1:
            raise JeidnnError(f"{section}.batch_size must be a positive integer")
    _check_ranges(cfg)
    # Stage 0's stopping rules, devices and resume.
    f = cfg.finetune
    for key in ("max_steps", "val_check_interval"):
        value = getattr(f, key)
        if value is not None and value < 1:
            raise JeidnnError(f"finetune.{key} must be a positive integer or null, got {value}")
    if f.patience < 0:
        raise JeidnnError(f"finetune.patience must be >= 0, got {f.patience}")
    if f.max_time_minutes is not None and f.max_time_minutes <= 0:
        raise JeidnnError(f"finetune.max_time_minutes must be > 0 or null, got {f.max_time_minutes}")
    if cfg.devices < 1:
        raise JeidnnError(f"devices must be a positive integer, got {cfg.devices}")
    if f.enabled and f.batch_size < cfg.devices:
        raise JeidnnError(
            f"finetune.batch_size {f.batch_size} is smaller than devices {cfg.devices}: each process needs a "
            "share of every batch; raise finetune.batch_size or lower devices"
        )
    if cfg.resume and cfg.overwrite:
        raise JeidnnError("resume and overwrite are both true; pass either --resume true or --overwrite true")
    _check_regime(cfg)


def _check_regime(cfg: RunConfig) -> None:
    """The regime, its joint phase and end-to-end stage 2 (`jeidnn.train_backbone`)."""
    f, jt, j = cfg.finetune, cfg.joint, cfg.jeidnn
    if cfg.regime == "mixed" and not (f.enabled and f.epochs > 0):
        raise JeidnnError(
            "regime mixed runs stage 0 first but finetune.enabled is false or finetune.epochs is 0; "
            "enable stage 0 or use regime joint"
        )
    crossfit = [v.name for v in j.variants if v.gate_data == "crossfit"]
    if cfg.regime != "disjoint" and crossfit:
        raise JeidnnError(
            f"jeidnn.variants[{crossfit[0]}]: gate_data crossfit needs regime disjoint, got {cfg.regime}: "
            "the joint phase trains the backbone through every IM on all of train, so no IM output is out "
            "of fold; use gate_data train or val"
        )
    if cfg.regime != "disjoint" and f.epochs < 1:
        raise JeidnnError(
            f"regime {cfg.regime}: the joint phase makes at most finetune.epochs passes, got {f.epochs}; "
            "set finetune.epochs >= 1"
        )
    for key in ("max_steps", "val_check_interval"):
        value = getattr(jt, key)
        if value is not None and value < 1:
            raise JeidnnError(f"joint.{key} must be a positive integer or null, got {value}")
    for key in ("lr", "head_lr"):
        if not getattr(jt, key) > 0:
            raise JeidnnError(f"joint.{key} must be > 0, got {getattr(jt, key)}")
    if not jt.weight_decay >= 0 or jt.patience < 0:
        raise JeidnnError(
            f"joint.weight_decay and joint.patience must be >= 0, got {jt.weight_decay}, {jt.patience}"
        )
    if not 0 <= jt.warmup_fraction < 1:
        raise JeidnnError(f"joint.warmup_fraction must lie in [0, 1), got {jt.warmup_fraction}")
    if jt.max_time_minutes is not None and not jt.max_time_minutes > 0:
        raise JeidnnError(f"joint.max_time_minutes must be > 0 or null, got {jt.max_time_minutes}")
    w = jt.exit_weights
    if w is not None and (not w or not all(x >= 0 for x in w) or not sum(w) > 0):
        raise JeidnnError(f"joint.exit_weights must be null or one weight >= 0 per exit, not all 0, got {w}")
    if not j.backbone_lr > 0:
        raise JeidnnError(f"jeidnn.backbone_lr must be > 0, got {j.backbone_lr}")
    if j.train_backbone and j.enabled:
        if len(j.variants) != 1 or j.lambdas is None or len(j.lambdas) != 1:
            lams = "null (automatic)" if j.lambdas is None else j.lambdas
            raise JeidnnError(
                f"jeidnn.train_backbone trains one backbone per model: it needs one variant and one λ, got "
                f"{len(j.variants)} variants and lambdas {lams}; keep one variant and set jeidnn.lambdas: [x]"
            )
        if j.variants[0].im_loss == "frozen":
            raise JeidnnError(
                f"jeidnn.train_backbone updates the backbone in the IM phase, which im_loss frozen "
                f"(variant {j.variants[0].name}) skips; choose im_loss weighted or uniform"
            )


def _check_ranges(cfg: RunConfig) -> None:
    """Single values out of range: without these checks they reach training, and some only fail after it."""
    d, f, w, j, e = cfg.data, cfg.finetune, cfg.warmup, cfg.jeidnn, cfg.eval
    # `not x > 0` rather than `x <= 0`, so that NaN is refused too.
    for key, value in {
        "finetune.lr": f.lr,
        "finetune.head_lr": f.head_lr,
        "warmup.lr": w.lr,
        "jeidnn.lr": j.lr,
        "jeidnn.max_positive_weight": j.max_positive_weight,
        "jeidnn.target_max_cost": j.target_max_cost,
        "jeidnn.max_cost_gap": j.max_cost_gap,
    }.items():
        if not 0 < value < math.inf:
            raise JeidnnError(f"{key} must be a finite number > 0, got {value}")
    for key, value in {
        "finetune.weight_decay": f.weight_decay,
        "warmup.weight_decay": w.weight_decay,
        "jeidnn.weight_decay": j.weight_decay,
        "data.num_workers": d.num_workers,
        "warmup.patience": w.patience,
        "jeidnn.lambda_rounds": j.lambda_rounds,
    }.items():
        if not 0 <= value < math.inf:
            raise JeidnnError(f"{key} must be a finite number >= 0, got {value}")
    for key, value in {
        "data.eval_batch_size": d.eval_batch_size,
        "finetune.max_samples": f.max_samples,
        "eval.conformal_min_samples": e.conformal_min_samples,
    }.items():
        if value is not None and value < 1:
            raise JeidnnError(f"{key} must be a positive integer, got {value}")
    if not 0 <= f.warmup_fraction < 1:
        raise JeidnnError(f"finetune.warmup_fraction must lie in [0, 1), got {f.warmup_fraction}")
    if not 0 <= j.momentum < 1:
        raise JeidnnError(f"jeidnn.momentum must lie in [0, 1), got {j.momentum}")
    if not 0 <= j.min_lr <= j.lr:
        raise JeidnnError(f"jeidnn.min_lr must lie in [0, jeidnn.lr = {j.lr}], got {j.min_lr}")
    if not e.threshold_ps or not all(p > 0 for p in e.threshold_ps):
        raise JeidnnError(f"eval.threshold_ps must be a non-empty list of values > 0, got {e.threshold_ps}")
    if not all(0 <= t <= 1 for t in e.global_thresholds):
        raise JeidnnError(f"eval.global_thresholds must lie in [0, 1], got {e.global_thresholds}")
    if e.patience_values is not None and (not e.patience_values or min(e.patience_values) < 0):
        raise JeidnnError(
            f"eval.patience_values must be null or a non-empty list of integers >= 0, got {e.patience_values}"
        )
    if not 0 <= cfg.seed < 2**32:  # Lightning replaces a seed outside this range by a random one
        raise JeidnnError(f"seed must lie in [0, 2**32), got {cfg.seed}")
    if not cfg.output_dir:
        raise JeidnnError("output_dir is empty; name the folder that holds the run folders, e.g. runs")


def check_against_model(cfg: RunConfig, hf_config: Any) -> None:
    """Checks that need the backbone's `transformers` config; call right after loading it, before any work.

    Example:
        >>> check_against_model(cfg, backbone.model.config)
    """
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is None:  # vision models: no token positions
        return
    if getattr(hf_config, "model_type", None) == "roberta":
        # RoBERTa numbers positions from padding_idx + 1 (514 embeddings hold 512 tokens).
        positions -= (getattr(hf_config, "pad_token_id", None) or 1) + 1
    if cfg.model.max_length > positions:
        raise JeidnnError(
            f"model.max_length {cfg.model.max_length} exceeds the backbone's {positions} token positions; "
            f"set model.max_length to at most {positions}"
        )


def _check_export_selection(cfg: RunConfig) -> None:
    """`export.method` names the exported method only with `export.selection: method`, which needs it."""
    e = cfg.export
    if e.method is not None and e.selection != "method":
        raise JeidnnError(
            f"export.method is {e.method!r} but export.selection is {e.selection!r}; set export.selection: "
            "method to export that method, or remove export.method"
        )
    if e.selection == "method" and e.method is None:
        raise JeidnnError(
            "export.selection is 'method' but export.method is not set; name the method to export"
        )
