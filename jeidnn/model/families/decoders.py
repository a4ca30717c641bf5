"""Decoder-only sequence classifiers: GPT-2 and the Llama-like families (Llama, Mistral, Qwen2/3, Gemma).

Each layer runs as the base model's forward runs it without a cache: positions 0..T-1 for every row, the
causal mask (or, per layer, the sliding-window causal mask) built by ``transformers.masking_utils`` from the
batch's attention mask, and, for the rotary families, the rotary embeddings of those positions (shared by
all rows). The exits read the last real token after the final norm, as the family's ``score`` head does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from jeidnn.model.families.base import Family, LayerState, token_mask_of

FULL, SLIDING = "full_attention", "sliding_attention"
MASK_MAKERS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


class Decoder(Family):
    """What every decoder family shares: last-token exits on normalised states, a bias-free ``score``."""

    decoder = True
    default_pooling = "last"
    head_activation = "none"
    norm_before_exits = True
    classifier_parts = (None, "score")
    input_names = ("input_ids", "attention_mask")
    prune_refusal = "decoder layers are not supported by the structured pruning"

    def classifier_dropout(self, config: Any) -> float:
        value = getattr(config, "classifier_dropout", None)  # their score head has no dropout of its own
        return 0.0 if value is None else float(value)

    def attention_kinds(self, config: Any) -> list[str]:
        """``full_attention`` / ``sliding_attention`` of each layer, as the base model picks its masks."""
        return [FULL] * int(config.num_hidden_layers)

    def state(self, model: nn.Module, inputs: dict[str, Tensor], hidden: Tensor) -> LayerState:
        """Per-layer-kind causal masks (per row) and the positions 0..T-1 (shared)."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
        masks = {
            kind: MASK_MAKERS[kind](
                config=model.config,
                inputs_embeds=hidden,
                attention_mask=inputs.get("attention_mask"),
                cache=None,
                position_ids=positions,
            )
            for kind in set(self.attention_kinds(model.config))
        }  # each (B, 1, T, T), or None where the attention kernel applies causality itself
        rows = {"masks": masks, "token_mask": token_mask_of(inputs, hidden)}
        return LayerState(hidden.shape[0], rows=rows, shared={"position_ids": positions})


class Gpt2(Decoder):
    name, model_types, layers, final_norm = "GPT-2", ("gpt2",), ("h",), "ln_f"
    prune_refusal = (
        "GPT-2's fused query/key/value projection (c_attn) is not supported by the structured pruning"
    )

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        words = model.wte(inputs["input_ids"])
        state = self.state(model, inputs, words)
        hidden = model.drop(words + model.wpe(state.shared["position_ids"]))  # learned absolute positions
        return hidden, state

    def run_layer(
        self, model: nn.Module, layer: nn.Module, index: int, hidden: Tensor, state: LayerState
    ) -> Tensor:
        out = layer(hidden, None, state.rows["masks"][FULL], None, position_ids=state.shared["position_ids"])
        return out[0] if isinstance(out, tuple) else out


class Rotary(Decoder):
    """Llama and the families sharing its layer call: token embeddings (Gemma's scale them by
    sqrt(hidden) inside ``embed_tokens``), rotary position embeddings, pre-norm layers, final ``norm``."""

    layers, final_norm = ("layers",), "norm"
    prune_refusal = "grouped-query attention heads are not supported by the structured pruning"

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        hidden = model.embed_tokens(inputs["input_ids"])
        state = self.state(model, inputs, hidden)
        state.shared["rotary"] = model.rotary_emb(hidden, position_ids=state.shared["position_ids"])
        return hidden, state

    def run_layer(
        self, model: nn.Module, layer: nn.Module, index: int, hidden: Tensor, state: LayerState
    ) -> Tensor:
        kind = self.attention_kinds(model.config)[index]
        out = layer(
            hidden,
            attention_mask=state.rows["masks"][kind],
            position_ids=state.shared["position_ids"],
            position_embeddings=state.shared["rotary"],
        )
        return out[0] if isinstance(out, tuple) else out


class Llama(Rotary):
    name, model_types = "Llama", ("llama",)


class Gemma(Rotary):
    name, model_types = "Gemma", ("gemma",)


class Mistral(Rotary):
    """Every layer attends within ``config.sliding_window`` when it is set."""

    name, model_types = "Mistral", ("mistral",)

    def attention_kinds(self, config: Any) -> list[str]:
        kind = FULL if getattr(config, "sliding_window", None) is None else SLIDING
        return [kind] * int(config.num_hidden_layers)


class Qwen(Rotary):
    """Qwen2 and Qwen3: ``config.layer_types`` says which layers use the sliding window."""

    name, model_types = "Qwen2, Qwen3", ("qwen2", "qwen3")

    def attention_kinds(self, config: Any) -> list[str]:
        return list(config.layer_types[: int(config.num_hidden_layers)])
