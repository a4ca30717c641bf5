"""DeBERTa-v2 and DeBERTa-v3 (whose checkpoints are ``deberta-v2`` models): disentangled attention.

Each layer reads, besides the hidden states, the 4-D attention mask the encoder builds from the 2-D one,
the relative positions of the tokens and the (optionally normalised) relative position embeddings. After
layer 1 the encoder of checkpoints with ``conv_kernel_size > 0`` (DeBERTa-v2-xlarge and up) adds a
convolution over the embedding output, masked by the input mask; both are per-row and kept in the state's
rows so they shrink with the rows still running.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from jeidnn.model.families.base import Family, LayerState, token_mask_of


class DebertaV2(Family):
    name, model_types = "DeBERTa-v2, DeBERTa-v3", ("deberta-v2",)
    layers = ("encoder.layer",)
    head_activation = "gelu"
    """DebertaV2ForSequenceClassification's ContextPooler: dense + ``pooler_hidden_act`` (gelu by default
    and in the released checkpoints), then dropout and the classifier."""
    classifier_parts = ("pooler.dense", "classifier")
    prune_refusal = (
        "DeBERTa's disentangled attention also projects the relative position embeddings with each head's "
        "query and key weights, which the structured pruning does not slice"
    )

    def classifier_dropout(self, config: Any) -> float:
        # DebertaV2ForSequenceClassification: cls_dropout, else hidden_dropout_prob.
        value = getattr(config, "cls_dropout", None)
        return float(config.hidden_dropout_prob if value is None else value)

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = ids.new_ones(ids.shape)
        token_types = inputs.get("token_type_ids")
        if token_types is None:
            token_types = ids.new_zeros(ids.shape)
        encoder = model.encoder
        hidden = model.embeddings(input_ids=ids, token_type_ids=token_types, mask=mask)  # (B, T, H)
        rows: dict[str, Any] = {
            "mask": encoder.get_attention_mask(mask),  # (B, 1, T, T)
            "token_mask": token_mask_of(inputs, hidden),
        }
        if encoder.conv is not None:  # what the conv after layer 1 reads
            rows["embedding"] = hidden
            rows["input_mask"] = mask
        shared = {
            "relative_pos": encoder.get_rel_pos(hidden),  # (1, T, T) or None without relative attention
            "rel_embeddings": encoder.get_rel_embedding(),  # (2 * span, H) or None
        }
        return hidden, LayerState(hidden.shape[0], rows=rows, shared=shared)

    def run_layer(
        self, model: nn.Module, layer: nn.Module, index: int, hidden: Tensor, state: LayerState
    ) -> Tensor:
        out, _ = layer(
            hidden,
            state.rows["mask"],
            relative_pos=state.shared["relative_pos"],
            rel_embeddings=state.shared["rel_embeddings"],
        )
        conv = model.encoder.conv
        if index == 0 and conv is not None:
            out = conv(state.rows["embedding"], out, state.rows["input_mask"])
        return out
