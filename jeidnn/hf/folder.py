"""A saved model's folder: writing and reading it (:class:`SavedModel`), the checks before loading, its
preprocessor, and the earlier layout.

The current layout is a Hugging Face model folder (:mod:`jeidnn.hf.modeling`, :mod:`jeidnn.hf.config`)::

    folder/config.json         EarlyExitConfig: the backbone's config nested, exits, gates, costs, labels ...
    folder/model.safetensors   backbone.model.*, heads.* and gates.* weights
    folder/tokenizer.json ...  the tokenizer (text) or preprocessor_config.json (images)

The earlier layout (jeidnn.json format version 2), still read and converted on load::

    folder/backbone/           the Hugging Face backbone and its tokenizer or image processor
    folder/exits.safetensors   heads.* and gates.* weights
    folder/jeidnn.json         labels, exit layers, costs, conformal quantiles, gate settings, ...

Version 1 folders (paper gates without settings) cannot be converted: they ask for a re-export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from jeidnn.errors import JeidnnError, first_line
from jeidnn.hf.config import MODEL_TYPE
from jeidnn.model.backbone import Backbone
from jeidnn.model.early_exit import _no_progress_bars, build_gates, gate_config
from jeidnn.model.exit_rules import DEFAULT_TAU
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=nn.Module)

LEGACY_CONFIG = "jeidnn.json"
LEGACY_VERSION = 2


def check_folder(folder: Path) -> None:
    """One-line errors for the usual ways a model folder is broken, before transformers reads it."""
    path = folder / "config.json"
    if not path.is_file():
        raise JeidnnError(f"{path} is missing; {folder} is not a saved jeidnn model")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JeidnnError(f"{path} is not valid JSON ({first_line(exc)}); save the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPE:
        raise JeidnnError(
            f"{path} describes a model of type {model_type!r}, not a jeidnn early-exit model; "
            "train one with jeidnn or load this one with transformers' own classes"
        )
    tier = config.get("jeidnn_tier")  # a half written by `jeidnn split` (jeidnn.serve.tiers)
    if isinstance(tier, dict):
        raise JeidnnError(
            f"{folder} is the {tier.get('role')} tier of a split model (jeidnn split), not a whole model; "
            "serve it with jeidnn serve, load it with jeidnn.serve.tiers.load_tier"
        )
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise JeidnnError(f"{folder / 'model.safetensors'} is missing; save the model again")


def check_loading_info(info: Mapping[str, Any], weights: str) -> None:
    """Refuse weights that do not fit the config: transformers would fill missing ones at random."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if keys := sorted(map(str, info.get(kind) or ())):
            listed = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            what = kind.replace("_", " ")
            raise JeidnnError(f"{weights} does not fit config.json ({what}: {listed}); save the model again")


def load_preprocessor(name: str, modality: str, local: bool) -> Any:
    """The tokenizer or image processor saved with the model, or None if it was saved without one."""
    from transformers import AutoImageProcessor, AutoTokenizer

    marker = "tokenizer_config.json" if modality == "text" else "preprocessor_config.json"
    if local and not (Path(name) / marker).is_file():
        return None
    loader = AutoTokenizer if modality == "text" else AutoImageProcessor
    try:
        return loader.from_pretrained(name)
    except (OSError, ValueError) as exc:
        if local:
            first = first_line(exc)
            raise JeidnnError(f"cannot load the {modality} preprocessor in {name}: {first}") from None
        return None  # a hub model saved without one


def load_legacy_folder(folder: Path, from_parts: Callable[..., Model]) -> Model:
    """The model in a version-2 folder, built by ``from_parts`` (``EarlyExitModel.from_parts``'s
    arguments), in eval mode; one-line errors name the bad file."""
    path = folder / LEGACY_CONFIG
    for name in ("exits.safetensors", "backbone/config.json"):
        if not (folder / name).is_file():
            raise JeidnnError(f"{folder / name} is missing; {folder} is not a saved jeidnn model")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JeidnnError(f"{path} is not valid JSON: {first_line(exc)}") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != LEGACY_VERSION:
        raise JeidnnError(
            f"{path} has format version {version!r}; this jeidnn reads version {LEGACY_VERSION} and the "
            "current config.json layout: re-export the model from its run with this version (retrain the "
            "run if needed)"
        )
    try:
        with _no_progress_bars():
            model = _build(folder, config, from_parts)
    except KeyError as exc:
        raise JeidnnError(f"{path} lacks the key {exc}; re-export the model") from None
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise JeidnnError(f"cannot load the jeidnn model in {folder}: {first_line(exc)}") from None
    log.info("converted %s from the jeidnn.json layout; save_pretrained writes the current one", folder)
    return model.eval()


def _build(folder: Path, config: dict[str, Any], from_parts: Callable[..., Model]) -> Model:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    backbone = Backbone(
        AutoModel.from_pretrained(folder / "backbone", use_safetensors=True),
        source=str(folder),
        pooling=config["pooling"],
    )
    heads = ExitHeads(
        config["exit_layers"],
        config["hidden_size"],
        config["num_classes"],
        config["head_activation"],
        im_head=config["im_head"],
    )
    entry = dict(config["gates"])
    entry["kind"] = entry.pop("type")
    gates = build_gates(entry, heads.num_exits)
    state = load_file(str(folder / "exits.safetensors"))
    heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
    if isinstance(gates, Gates):
        gates.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("gates.")})
    preprocessor = None
    if config["preprocessor"] is not None:
        loader = AutoTokenizer if backbone.modality == "text" else AutoImageProcessor
        preprocessor = loader.from_pretrained(folder / "backbone")
    metadata = config.get("metadata") or {}
    quantiles = config["conformal_quantiles"]
    # The export kept its default level in the metadata; earlier folders used 0.1 when it was calibrated.
    default_alpha = metadata.get("default_alpha", 0.1)
    if quantiles and not any(abs(float(a) - default_alpha) < 1e-9 for a in quantiles):
        default_alpha = None
    return from_parts(
        backbone,
        heads,
        gates,
        preprocessor,
        config["labels"],
        config["costs"],
        quantiles,
        config["max_length"],
        metadata,
        float(entry["exit_threshold"]) if isinstance(gates, Gates) else DEFAULT_TAU,
        default_alpha,
    )


class SavedModel(PreTrainedModel):
    """How :class:`~jeidnn.hf.modeling.EarlyExitModel` is written to and read from a folder (or the hub).

    Expects ``gates``, ``exit_threshold``, ``preprocessor`` and a ``from_parts`` classmethod of the model.
    """

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Write config.json, model.safetensors and the tokenizer / image processor to ``save_directory``.

        Takes ``PreTrainedModel.save_pretrained``'s arguments (``push_to_hub=True`` uploads the folder).
        """
        self.config.gates = gate_config(self.gates, self.exit_threshold)
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        # Before the weights: with push_to_hub the upload follows the weights, and must include these files.
        if self.preprocessor is not None and kwargs.get("is_main_process", True):
            self.preprocessor.save_pretrained(folder)
        with _no_progress_bars():
            super().save_pretrained(folder, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """Load a saved model (a folder or a hub name), with its tokenizer or image processor.

        Takes ``PreTrainedModel.from_pretrained``'s arguments; the model comes back in eval mode. A folder
        of the earlier layout (jeidnn.json) is converted on load. A broken folder raises a one-line
        :class:`~jeidnn.errors.JeidnnError` naming the bad file.
        """
        name = str(pretrained_model_name_or_path)
        folder = Path(name).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file() and (folder / LEGACY_CONFIG).is_file():
                return load_legacy_folder(folder, cls.from_parts)  # type: ignore[attr-defined]
            check_folder(folder)
            name = str(folder)
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise JeidnnError(f"model folder not found: {folder}")
        weights = f"{name}/model.safetensors"
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)  # never unpickle a weights file
        try:
            with _no_progress_bars():
                model, info = super().from_pretrained(name, *args, output_loading_info=True, **kwargs)
        except JeidnnError as exc:
            raise JeidnnError(f"{name}/config.json: {exc}") from None
        except SafetensorError as exc:
            raise JeidnnError(f"{weights} cannot be read ({first_line(exc)}); save the model again") from None
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise JeidnnError(f"cannot load the jeidnn model {name}: {first_line(exc)}") from None
        check_loading_info(info, weights)
        model.preprocessor = load_preprocessor(name, model.config.modality, local=folder.is_dir())
        return (model, info) if want_info else model
