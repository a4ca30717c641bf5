"""ModernBERT: a pre-norm encoder with rotary positions and alternating global / sliding-window attention.

Which attention a layer uses is ``config.layer_types[i]`` (``full_attention`` or ``sliding_attention``,
every ``global_attn_every_n_layers``-th layer global); each type has its own mask and its own rotary
embeddings (different bases). The last layer's output goes through ``final_norm`` before any head, so the
exits read normalised states too by default (``model.exit_norm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from jeidnn.model.families.base import Family, LayerState, Pooling, token_mask_of

MASKS = {
    "full_attention": create_bidirectional_mask,
    "sliding_attention": create_bidirectional_sliding_window_mask,
}


class ModernBert(Family):
    name, model_types = "ModernBERT", ("modernbert",)
    layers = ("layers",)
    final_norm = "final_norm"
    norm_before_exits = True
    head_activation = "gelu"
    # ModernBertForSequenceClassification's head is dense -> act -> LayerNorm -> dropout -> classifier: the
    # LayerNorm after the activation has no place in an exit head, so the checkpoint's head is not reused.
    classifier_parts = None
    input_names = ("input_ids", "attention_mask")
    prune_refusal = (
        "ModernBERT's fused query/key/value projection (Wqkv) and gated MLP (Wi) are not sliced by the "
        "structured pruning"
    )

    def pooling_of(self, config: Any) -> Pooling:
        """The checkpoint's own ``classifier_pooling`` (``cls`` or ``mean``)."""
        pooling = getattr(config, "classifier_pooling", None)
        return pooling if pooling in ("cls", "mean") else self.default_pooling

    def classifier_dropout(self, config: Any) -> float:
        return float(getattr(config, "classifier_dropout", 0.0) or 0.0)

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        ids = inputs["input_ids"]
        hidden = model.embeddings(input_ids=ids)  # (B, T, H)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, T)
        mask = inputs.get("attention_mask")
        kinds = sorted(set(model.config.layer_types))
        rows: dict[str, Any] = {"token_mask": token_mask_of(inputs, hidden)}
        for kind in kinds:  # (B, 1, T, T) or None, as the attention implementation wants it
            rows[kind] = MASKS[kind](config=model.config, inputs_embeds=hidden, attention_mask=mask)
        rotary = {kind: model.rotary_emb(hidden, positions, kind) for kind in kinds}  # cos, sin: (1, T, D)
        return hidden, LayerState(hidden.shape[0], rows=rows, shared={"rotary": rotary})

    def run_layer(
        self, model: nn.Module, layer: nn.Module, index: int, hidden: Tensor, state: LayerState
    ) -> Tensor:
        kind = layer.attention_type
        return layer(
            hidden, attention_mask=state.rows[kind], position_embeddings=state.shared["rotary"][kind]
        )
