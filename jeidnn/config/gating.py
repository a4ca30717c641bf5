"""The learned gating methods of stage 2: a gate network's shape (:class:`GateSettings`), a learned method
(:class:`GateVariant` = settings + how stage 2 trains them) and stage 2's schedule (:class:`JeidnnConfig`).

The `jeidnn` section of a run config; YAML mirrors these dataclasses one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

GateInputs = Literal["confidence", "trajectory", "hidden"]
GateArch = Literal["linear", "mlp"]
ExitRule = Literal["paper", "conditional"]


@dataclass
class GateSettings:
    """The shape of a gate network: what it reads, its layers and its exit rule.

    What :class:`~jeidnn.model.gates.Gates` is built from and what a saved model keeps in config.json
    (``gates.settings``); a :class:`GateVariant` is one, plus how stage 2 trains it.
    """

    inputs: GateInputs = "confidence"
    """`confidence` = the four confidence features of the gate's own exit (paper); `trajectory` = those of
    every exit so far, argmax agreement with earlier exits and the change of p_max; `hidden` = trajectory
    plus a learned projection of the exit's pooled hidden state."""
    arch: GateArch = "linear"
    """Gate network: `linear` (paper) or `mlp` (one hidden ReLU layer of `width` units)."""
    exit_rule: ExitRule = "paper"
    """`paper` = π_l = min(g_l, 1 − Σ_{j<l} g_j); `conditional` = g_l is the probability of exiting at l
    given the sample got there (a stopping process)."""
    standardize: bool = False
    """Standardise the gate inputs with training-split statistics of the warm-up IMs."""
    width: int = 16
    """Hidden units of the `mlp` gate."""
    projection: int = 8
    """Size of the learned hidden-state projection (`inputs: hidden`)."""

    def to_dict(self) -> dict[str, Any]:
        """The gate-network fields alone (also of a GateVariant): config.json's ``gates.settings``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GateSettings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], extra: bool = False) -> GateSettings:
        """The settings :meth:`to_dict` wrote (missing fields take their defaults). ``extra``: ignore keys
        that are not gate-network fields (a variant's report.json ``settings``); else they are refused.

        Raises:
            TypeError: an unknown key (with ``extra`` false).
        """
        fields = {f.name for f in dataclasses.fields(GateSettings)}
        unknown = sorted(set(data) - fields)
        if unknown and not extra:
            raise TypeError(f"unknown gate settings {unknown}; expected some of {sorted(fields)}")
        return GateSettings(**{k: v for k, v in data.items() if k in fields})


@dataclass
class GateVariant(GateSettings):
    """One learned gating method of stage 2: its gates (the :class:`GateSettings` fields), objective and
    operating point (docs/method.md).

    The defaults are the paper's method (JEI-DNN as published); anything else is an extension and is
    labelled as such in the report.
    """

    name: str = "jeidnn_paper"
    """Method name in report.json and report.md (letters, digits, `_`)."""
    objective: Literal["bce", "expected"] = "bce"
    """`bce` = the paper's weighted BCE towards oracle targets; `expected` = E_π[loss] + λ·E_π[cost]
    minimised through the differentiable exit distribution π."""
    exit_loss: Literal["error", "ce"] = "error"
    """Per-exit loss of the `expected` objective: 0-1 error (accuracy) or cross-entropy."""
    positive_weight: Literal["exact", "cumulative", "none"] = "exact"
    """BCE positive-class weight: n_l = samples whose best exit is exactly l (paper code), samples with
    target 1 at gate l (cumulative), or no weighting."""
    im_loss: Literal["weighted", "uniform", "frozen"] = "weighted"
    """IM phase: `weighted` = expected CE under π with a detached normaliser (paper); `uniform` = plain sum
    of the per-exit CEs (what the authors' released code effectively trains); `frozen` = no IM phase, the
    gates learn on the warm-up IMs (which the threshold baselines also use)."""
    gate_data: Literal["train", "val", "crossfit"] = "train"
    """Data the gates learn on: `train` (paper), or `val` (needs `im_loss: frozen`): the IMs were fitted
    on train, so there their outputs are more confident and more often right than on unseen data; on val
    the gates see the IM outputs they will meet at inference. Val then also reports the training fit.
    `crossfit` (an extension, needs `im_loss: frozen`): the gates learn on all of train, each sample read
    through IMs warmed up without it (`jeidnn.crossfit_folds` folds); deployed with stage 1's IMs."""
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
    crossfit_folds: int = 5
    """`gate_data: crossfit`: folds of train; the IMs are warmed up once per fold on the other folds."""
    lambda_init: Literal["shared", "independent"] = "shared"
    """How the models of one variant (one per λ) start: `shared` = the same initial gates for every λ (as
    the paper's code, run once per λ with one seed, starts them), so they differ by λ alone and val cost
    falls with λ far more regularly; `independent` = each λ its own random gates (runs made before this
    setting existed)."""
    max_positive_weight: float = 5.0
    """Upper clip of the BCE positive-class weight."""
    train_backbone: bool = False
    """End to end: each IM phase also updates the backbone and the final head (features computed in the loop
    instead of read from the cache). Needs one variant and one λ (`lambdas: [x]`): the run then keeps one
    backbone of its own for that model, next to the shared one the baselines use."""
    backbone_lr: float = 1e-5
    """`train_backbone`: learning rate of the backbone and the final head (AdamW, constant)."""
