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


def probabilities(logits: Tensor) -> Tensor:
    """Float32 softmax over the last dim: what every gate reads, in training and at inference.

    For a handful of classes it is written out (shift by the max, exp, normalise), about three times faster
    than ``torch.softmax``, whose CPU kernel vectorises along the classes; the two agree to a few ulps.
    """
    logits = logits.float()
    if logits.shape[-1] > 8:
        return logits.softmax(dim=-1)
    shifted = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    return shifted / shifted.sum(dim=-1, keepdim=True)


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


def exit_inputs(conf: Tensor, preds: Tensor, inputs: GateInputs) -> Tensor:
    """Confidence or trajectory inputs of every gate, from the gated exits' features.

    Args:
        conf: confidence features of the ``L - 1`` gated exits, shape ``(..., L-1, 4)``.
        preds: their argmax, shape ``(..., L-1)``.
        inputs: ``confidence`` or ``trajectory``/``hidden`` (the projection is added by the gate).

    Returns:
        ``(..., L-1, F')``. Gate ``i`` reads, for ``confidence``, its exit's four features; otherwise those
        four, the features of exits ``0 .. i-1`` followed by zeros for the exits not reached yet (so every
        gate has the same input size), the number of consecutive earlier exits (walking back from
        ``i - 1``) whose argmax agrees with exit ``i``'s divided by ``L - 1``, and ``p_max`` minus the
        previous exit's (0 at the first gate).
    """
    if inputs == "confidence":
        return conf
    num_gates = conf.shape[-2]
    gate = torch.arange(num_gates, device=conf.device)
    seen = (gate[None, :-1] < gate[:, None])[:, :, None]  # (L-1, L-2, 1): exit j seen by gate i
    earlier = torch.where(seen, conf[..., None, :-1, :], 0.0).flatten(-2)  # (..., L-1, 4 (L-2))
    # The last earlier exit whose argmax differs (-1: none); the exits after it agree.
    differs = (preds[..., :, None] != preds[..., None, :]) & (gate[None, :] < gate[:, None])  # (..., i, j)
    last_differing = torch.where(differs, gate, -1).amax(dim=-1)  # (..., L-1)
    agree = (gate - 1 - last_differing).to(conf.dtype)[..., None]
    p_max = conf[..., :1]  # (..., L-1, 1)
    delta = torch.cat([p_max[..., :1, :] * 0, p_max[..., 1:, :] - p_max[..., :-1, :]], dim=-2)
    return torch.cat([conf, earlier, agree / num_gates, delta], dim=-1)
