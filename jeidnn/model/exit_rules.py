"""Exit rules: how gate outputs ``g`` (one per gated exit) become an exit distribution and exit scores.

**Exit rules** (:attr:`~jeidnn.config.gating.GateSettings.exit_rule`), both giving a per-exit *exit score* in
``[0, 1]``; a sample leaves at the first exit whose score reaches the threshold ``tau`` (0.5 = the rule each
was trained for):

* ``paper``: JEI-DNN's ``π_l = max(0, min(g_l, 1 - Σ_{j<l} g_j))`` and the score ``a_l = clip(π_l /
  Π_{j<l}(1 - a_j), 0, 1)``, the probability of exiting at ``l`` given the sample got there;
* ``conditional`` (extension): the gate output *is* that conditional probability, ``a_l = g_l``, so ``π_l =
  g_l Π_{j<l}(1 - g_j)`` (a stopping process, differentiable everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from jeidnn.config.gating import ExitRule

DEFAULT_TAU = 0.5
"""The exit threshold of both rules as trained: exit once the conditional exit probability reaches 1/2."""


def paper_distribution(g: Tensor) -> Tensor:
    """JEI-DNN's exit distribution ``π`` from gate probabilities ``g`` of shape ``(..., L-1)``.

    ``π_l = max(0, min(g_l, 1 - Σ_{j<l} g_j))`` for ``l < L`` (the sum runs over earlier *gate values*, as in
    the paper) and ``π_L = 1 - Σ_{l<L} π_l``. Returns ``(..., L)``, rows summing to 1.
    """
    # An explicit running sum rather than cumsum: the sequential rule repeats these exact additions.
    g_sum = torch.zeros_like(g[..., 0])
    columns = []
    for k in range(g.shape[-1]):
        columns.append(torch.minimum(g[..., k], 1 - g_sum).clamp_min(0))
        g_sum = g_sum + g[..., k]
    pi = torch.stack(columns, dim=-1)  # (..., L-1)
    last = (1 - pi.sum(dim=-1, keepdim=True)).clamp_min(0)  # clamp only absorbs rounding
    return torch.cat([pi, last], dim=-1)


def conditional_distribution(g: Tensor) -> Tensor:
    """Stopping-process distribution ``π_l = g_l Π_{j<l} (1 - g_j)``, ``π_L = Π_{j<L} (1 - g_j)``.

    Args:
        g: ``(..., L-1)`` conditional exit probabilities.

    Returns:
        ``(..., L)``, rows summing to 1.
    """
    survive = torch.cumprod(1 - g, dim=-1)  # (..., L-1) Π_{j≤l}(1 - g_j)
    before = torch.cat([torch.ones_like(g[..., :1]), survive[..., :-1]], dim=-1)  # Π_{j<l}
    return torch.cat([g * before, survive[..., -1:]], dim=-1)


def exit_distribution(g: Tensor, rule: ExitRule) -> Tensor:
    """``π`` of shape ``(..., L)`` from gate probabilities ``(..., L-1)`` under ``rule``."""
    return paper_distribution(g) if rule == "paper" else conditional_distribution(g)


def _conditional_exit(pi_l: Tensor, survival: Tensor) -> Tensor:
    """``a_l = clip(π_l / Π_{j<l}(1 - a_j), 0, 1)``; a zero survival (already exited) divides by 1 instead."""
    safe = torch.where(survival > 0, survival, 1.0)
    return (pi_l / safe).clamp(0, 1)


@dataclass
class RuleState:
    """Per-sample state of the paper rule between exits: ``Σ_{j<l} g_j`` and ``Π_{j<l}(1 - a_j)``, each
    ``(B,)``."""

    g_sum: Tensor
    survival: Tensor

    def __getitem__(self, idx: Tensor | slice) -> RuleState:
        return RuleState(self.g_sum[idx], self.survival[idx])


def paper_step(g: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
    """One exit of the paper rule: score ``a_l`` ``(B,)`` and the state after this exit."""
    a = _conditional_exit(torch.minimum(g, 1 - state.g_sum).clamp_min(0), state.survival)
    return a, RuleState(state.g_sum + g, state.survival * (1 - a))


def exit_scores(g: Tensor, rule: ExitRule) -> Tensor:
    """Per-exit exit scores ``(N, L-1)`` from gate probabilities ``(N, L-1)``.

    ``paper``: ``a_l`` (for example ``g = (0.2, 0.5)`` gives ``π = (0.2, 0.5, 0.3)``, ``a = (0.2, 0.625)``);
    ``conditional``: ``g`` itself.
    """
    if rule == "conditional":
        return g
    state = RuleState(torch.zeros_like(g[:, 0]), torch.ones_like(g[:, 0]))
    scores = []
    for k in range(g.shape[1]):
        a, state = paper_step(g[:, k], state)
        scores.append(a)
    return torch.stack(scores, dim=1)
