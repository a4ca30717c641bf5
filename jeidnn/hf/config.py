"""config.json of a saved early-exit model (:class:`EarlyExitConfig`) and its checks against the parts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from jeidnn.errors import JeidnnError
from jeidnn.io import json_safe
from jeidnn.model.backbone import Backbone
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.rule_gates import ProductGates, StaticGates, ThresholdGates

__all__ = ["MODEL_TYPE", "EarlyExitConfig", "check_parts", "check_quantiles"]

MODEL_TYPE = "jeidnn"
"""``model_type`` of :class:`EarlyExitConfig`: it ends up in users' folders, keep it."""


class EarlyExitConfig(PretrainedConfig):
    """Everything an :class:`EarlyExitModel` is but its weights; ``config.json`` of a saved model.

    Args:
        backbone_config: the encoder's own Hugging Face config (a dict in ``config.json``, rebuilt with
            ``AutoConfig.for_model``).
        exit_layers: 1-based backbone layers carrying an exit, ascending, the last = the last layer.
        pooling: what an exit head reads: ``cls`` token, ``mean`` of the real tokens, ``last`` real token.
        exit_norm: apply the backbone family's final norm before every exit head (None: family default).
        im_head: ``mlp`` or ``linear`` intermediate heads (:class:`~jeidnn.model.heads.ExitHeads`).
        head_activation: the model family's head activation (``tanh``, ``gelu``, ``relu``, ``none``).
        hidden_size: size of the pooled representation the heads read.
        gates: the gates' kind and parameters, one of ``{"kind": "learned", "settings": GateSettings as a
            dict, "hidden_size": H, "exit_threshold": τ}``, ``{"kind": "threshold", "measure": "maxprob",
            "thresholds": [...]}`` (``"inf"`` for a threshold nobody passes), ``{"kind": "patience",
            "patience": t}``, ``{"kind": "static", "exit_index": k}`` (0-based), ``{"kind": "product",
            "thresholds": [...]}`` (on the running product of max-probabilities), ``{"kind":
            "patience_confidence", "patience": k, "threshold": t}`` or ``{"kind": "none"}``.
        costs: normalised cost of each exit (1 = the plain backbone; docs/method.md).
        conformal_quantiles: ``{"0.1": [q_1 .. q_L], ...}`` per-exit conformal quantiles per α.
        default_alpha: the α :meth:`EarlyExitModel.predict` uses when none is given.
        max_text_length: :meth:`EarlyExitModel.predict` truncates texts to this many tokens (not
            ``max_length``, which transformers reserves for generation settings).
        modality: ``text`` or ``image``.
        jeidnn_metadata: anything JSON-serialisable kept with the model: λ, method, how the operating point
            was chosen, GFLOPs, the training run...
        kwargs: the standard ``PretrainedConfig`` fields, ``id2label`` / ``label2id`` among them.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        backbone_config: PretrainedConfig | Mapping[str, Any] | None = None,
        exit_layers: Sequence[int] = (),
        pooling: str = "cls",
        exit_norm: bool | None = None,
        im_head: str = "mlp",
        head_activation: str = "tanh",
        hidden_size: int = 0,
        gates: Mapping[str, Any] | None = None,
        costs: Sequence[float] = (),
        conformal_quantiles: Mapping[str, Sequence[float]] | None = None,
        default_alpha: float | None = 0.1,
        max_text_length: int = 64,
        modality: str = "text",
        jeidnn_metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(backbone_config, Mapping):
            fields = dict(backbone_config)
            if "model_type" not in fields:
                raise JeidnnError("backbone_config has no model_type; the model config is incomplete")
            backbone_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        self.backbone_config = backbone_config
        self.exit_layers = [int(layer) for layer in exit_layers]
        self.pooling, self.im_head, self.head_activation = pooling, im_head, head_activation
        self.exit_norm = exit_norm
        self.hidden_size = int(hidden_size)
        self.gates = dict(gates or {"kind": "none"})
        self.costs = [float(c) for c in costs]
        quantiles = conformal_quantiles or {}
        self.conformal_quantiles = {str(a): [float(q) for q in qs] for a, qs in quantiles.items()}
        self.default_alpha = None if default_alpha is None else float(default_alpha)
        self.max_text_length = int(max_text_length)
        self.modality = modality
        self.jeidnn_metadata = dict(jeidnn_metadata or {})
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config as config.json holds it: strict JSON, an infinite threshold or quantile as ``"inf"``."""
        out = super().to_dict()
        if isinstance(self.backbone_config, PretrainedConfig):
            out["backbone_config"] = self.backbone_config.to_dict()
        return json_safe(out, nonfinite="string")


def check_parts(config: EarlyExitConfig, backbone: Backbone, heads: ExitHeads, gates: Any) -> None:
    """One-line errors for parts that do not fit each other or ``config`` (exits, labels, costs...)."""
    num_exits, num_layers = heads.num_exits, backbone.num_layers
    if heads.layers[-1] != num_layers or sorted(set(heads.layers)) != heads.layers or heads.layers[0] < 1:
        raise JeidnnError(
            f"exit layers {heads.layers} must ascend within 1..{num_layers} and end at the last layer"
        )
    if isinstance(gates, (Gates, ThresholdGates, ProductGates)) and gates.num_exits != num_exits:
        raise JeidnnError(f"the gates expect {gates.num_exits} exits but the heads have {num_exits}")
    if isinstance(gates, StaticGates) and gates.exit_index >= num_exits:
        raise JeidnnError(
            f"static exit index {gates.exit_index} is out of range for a model with {num_exits} exits "
            f"(0-based, at most {num_exits - 1})"
        )
    labels = list(config.id2label.values())
    if len(labels) != heads.num_classes:
        raise JeidnnError(f"{len(labels)} labels {labels} for a model with {heads.num_classes} classes")
    if len(config.costs) != num_exits:
        raise JeidnnError(f"{len(config.costs)} exit costs {config.costs} for a model with {num_exits} exits")
    check_quantiles(config.conformal_quantiles, num_exits)
    alpha, quantiles = config.default_alpha, config.conformal_quantiles
    if quantiles and alpha is not None and not any(abs(float(a) - alpha) < 1e-9 for a in quantiles):
        calibrated = ", ".join(sorted(quantiles, key=float))
        raise JeidnnError(
            f"default alpha {alpha} has no conformal quantiles (calibrated: {calibrated}); "
            "pass default_alpha= one of them"
        )


def check_quantiles(quantiles: Mapping[str, Sequence[float]], num_exits: int) -> None:
    """Every calibrated level has one quantile per exit."""
    for alpha, qs in quantiles.items():
        if len(qs) != num_exits:
            raise JeidnnError(
                f"conformal quantiles for alpha {alpha} have {len(qs)} values, need {num_exits}"
            )
