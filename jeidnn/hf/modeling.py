"""The early-exit model as a Hugging Face model: :class:`EarlyExitModel` (config: :mod:`jeidnn.hf.config`).

``import jeidnn`` registers both with the Auto classes (``model_type = "jeidnn"``), so a saved folder loads
like any Hugging Face model, and pipelines work on it::

    import jeidnn  # registers "jeidnn" with AutoConfig and AutoModelFor{Sequence,Image}Classification
    from transformers import AutoModelForSequenceClassification, pipeline

    model = AutoModelForSequenceClassification.from_pretrained("runs/default/model")  # an EarlyExitModel
    pipeline("text-classification", model="runs/default/model")(["what a day"])

A folder holds config.json, model.safetensors and the tokenizer or image processor, no pickle
(:mod:`jeidnn.hf.folder`; folders of the earlier jeidnn.json layout are converted on load).
``push_to_hub`` uploads the same files; whoever loads the model must ``import jeidnn`` first (no remote
code is involved). :meth:`EarlyExitModel.predict` truncates texts to ``config.max_text_length`` tokens;
pass ``truncation=True, max_length=config.max_text_length`` to a pipeline for the same predictions on
longer texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import AutoModel
from transformers.initialization import no_init_weights

from jeidnn.errors import JeidnnError
from jeidnn.hf.batches import Prediction, predict_inputs
from jeidnn.hf.config import EarlyExitConfig, check_parts, check_quantiles
from jeidnn.hf.folder import SavedModel
from jeidnn.model.backbone import Backbone
from jeidnn.model.early_exit import (
    EarlyExitOutput,
    RuleGates,
    build_gates,
    gate_config,
    run_dynamic,
    run_full,
)
from jeidnn.model.exit_rules import DEFAULT_TAU
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.structured import restore_pruned_shapes

__all__ = ["EarlyExitForImageClassification", "EarlyExitForSequenceClassification", "EarlyExitModel"]


class EarlyExitModel(SavedModel):
    """A backbone with exit heads and gates that stops each input at the exit its gate chooses.

    Build one from trained parts with :meth:`from_parts`, or load one with :meth:`from_pretrained`.
    ``forward`` takes the usual Hugging Face inputs: in eval mode it runs the layer-skipping path
    (:meth:`forward_dynamic`), in training mode every layer and exit (:meth:`forward_full`).

    Args:
        config: the model's :class:`EarlyExitConfig`.
        parts: trained ``(backbone, heads, gates)`` to hold (their weights are kept); None builds fresh ones
            from ``config`` (as ``from_pretrained`` does before loading the weights).

    Example:
        >>> model = EarlyExitModel.from_parts(backbone, heads, Gates(heads.num_exits), tokenizer,
        ...     labels=["neg", "pos"], costs=[0.35, 0.68, 1.01], conformal_quantiles={"0.1": [0.4, 0.5, 0.6]})
        >>> model.predict(["what a great day"])[0].label
        'pos'
        >>> model.save_pretrained("out/model"); model = EarlyExitModel.from_pretrained("out/model")
    """

    config_class = EarlyExitConfig
    base_model_prefix = "jeidnn"
    main_input_name = "input_ids"
    _no_split_modules = ["ExitHeads"]
    # Exit heads and gates compute in float32 whatever the backbone's dtype (they read float32 pooled
    # states), so that confidences meet the fitted thresholds as they did in the evaluation: loading a
    # bfloat16 / float16 folder keeps them float32.
    _keep_in_fp32_modules_strict = [r"^heads\.", r"^gates\."]

    def __init__(
        self,
        config: EarlyExitConfig,
        parts: tuple[Backbone, ExitHeads, Gates | RuleGates | None] | None = None,
    ) -> None:
        super().__init__(config)
        if parts is None:
            if config.backbone_config is None:
                raise JeidnnError("the model config has no backbone_config; build the model with from_parts")
            # A pruned backbone records its per-layer head and FFN sizes in its config (model/structured.py).
            # The dtype is the one from_pretrained loads in (its default while building), not the one
            # backbone_config was saved with: `dtype=torch.float32` gives a float32 backbone.
            encoder = AutoModel.from_config(config.backbone_config, dtype=torch.get_default_dtype())
            encoder = restore_pruned_shapes(encoder)
            backbone = Backbone(encoder, "config", config.pooling, getattr(config, "exit_norm", None))
            heads = ExitHeads(
                config.exit_layers,
                config.hidden_size,
                config.num_labels,
                config.head_activation,
                im_head=config.im_head,
            )
            gates = build_gates(config.gates, len(config.exit_layers))
        else:
            backbone, heads, gates = parts
        check_parts(config, backbone, heads, gates)
        self.backbone, self.heads, self.gates = backbone, heads, gates
        self.exit_threshold = float(config.gates.get("exit_threshold", DEFAULT_TAU))
        self.preprocessor: Any = None
        """Tokenizer (text) or image processor (images); None for tensor inputs only."""
        if config.modality == "image":
            self.main_input_name = "pixel_values"
        device = next(backbone.parameters()).device
        # Not persistent: the costs and layers live in config.json; _init_weights refills them after loading.
        self.register_buffer(
            "cost_per_exit", torch.tensor(config.costs, dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer("layer_per_exit", torch.tensor(heads.layers, device=device), persistent=False)
        if parts is None:
            self.post_init()
        else:
            with no_init_weights():  # the trained parts keep their weights
                self.post_init()
        # Backbone also registers its layer stack (and a pre-LN final norm) under its own names: save each
        # tensor once, under the Hugging Face model's name (the one loading expects).
        first = {id(t): name for name, t in [*self.named_parameters(), *self.named_buffers()]}
        self._keys_to_ignore_on_save = {
            name for name, t in self.state_dict(keep_vars=True).items() if first.get(id(t), name) != name
        }

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            with torch.no_grad():
                self.cost_per_exit.copy_(torch.tensor(self.config.costs, dtype=torch.float32))
                self.layer_per_exit.copy_(torch.tensor(self.config.exit_layers))

    @classmethod
    def from_parts(
        cls,
        backbone: Backbone,
        heads: ExitHeads,
        gates: Gates | RuleGates | None,
        preprocessor: Any = None,
        labels: Sequence[str] | None = None,
        costs: Sequence[float] | None = None,
        conformal_quantiles: Mapping[str, Sequence[float]] | None = None,
        max_length: int = 64,
        metadata: Mapping[str, Any] | None = None,
        exit_threshold: float = DEFAULT_TAU,
        default_alpha: float | None = 0.1,
    ) -> EarlyExitModel:
        """A model holding trained parts (their weights are kept, not copied).

        Called on ``EarlyExitModel``, it returns the modality's subclass
        (:class:`EarlyExitForSequenceClassification` or :class:`EarlyExitForImageClassification`).

        Args:
            backbone: the encoder.
            heads: one classifier per exit; ``heads.layers[-1]`` must be the backbone's last layer.
            gates: learned :class:`~jeidnn.model.gates.Gates`, a rule
                (:class:`~jeidnn.model.early_exit.ThresholdGates`,
                :class:`~jeidnn.model.early_exit.PatienceGates`,
                :class:`~jeidnn.model.early_exit.StaticGates`), or None (always the last exit).
            preprocessor: tokenizer (text) or image processor (images); None for tensor inputs only.
            labels: class names in class-index order (default ``"0" .. "C-1"``).
            costs: normalised cost of each exit (docs/method.md); default ``layer / num_layers`` (a guess).
            conformal_quantiles: ``{"0.1": [q_1 .. q_L], ...}`` per-exit conformal quantiles per α.
            max_length: text inputs are truncated to this many tokens.
            metadata: anything JSON-serialisable to keep with the model (λ, GFLOPs, training run...).
            exit_threshold: learned gates: a sample exits at the first exit whose score reaches it (0.5 = the
                rule the gates were trained for; a budgeted export may pick another on calib).
            default_alpha: the α :meth:`predict` uses when none is given; must be calibrated if any is.
        """
        labels = [str(i) for i in range(heads.num_classes)] if labels is None else [str(x) for x in labels]
        if costs is None:
            costs = [layer / backbone.num_layers for layer in heads.layers]
        # The folder's config.json names the dtype the backbone serves in (a float32-trained backbone cast
        # to bfloat16 still carries its checkpoint's config).
        backbone.config.dtype = next(backbone.parameters()).dtype
        config = EarlyExitConfig(
            backbone_config=backbone.config,
            exit_layers=heads.layers,
            pooling=backbone.pooling,
            exit_norm=backbone.exit_norm,
            im_head=heads.im_head,
            head_activation=heads.activation,
            hidden_size=backbone.hidden_size,
            gates=gate_config(gates, exit_threshold),
            costs=costs,
            conformal_quantiles=conformal_quantiles,
            default_alpha=default_alpha,
            max_text_length=max_length,
            modality=backbone.modality,
            jeidnn_metadata=metadata,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        if cls is EarlyExitModel:  # config.json then names the task (the hub infers the pipeline from it)
            image = backbone.modality == "image"
            cls = EarlyExitForImageClassification if image else EarlyExitForSequenceClassification
        model = cls(config, parts=(backbone, heads, gates))
        model.preprocessor = preprocessor
        return model

    # ------------------------------------------------------------------ what the config holds
    @property
    def num_exits(self) -> int:
        return self.heads.num_exits

    @property
    def num_classes(self) -> int:
        return self.heads.num_classes

    @property
    def labels(self) -> list[str]:
        """Class names in class-index order (``config.id2label``)."""
        return [self.config.id2label[i] for i in range(len(self.config.id2label))]

    @property
    def costs(self) -> list[float]:
        """Normalised cost of each exit (``config.costs``)."""
        return self.config.costs

    @costs.setter
    def costs(self, costs: Sequence[float]) -> None:
        if len(costs) != self.num_exits:
            raise JeidnnError(
                f"{len(costs)} exit costs {list(costs)} for a model with {self.num_exits} exits"
            )
        self.config.costs = [float(c) for c in costs]
        self.cost_per_exit.copy_(torch.tensor(self.config.costs))

    @property
    def conformal_quantiles(self) -> dict[str, list[float]]:
        """``{"0.1": [q_1 .. q_L], ...}`` (``config.conformal_quantiles``)."""
        return self.config.conformal_quantiles

    @conformal_quantiles.setter
    def conformal_quantiles(self, quantiles: Mapping[str, Sequence[float]]) -> None:
        check_quantiles(quantiles, self.num_exits)
        self.config.conformal_quantiles = {str(a): [float(q) for q in qs] for a, qs in quantiles.items()}

    @property
    def metadata(self) -> dict[str, Any]:
        """Free-form facts kept with the model (``config.jeidnn_metadata``)."""
        return self.config.jeidnn_metadata

    @metadata.setter
    def metadata(self, metadata: Mapping[str, Any]) -> None:
        self.config.jeidnn_metadata = dict(metadata)

    @property
    def max_length(self) -> int:
        """Texts are truncated to this many tokens (``config.max_text_length``)."""
        return self.config.max_text_length

    @property
    def default_alpha(self) -> float | None:
        return self.config.default_alpha

    # ------------------------------------------------------------------ forwards
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> EarlyExitOutput | tuple[Tensor, ...]:
        """Classify a batch: eval mode skips layers (:meth:`forward_dynamic`), training mode runs them all.

        Args:
            input_ids, attention_mask, token_type_ids: text inputs ``(B, T)``.
            pixel_values: image inputs ``(B, 3, H, W)``.
            labels: ``(B,)`` class indices; adds the cross-entropy of the returned logits as ``loss``.
            return_dict: False returns ``to_tuple()`` (default ``config.return_dict``).
            kwargs: ignored (trainers and pipelines may pass more).

        Returns:
            :class:`~jeidnn.model.early_exit.EarlyExitOutput`: ``logits`` ``(B, C)`` of the exit each sample
            took, ``exit_index``, ``exit_layer`` and ``cost`` ``(B,)``; in training mode also
            ``exit_logits`` ``(B, L, C)``.
        """
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "pixel_values": pixel_values,
        }
        inputs = {k: v for k, v in given.items() if v is not None}
        out = self.forward_full(inputs) if self.training else self.forward_dynamic(inputs)
        if labels is not None:
            out = EarlyExitOutput(
                loss=F.cross_entropy(out.logits.float(), labels.to(out.logits.device)), **out
            )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    def forward_full(self, inputs: Mapping[str, Tensor]) -> EarlyExitOutput:
        """Every layer and every exit for every sample; the gates then choose the exit (reference path)."""
        exit_logits, exit_index, gate_scores = run_full(
            self.backbone, self.heads, self.gates, self.exit_threshold, inputs
        )
        rows = torch.arange(exit_logits.shape[0], device=exit_logits.device)
        logits = exit_logits[rows, exit_index]  # (B, C)
        return self._output(logits, exit_index, exit_logits, gate_scores)

    def forward_dynamic(self, inputs: Mapping[str, Tensor]) -> EarlyExitOutput:
        """Layer-skipping inference (:func:`jeidnn.model.early_exit.run_dynamic`); call ``eval()`` first."""
        logits, exit_index = run_dynamic(self.backbone, self.heads, self.gates, self.exit_threshold, inputs)
        return self._output(logits, exit_index)

    def _output(
        self,
        logits: Tensor,
        exit_index: Tensor,
        exit_logits: Tensor | None = None,
        gate_scores: Tensor | None = None,
    ) -> EarlyExitOutput:
        return EarlyExitOutput(
            logits=logits,
            probs=logits.softmax(dim=-1),
            exit_index=exit_index,
            exit_layer=self.layer_per_exit[exit_index],
            cost=self.cost_per_exit[exit_index],
            exit_logits=exit_logits,
            gate_scores=gate_scores,
        )

    # ------------------------------------------------------------------ predict
    def quantiles_for(self, alpha: float) -> Tensor:
        """The calibrated per-exit conformal quantiles ``(L,)`` for ``alpha``."""
        for key, qs in self.conformal_quantiles.items():
            if abs(float(key) - alpha) < 1e-9:
                return torch.tensor(qs, dtype=torch.float64)
        available = ", ".join(sorted(self.conformal_quantiles, key=float)) or "none"
        raise JeidnnError(f"alpha {alpha} was not calibrated for this model; available: {available}")

    def predict(
        self,
        inputs: Sequence[str] | Sequence[Any] | Mapping[str, Tensor],
        *,
        alpha: float | None = None,
        sets: bool = True,
        batch_size: int = 64,
    ) -> list[Prediction]:
        """Predict texts, PIL images or a dict of model-ready tensors with the layer-skipping path.

        Args:
            inputs: list of texts (text models), list of PIL images (vision models), or tensors
                such as ``{"input_ids": (N, T), "attention_mask": (N, T)}``.
            alpha: miscoverage level of the conformal prediction sets (must have been calibrated);
                None = the model's ``default_alpha`` (no sets if the model has no conformal quantiles).
            sets: False skips the prediction sets.
            batch_size: samples per forward.

        Returns:
            One :class:`~jeidnn.hf.batches.Prediction` per input, in input order.
        """
        quantiles = None
        if sets and alpha is None and self.conformal_quantiles and self.default_alpha is not None:
            try:
                quantiles = self.quantiles_for(self.default_alpha)
            except JeidnnError as exc:
                raise JeidnnError(f"the model's default {exc}; pass alpha=") from None
        elif sets and alpha is not None:
            quantiles = self.quantiles_for(alpha)
        return predict_inputs(self, inputs, quantiles, batch_size)


class EarlyExitForSequenceClassification(EarlyExitModel):
    """:class:`EarlyExitModel` as ``AutoModelForSequenceClassification`` and text pipelines load it."""


class EarlyExitForImageClassification(EarlyExitModel):
    """:class:`EarlyExitModel` as ``AutoModelForImageClassification`` and image pipelines load it."""

    main_input_name = "pixel_values"
