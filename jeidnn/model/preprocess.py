"""Tokenizers and image processors for a backbone.

Pretrained models bring their own (`AutoTokenizer` / `AutoImageProcessor`). A random
backbone built from a config has none, and nothing may be downloaded, so we build a
word-level WordPiece vocabulary from the training texts (the most frequent words) and
a plain resize-and-normalise image processor.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, BertTokenizer, PretrainedConfig

from jeidnn.config.schema import ModelConfig
from jeidnn.errors import JeidnnError, first_line
from jeidnn.model.backbone import Backbone, resolve_model_path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

logger = logging.getLogger(__name__)


def build_word_tokenizer(texts: list[str], vocab_size: int) -> BertTokenizer:
    """A lower-casing tokenizer whose vocabulary is the `vocab_size - 5` most frequent words of `texts`."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    split = BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in split.pre_tokenize_str(text.lower()))
    words = [w for w, _ in counts.most_common(max(vocab_size - len(SPECIAL_TOKENS), 0))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def load_saved_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved next to a backbone's config.json, as the class its tokenizer_config.json names.

    ``AutoTokenizer`` alone takes the class registered for the config's model_type for some types (qwen2,
    modernbert, ...), which would turn a random backbone's word tokenizer into that family's tokenizer.
    """
    saved = Path(folder) / "tokenizer_config.json"
    named = saved.is_file() and json.loads(saved.read_text()).get("tokenizer_class") is not None
    return AutoTokenizer.from_pretrained(folder, config=PretrainedConfig() if named else None)


def ensure_pad_token(tokenizer: Any, name: str) -> None:
    """Give a decoder's tokenizer a pad token (its eos token) when it has none, so batches can be padded;
    the exits read the last real token under the attention mask, so the pad id never reaches them."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise JeidnnError(
            f"the tokenizer of {name!r} has neither a pad nor an eos token; set a pad token in its tokenizer "
            "(tokenizer.pad_token = ..., then save_pretrained) and point model.name_or_path at that folder"
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info(
        "the tokenizer of %s has no pad token: padding with its eos token %r", name, tokenizer.eos_token
    )


def build_preprocessor(cfg: ModelConfig, backbone: Backbone, train_texts: list[Any] | None = None) -> Any:
    """The tokenizer (text) or image processor (vision) that feeds `backbone`."""
    if cfg.random_config is None:
        path = resolve_model_path(cfg.name_or_path)
        try:
            if backbone.modality == "text":
                tokenizer = AutoTokenizer.from_pretrained(path)
            else:
                return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            first = first_line(exc)
            raise JeidnnError(
                f"cannot load the tokenizer/processor of {cfg.name_or_path!r}: {first}"
            ) from None
        if backbone.family.decoder:
            ensure_pad_token(tokenizer, cfg.name_or_path)
        return tokenizer
    if backbone.modality == "text":
        if train_texts is None:
            raise ValueError("a random text backbone needs training texts to build its vocabulary")
        return build_word_tokenizer(train_texts, int(backbone.config.vocab_size))
    size = int(backbone.config.image_size)
    # transformers >= 5 splits the PIL backend out (the default one wants torchvision); importing
    # the plain name there prints a fallback warning, so ask for the PIL one first.
    try:
        from transformers import ViTImageProcessorPil as processor_cls
    except ImportError:
        from transformers import ViTImageProcessor as processor_cls
    return processor_cls(size={"height": size, "width": size})
