"""What a backbone family adapter knows, and the per-layer state it hands between layers.

A family adapter (one per group of Hugging Face architectures that share a layer interface) answers the
questions the early-exit model asks of a backbone: how to embed the inputs, what each layer needs besides
the hidden states (attention masks, rotary or relative position embeddings, ...), where the layer stack
and the final norm live, and how the family's own classification head is built. Adding a family is one
subclass of :class:`Family` registered in :mod:`jeidnn.model.families`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import Tensor, nn

Pooling = Literal["cls", "mean", "last"]


def _take(value: Any, keep: Tensor, batch: int) -> Any:
    """``value`` restricted to rows ``keep``; tensors whose first dim is not the batch are broadcast."""
    if isinstance(value, Tensor):
        return value.index_select(0, keep) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_take(v, keep, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, keep, batch) for k, v in value.items()}
    return value


@dataclass
class LayerState:
    """What every layer and every exit reads besides the hidden states, for the rows still running.

    ``rows`` holds per-sample values (first dim = ``batch``: attention masks, per-row position
    embeddings, the (B, T) token mask the exits pool with); :meth:`select` shrinks them when samples
    leave. ``shared`` holds what every sample shares (relative position tables, the embedding output
    DeBERTa's conv layer reads is per-row and lives in ``rows``).
    """

    batch: int
    rows: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def select(self, keep: Tensor) -> LayerState:
        """The state of rows ``keep`` (a 1-D index tensor), in that order."""
        rows = {k: _take(v, keep, self.batch) for k, v in self.rows.items()}
        return replace(self, batch=int(keep.shape[0]), rows=rows)

    @property
    def token_mask(self) -> Tensor | None:
        """(B, T) 1 for real tokens, 0 for padding; None when nothing is padded (images)."""
        return self.rows.get("token_mask")


class Family:
    """Adapter of one backbone family. Subclasses set the class attributes and, where the family's layers
    need more than ``layer(hidden, mask)``, override :meth:`embed` and :meth:`run_layer`."""

    name: str = ""
    """Label in docs and errors, e.g. ``BERT``."""
    model_types: tuple[str, ...] = ()
    """``config.model_type`` values this adapter serves."""
    modality: Literal["text", "image"] = "text"
    layers: tuple[str, ...] = ()
    """Candidate dotted paths of the layer ModuleList inside the base model (they moved across
    transformers releases)."""
    head_activation: Literal["tanh", "gelu", "relu", "none"] = "tanh"
    """Activation of the family's own sequence-classification head; ``none`` = a single linear layer."""
    default_pooling: Pooling = "cls"
    """What an exit reads when ``model.pooling`` is ``auto`` and the checkpoint says nothing (see
    :meth:`pooling_of`)."""
    final_norm: str | None = None
    """Module path of the norm a pre-norm family applies after its last layer (None: post-norm family)."""
    norm_before_exits: bool = False
    """Default of ``model.exit_norm``: apply ``final_norm`` to what every exit reads."""
    classifier_parts: tuple[str | None, str] | None = None
    """The classifier of the family's ``*ForSequenceClassification``/``*ForImageClassification``:
    (dense before the activation or None, output layer) as module paths; None = it does not map onto an
    exit head."""
    decoder: bool = False
    """Causal decoder: needs a pad token, reads the last real token."""
    prune_refusal: str | None = "its layer structure is not supported by the structured pruning"
    """Why ``jeidnn prune`` refuses this family; None = supported."""
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        """Hidden states entering layer 1 and the state every layer receives."""
        raise NotImplementedError

    def run_layer(
        self, model: nn.Module, layer: nn.Module, index: int, hidden: Tensor, state: LayerState
    ) -> Tensor:
        """Apply ``layer`` (the ``index``-th, 0-based) to ``hidden`` (B, T, H)."""
        out = layer(hidden, state.rows.get("mask"))
        return out[0] if isinstance(out, tuple) else out

    def pooling_of(self, config: Any) -> Pooling:
        """What an exit reads when ``model.pooling`` is ``auto`` and no sentence-transformers pooling config
        says otherwise: ``default_pooling``, unless the family's configs record how their own classifier
        pools (ModernBERT's ``classifier_pooling``)."""
        return self.default_pooling

    def classifier_dropout(self, config: Any) -> float:
        """Dropout of the family's own classification head, as Hugging Face builds it."""
        for key in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob"):
            value = getattr(config, key, None)
            if value is not None:
                return float(value)
        return 0.1


def token_mask_of(inputs: dict[str, Tensor], hidden: Tensor) -> Tensor:
    """(B, T) real-token mask of text inputs (all ones when the batch brings none)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return hidden.new_ones(hidden.shape[:2], dtype=hidden.dtype)
    return mask.to(hidden.dtype)
