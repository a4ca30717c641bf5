"""Backbone family adapters, one per group of Hugging Face architectures (see :mod:`.base`).

Adding a family: a :class:`~jeidnn.model.families.base.Family` subclass in a module of this package, listed
in ``FAMILIES`` below, and one entry in the tests' family list (``TINY_CONFIGS`` in ``tests/tiny_models.py``).
"""

from __future__ import annotations

from jeidnn.errors import JeidnnError
from jeidnn.model.families.base import Family, LayerState
from jeidnn.model.families.deberta import DebertaV2
from jeidnn.model.families.decoders import Gemma, Gpt2, Llama, Mistral, Qwen
from jeidnn.model.families.encoders import Bert, Deit, DistilBert, Electra, Roberta, Vit
from jeidnn.model.families.modernbert import ModernBert

FAMILIES: tuple[Family, ...] = (
    Bert(),
    Roberta(),
    DistilBert(),
    Electra(),
    Vit(),
    Deit(),
    DebertaV2(),
    ModernBert(),
    Gpt2(),
    Llama(),
    Qwen(),
    Mistral(),
    Gemma(),
)

BY_MODEL_TYPE: dict[str, Family] = {t: family for family in FAMILIES for t in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def family_of(model_type: str | None, where: str = "") -> Family:
    """The adapter of ``model_type``; a one-line error naming it and the supported ones otherwise."""
    family = BY_MODEL_TYPE.get(str(model_type))
    if family is None:
        supported = ", ".join(supported_model_types())
        raise JeidnnError(f"unsupported architecture {model_type!r}{where}; jeidnn supports {supported}")
    return family


__all__ = ["FAMILIES", "Family", "LayerState", "family_of", "supported_model_types"]
