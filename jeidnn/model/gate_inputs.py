"""What a learned gate reads: confidence features of its exit and, for the extensions, the trajectory so far.

Gate **inputs** (:attr:`~jeidnn.config.gating.GateSettings.inputs`):

* ``confidence`` (the paper): four confidence features of the gate's own exit, see
  :func:`confidence_features`;
* ``trajectory`` (extension): the confidence features of every exit so far, the number of consecutive
  earlier exits whose argmax agrees with this exit's (PABEE's patience counter) and the change of ``p_max``
  since the previous exit;
* ``hidden`` (extension): ``trajectory`` plus a learned projection of the exit's pooled hidden state (the
  projection is part of the gate network, :mod:`jeidnn.model.gates`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from jeidnn.config.gating import GateInputs

NUM_CONFIDENCE_FEATURES = 4
"""p_max, entropy, margin p(1) - p(2), entropy of p² / Σp²."""


def _entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim with 0 · log 0 = 0."""
    # Clamping inside the log gives 0 · log(tiny) = 0 for empty classes and a finite derivative there.
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=-1)


def confidence_features(probs: Tensor) -> Tensor:
    """The four confidence features of the paper's gate.

    Args:
        probs: class probabilities, shape ``(..., C)``, rows summing to 1.

    Returns:
        ``(..., 4)``: max probability, entropy ``H(p)``, margin ``p(1) - p(2)`` and the entropy of the
        sharpened distribution ``p² / Σ p²``. Uniform over ``C`` classes gives ``(1/C, log C, 0, log C)``;
        one-hot gives ``(1, 0, 1, 0)``.
    """
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # (..., 2)
    p_max = top[..., 0]
    # With a single class there is no runner-up: the margin is the whole max probability.
    margin = top[..., 0] - top[..., 1] if top.shape[-1] > 1 else p_max
    squared = probs.square()
    sharpened = squared / squared.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.stack([p_max, _entropy(probs), margin, _entropy(sharpened)], dim=-1)  # (..., 4)


def input_size(inputs: GateInputs, num_gates: int, projection: int = 0) -> int:
    """Number of gate inputs per exit (the hidden projection included)."""
    if inputs == "confidence":
        return NUM_CONFIDENCE_FEATURES
    trajectory = NUM_CONFIDENCE_FEATURES * num_gates + 2
    return trajectory + (projection if inputs == "hidden" else 0)


def exit_inputs(index: int, conf: Tensor, preds: Tensor, inputs: GateInputs, num_gates: int) -> Tensor:
    """Confidence or trajectory inputs of gate ``index`` from the exits seen so far.

    Args:
        index: 0-based gated exit.
        conf: confidence features of exits ``0 .. index`` (at least), shape ``(..., ≥ index + 1, 4)``.
        preds: argmax of the same exits, shape ``(..., ≥ index + 1)``.
        inputs: ``confidence`` or ``trajectory``/``hidden`` (the projection is added by the gate).
        num_gates: ``L - 1``.

    Returns:
        ``(..., 4)`` for ``confidence``; ``(..., 4 (L-1) + 2)`` otherwise: this exit's four features, those of
        the earlier exits (zeros for exits not reached yet, so every gate has the same input size), the
        agreement count divided by ``L - 1`` and ``p_max`` minus the previous exit's.
    """
    own = conf[..., index, :]  # (..., 4)
    if inputs == "confidence":
        return own
    earlier = conf[..., :index, :].flatten(-2)  # (..., 4 index)
    pad = own.new_zeros(*own.shape[:-1], NUM_CONFIDENCE_FEATURES * (num_gates - 1 - index))
    # Consecutive earlier exits (walking back from index - 1) that predict what exit `index` predicts.
    same = (preds[..., :index] == preds[..., index : index + 1]).flip(-1)  # (..., index)
    agree = same.to(own.dtype).cumprod(-1).sum(-1, keepdim=True) if index > 0 else own[..., :1] * 0
    delta = own[..., :1] - conf[..., index - 1, :1] if index > 0 else own[..., :1] * 0
    return torch.cat([own, earlier, pad, agree / num_gates, delta], dim=-1)
