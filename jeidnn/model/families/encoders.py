"""BERT-era encoders (post-norm, absolute positions) and the pre-norm vision transformers."""

from __future__ import annotations

from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from jeidnn.model.families.base import Family, LayerState, token_mask_of

BERT_LAYERS = ("encoder.layer", "layers")


class BertLike(Family):
    """BERT and the families that share its layers and embeddings: RoBERTa, XLM-R, CamemBERT, ELECTRA."""

    prune_refusal = None

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        hidden = model.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        if hasattr(model, "embeddings_project"):  # ELECTRA with embedding_size != hidden_size
            hidden = model.embeddings_project(hidden)
        return hidden, self.state(model, inputs, hidden)

    @staticmethod
    def state(model: nn.Module, inputs: dict[str, Tensor], hidden: Tensor) -> LayerState:
        mask = create_bidirectional_mask(
            config=model.config, inputs_embeds=hidden, attention_mask=inputs.get("attention_mask")
        )
        return LayerState(hidden.shape[0], rows={"mask": mask, "token_mask": token_mask_of(inputs, hidden)})


class Bert(BertLike):
    name, model_types, layers, head_activation = "BERT", ("bert",), BERT_LAYERS, "tanh"
    classifier_parts = ("bert.pooler.dense", "classifier")


class Roberta(BertLike):
    name = "RoBERTa, XLM-R, CamemBERT"
    model_types, layers, head_activation = ("roberta", "xlm-roberta", "camembert"), BERT_LAYERS, "tanh"
    classifier_parts = ("classifier.dense", "classifier.out_proj")


class Electra(BertLike):
    name, model_types, layers, head_activation = "ELECTRA", ("electra",), BERT_LAYERS, "gelu"
    classifier_parts = ("classifier.dense", "classifier.out_proj")


class DistilBert(BertLike):
    name, model_types, head_activation = "DistilBERT", ("distilbert",), "relu"
    layers = ("transformer.layer", "layers")
    input_names = ("input_ids", "attention_mask")
    classifier_parts = ("pre_classifier", "classifier")

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        hidden = model.embeddings(inputs["input_ids"])
        return hidden, self.state(model, inputs, hidden)


class VisionTransformer(Family):
    """ViT and DeiT: pre-norm, the CLS token normalised by the final LayerNorm before any head."""

    modality = "image"
    layers = ("layers", "encoder.layer")
    head_activation = "none"
    final_norm = "layernorm"
    norm_before_exits = True
    input_names = ("pixel_values",)
    prune_refusal = None
    classifier_parts = (None, "classifier")

    def classifier_dropout(self, config) -> float:
        return 0.0  # ViT's classifier is a bare linear layer

    def embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        hidden = model.embeddings(inputs["pixel_values"])
        return hidden, LayerState(hidden.shape[0])


class Vit(VisionTransformer):
    name, model_types = "ViT", ("vit",)


class Deit(VisionTransformer):
    name, model_types = "DeiT", ("deit",)
