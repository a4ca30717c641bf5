"""Early-exit inference: how a backbone, its exit heads and gates decide each sample's exit.

Two paths that must agree (the tests check it on every architecture and gate kind):

* :func:`run_full` runs every layer for every sample, evaluates every exit and lets the gates pick an exit
  from all per-exit logits: the reference path (and the training path).
* :func:`run_dynamic` runs layer by layer on the rows still running; a row leaves the batch at the exit its
  gate chooses, so its later layers are never computed.

Gates are learned (:class:`~jeidnn.model.gates.Gates`, scores against an exit threshold) or rules without
parameters, the baselines of docs/evaluation.md (:mod:`jeidnn.model.rule_gates`: :class:`ThresholdGates`,
:class:`PatienceGates`, :class:`StaticGates`, :class:`ProductGates`, :class:`PatienceConfidenceGates`); None
means every sample takes the last exit. The deployable model that holds these
parts is :class:`jeidnn.hf.modeling.EarlyExitModel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.utils import ModelOutput

from jeidnn.config.gating import GateSettings
from jeidnn.errors import JeidnnError, first_line
from jeidnn.io import json_safe
from jeidnn.model.backbone import Backbone
from jeidnn.model.exit_rules import DEFAULT_TAU
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.policies import score_exits
from jeidnn.model.rule_gates import (
    PatienceConfidenceGates,
    PatienceGates,
    ProductGates,
    RuleGates,
    StaticGates,
    ThresholdGates,
)

__all__ = [
    "GATE_KINDS",
    "EarlyExitOutput",
    "PatienceConfidenceGates",
    "PatienceGates",
    "ProductGates",
    "RuleGates",
    "StaticGates",
    "ThresholdGates",
    "build_gates",
    "gate_config",
    "leaving_rows",
    "run_dynamic",
    "run_full",
]


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars, which clutter `jeidnn predict`."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


GATE_KINDS = ("learned", "threshold", "patience", "static", "product", "patience_confidence", "none")
"""The ``kind`` of a model config's ``gates`` entry (:class:`jeidnn.hf.config.EarlyExitConfig`)."""


def gate_config(gates: Gates | RuleGates | None, exit_threshold: float = DEFAULT_TAU) -> dict[str, Any]:
    """The ``gates`` entry of a model config (:class:`~jeidnn.hf.config.EarlyExitConfig`) for ``gates``."""
    if isinstance(gates, Gates):
        return {
            "kind": "learned",
            "settings": gates.settings.to_dict(),
            "hidden_size": int(gates.hidden_mean.shape[-1]),
            "exit_threshold": json_safe(float(exit_threshold), nonfinite="string"),
        }
    if isinstance(gates, ThresholdGates):
        values = json_safe(gates.thresholds.tolist(), nonfinite="string")
        return {"kind": "threshold", "measure": gates.measure, "thresholds": values}
    if isinstance(gates, PatienceGates):
        return {"kind": "patience", "patience": gates.patience}
    if isinstance(gates, StaticGates):
        return {"kind": "static", "exit_index": gates.exit_index}
    if isinstance(gates, ProductGates):
        return {"kind": "product", "thresholds": json_safe(gates.thresholds.tolist(), nonfinite="string")}
    if isinstance(gates, PatienceConfidenceGates):
        threshold = json_safe(gates.threshold, nonfinite="string")
        return {"kind": "patience_confidence", "patience": gates.patience, "threshold": threshold}
    if gates is None:
        return {"kind": "none"}
    raise JeidnnError(
        f"unknown gates {type(gates).__name__}; use Gates, one of the rule gates of jeidnn.model.rule_gates "
        "or None"
    )


def build_gates(entry: Mapping[str, Any], num_exits: int) -> Gates | RuleGates | None:
    """Gates (weights freshly initialised) from the ``gates`` entry of a model config."""
    kind = entry.get("kind")
    try:
        if kind == "learned":
            return Gates(num_exits, GateSettings.from_dict(entry["settings"]), int(entry["hidden_size"]))
        if kind == "threshold":
            return ThresholdGates([float(t) for t in entry["thresholds"]], entry["measure"])
        if kind == "patience":
            return PatienceGates(entry["patience"])
        if kind == "static":
            return StaticGates(entry["exit_index"])
        if kind == "product":
            return ProductGates([float(t) for t in entry["thresholds"]])
        if kind == "patience_confidence":
            return PatienceConfidenceGates(entry["patience"], float(entry["threshold"]))
    except KeyError as exc:
        raise JeidnnError(f"the {kind} gates entry of the model config lacks the key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise JeidnnError(
            f"the {kind} gates entry of the model config is invalid: {first_line(exc)}"
        ) from None
    if kind == "none":
        return None
    raise JeidnnError(
        f"unknown gate kind {kind!r} in the model config; expected one of {', '.join(GATE_KINDS)}"
    )


@dataclass
class EarlyExitOutput(ModelOutput):
    """Result of an early-exit forward on a batch of ``B`` samples (``L`` exits, ``C`` classes).

    A Hugging Face ``ModelOutput`` (``SequenceClassifierOutput`` plus the exit taken): fields that are None
    are left out of ``to_tuple()`` and of the dict view.

    Attributes:
        loss: cross-entropy of ``logits`` against the given labels, a scalar (only when labels are given).
        logits: logits of the exit each sample took, ``(B, C)``.
        probs: their softmax, ``(B, C)``.
        exit_index: 0-based exit taken, ``(B,)`` long.
        exit_layer: 1-based backbone layer of that exit, ``(B,)`` long.
        cost: normalised cost of that exit (1 = the plain backbone), ``(B,)``.
        exit_logits: logits of every exit, ``(B, L, C)`` (full path only, else None).
        gate_scores: learned gates' exit scores, ``(B, L-1)`` (full path with learned gates only).
    """

    loss: Tensor | None = None  # ()
    logits: Tensor | None = None  # (B, C)
    probs: Tensor | None = None  # (B, C)
    exit_index: Tensor | None = None  # (B,)
    exit_layer: Tensor | None = None  # (B,)
    cost: Tensor | None = None  # (B,)
    exit_logits: Tensor | None = None  # (B, L, C)
    gate_scores: Tensor | None = None  # (B, L-1)


def _exit_after_layer(layers: list[int], num_layers: int) -> list[int | None]:
    """For each 0-based backbone layer: the exit after it, or None (exits may sit on a subset of layers)."""
    exit_at = {layer: k for k, layer in enumerate(layers)}
    return [exit_at.get(i + 1) for i in range(num_layers)]


def run_full(
    backbone: Backbone,
    heads: ExitHeads,
    gates: Gates | RuleGates | None,
    exit_threshold: float,
    inputs: Mapping[str, Tensor],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Every layer and every exit for every sample; the gates then choose the exit (reference path).

    Returns:
        exit_logits ``(B, L, C)``, exit_index ``(B,)`` long and, for learned gates, their exit scores
        ``(B, L-1)`` (else None).
    """
    features = backbone(dict(inputs), heads.layers)  # (B, L, H)
    exit_logits = heads(features)  # (B, L, C)
    gate_scores = None
    if isinstance(gates, Gates):
        gate_scores = gates.scores(exit_logits, features)  # (B, L-1)
        exit_index = score_exits(gate_scores, exit_threshold)
    elif gates is not None:
        exit_index = gates.exits(exit_logits)
    else:
        last = heads.num_exits - 1
        exit_index = torch.full((exit_logits.shape[0],), last, dtype=torch.long, device=exit_logits.device)
    return exit_logits, exit_index, gate_scores


def leaving_rows(stop: Tensor) -> tuple[Tensor, Tensor] | tuple[None, None] | None:
    """Who leaves at an exit, from its ``(b,)`` bool decisions, with the exit's one host sync.

    Returns:
        None when nobody leaves; ``(None, None)`` when everyone does; else the continuing and the leaving
        row indices, each in order (a stable sort, without the second sync ``nonzero`` would cost).
    """
    running = stop.shape[0]
    n_stop = int(stop.item()) if running == 1 else int(stop.sum())  # a single row leaves or stays whole
    if n_stop == 0:
        return None
    if n_stop == running:
        return None, None
    order = torch.argsort(stop, stable=True)  # (b,) the continuing rows first
    return order[: running - n_stop], order[running - n_stop :]


@torch.inference_mode()
def run_dynamic(
    backbone: Backbone,
    heads: ExitHeads,
    gates: Gates | RuleGates | None,
    exit_threshold: float,
    inputs: Mapping[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """Layer-skipping inference: each layer runs only on the rows that have not exited yet.

    Inference only (runs under ``torch.inference_mode``); call ``eval()`` first so dropout is off.
    An exit where somebody may leave costs the exit head, the gate and one host synchronisation (how many
    rows stop); one where nobody can leave skips the sync (patience before ``t`` agreements, learned gates
    with a threshold above 1), or the head and gate too where the rule keeps no state (a +inf threshold).

    Returns:
        logits of the exit each sample took ``(B, C)`` and that exit's 0-based index ``(B,)`` long.
    """
    last = heads.num_exits - 1
    hidden, layer_state = backbone.embed(dict(inputs))  # (B, T, H) and the masks etc. of the family
    batch = hidden.shape[0]
    learned = isinstance(gates, Gates)
    state = gates.init_state(batch, device=hidden.device) if gates is not None else None
    # Per exit: is it evaluated, may anyone leave there (exit scores lie in [0, 1]; NaN compares false)?
    never = gates is None or (learned and exit_threshold > 1)
    reads = [gates is not None and (learned or gates.reads_exit(k)) for k in range(last)] + [True]
    leaves = [not never and (learned or gates.can_exit(k)) for k in range(last)]
    rows: Tensor | None = None  # original row of each running sample; None = all of them, in order
    # (rows, logits (b, C), exit) of each group of samples that left, in the order they left.
    left: list[tuple[Tensor | None, Tensor, int]] = []
    for i, k in enumerate(_exit_after_layer(heads.layers, backbone.num_layers)):
        hidden = backbone.run_layer(i, hidden, layer_state)  # (b, T, H)
        if k is None or not reads[k]:
            continue
        pooled = backbone.pool(hidden, layer_state)  # (b, H) float32
        logits = heads.heads[k](pooled)  # (b, C)
        if k == last:  # everyone still running exits here
            left.append((rows, logits, k))
            break
        score, state = gates.step(k, logits, pooled, state) if learned else gates.step(k, logits, state)
        if not leaves[k]:  # the gate state is updated; nobody can leave: no host sync
            continue
        split = leaving_rows(score >= exit_threshold if learned else score)
        if split is None:
            continue
        keep, leave = split
        if keep is None:
            left.append((rows, logits, k))
            break
        left.append((rows[leave] if rows is not None else leave, logits.index_select(0, leave), k))
        # Only the per-sample tensors shrink: hidden states, the layers' per-row state, the gate state.
        hidden = hidden.index_select(0, keep)
        layer_state = layer_state.select(keep)
        rows = rows[keep] if rows is not None else keep
        if state is not None:
            state = state[keep]
    if len(left) == 1:  # everyone left at the same exit: no scatter
        _, logits, k = left[0]
        return logits, torch.full((batch,), k, dtype=torch.long, device=logits.device)
    out_logits = left[0][1].new_empty(batch, heads.num_classes)  # (B, C) float32
    out_exit = hidden.new_empty(batch, dtype=torch.long)  # (B,)
    for dest, logits, k in left:
        out_logits[dest], out_exit[dest] = logits, k
    return out_logits, out_exit
