"""The trained classifier a checkpoint brings, reused as the final exit when stage 0 does not fine-tune."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from transformers import AutoConfig

from jeidnn.config.schema import ModelConfig
from jeidnn.errors import JeidnnError, first_line
from jeidnn.model.backbone import resolve_model_path
from jeidnn.model.families import BY_MODEL_TYPE


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
    family = BY_MODEL_TYPE.get(config.model_type)
    if kind is not None and (family is None or family.classifier_parts is None):
        return CheckpointClassifier(None, f"the classifier of {kind} does not map onto an exit head")
    if kind is None or family is None or family.classifier_parts is None:
        return CheckpointClassifier(
            None,
            f"{cfg.name_or_path} is a base model ({', '.join(architectures) or 'no architectures listed'})",
        )
    own = family.pooling_of(config)
    if pooling != own:
        return CheckpointClassifier(
            None, f"its classifier reads the {own} token(s), but the exits pool by {pooling}"
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
    dense_path, out_path = family.classifier_parts
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
        state = {"net.0.weight": dense.weight.detach().float(), "net.0.bias": dense.bias.detach().float()}
        state = {k: v.clone() for k, v in state.items()}
        prefix = "net.3"
    weight = out.weight.detach().float()[order].clone()  # (C, H) rows in the data's class order
    state[f"{prefix}.weight"] = weight
    # Decoders' score layers have no bias: an exit head's zero bias computes the same logits.
    bias = weight.new_zeros(len(order)) if out.bias is None else out.bias.detach().float()[order].clone()
    state[f"{prefix}.bias"] = bias
    return CheckpointClassifier(state, f"the trained classifier of {cfg.name_or_path} ({kind}; {how})")
