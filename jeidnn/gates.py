"""JEI-DNN gates: per-exit stopping probabilities and the rules that turn them into exits (DESIGN.md §4).

An early-exit model has ``L`` exits (0-based index ``0 .. L-1`` in code); exits ``0 .. L-2`` carry a
gate, the last exit (the backbone's final classifier) has none. A gate sees four confidence features of
its exit's softmax, computed on *detached* probabilities so that the gate loss never pushes the IMs.

Two views of the same decision live here:

* :func:`exit_distribution` / :func:`exit_decision` work on all gates of a batch at once (training,
  evaluation on cached features);
* :class:`SequentialExitRule` takes one exit at a time, for the layer-skipping inference path that only
  evaluates gate ``l`` on the samples still running. It reproduces :func:`exit_decision` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

NUM_GATE_FEATURES = 4
"""p_max, entropy, margin p(1) - p(2), entropy of p² / Σp²."""

# The deterministic rule exits once the conditional exit probability reaches one half.
EXIT_THRESHOLD = 0.5


def _entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim with 0 · log 0 = 0."""
    # Clamping inside the log gives 0 · log(tiny) = 0 for empty classes and a finite derivative there
    # (xlogy would be right in the forward pass but back-propagates 0 · inf = NaN through a softmax).
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=-1)


def gate_features(probs: Tensor) -> Tensor:
    """The four confidence features a JEI-DNN gate sees.

    Args:
        probs: class probabilities, shape ``(..., C)``, rows summing to 1.

    Returns:
        Tensor of shape ``(..., 4)``: max probability, entropy ``H(p)``, margin ``p(1) - p(2)`` between
        the two largest probabilities, and the entropy of the sharpened distribution ``p² / Σ p²``.
        Uniform over ``C`` classes gives ``(1/C, log C, 0, log C)``; one-hot gives ``(1, 0, 1, 0)``.
    """
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # (..., 2)
    p_max = top[..., 0]
    # With a single class there is no runner-up: the margin is the whole max probability.
    margin = top[..., 0] - top[..., 1] if top.shape[-1] > 1 else p_max
    squared = probs.square()
    # Σp² ≥ 1/C for a distribution; the clamp only guards an all-zero row.
    sharpened = squared / squared.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.stack([p_max, _entropy(probs), margin, _entropy(sharpened)], dim=-1)  # (..., 4)


@dataclass
class GateOutput:
    """Gate outputs for a batch.

    Attributes:
        logits: gate logits, shape ``(N, L-1)``.
        probs: ``g = sigmoid(logits)``, shape ``(N, L-1)``.
    """

    logits: Tensor  # (N, L-1)
    probs: Tensor  # (N, L-1)


class Gates(nn.Module):
    """One ``Linear(4, 1)`` gate per intermediate exit.

    Args:
        num_exits: number of exits ``L`` including the final classifier (at least 2).

    Example:
        >>> gates = Gates(num_exits=3)
        >>> out = gates(torch.randn(8, 3, 5))  # per-exit logits (N, L, C)
        >>> out.probs.shape
        torch.Size([8, 2])
    """

    def __init__(self, num_exits: int) -> None:
        super().__init__()
        if num_exits < 2:
            raise ValueError(
                f"Gates need at least 2 exits (gated IMs + the final classifier), got {num_exits}"
            )
        self.num_exits = num_exits
        self.gates = nn.ModuleList(nn.Linear(NUM_GATE_FEATURES, 1) for _ in range(num_exits - 1))

    def _gate_logit(self, index: int, exit_logits: Tensor) -> Tensor:
        # Detached: the gate reads the IM's confidence but the gate loss must not train the IM (§4).
        probs = exit_logits.detach().softmax(dim=-1)  # (B, C)
        return self.gates[index](gate_features(probs)).squeeze(-1)  # (B,)

    def forward(self, logits: Tensor) -> GateOutput:
        """Gate every intermediate exit.

        Args:
            logits: per-exit classifier logits, shape ``(N, L, C)``; the last exit's column is ignored.

        Returns:
            :class:`GateOutput` with ``(N, L-1)`` gate logits and probabilities.
        """
        if logits.dim() != 3 or logits.shape[1] != self.num_exits:
            expected = f"(N, {self.num_exits}, C)"
            raise ValueError(f"expected per-exit logits of shape {expected}, got {tuple(logits.shape)}")
        # Same code path as gate_prob, so the layer-skipping inference sees identical values.
        gate_logits = torch.stack(
            [self._gate_logit(i, logits[:, i]) for i in range(self.num_exits - 1)], dim=1
        )  # (N, L-1)
        return GateOutput(logits=gate_logits, probs=torch.sigmoid(gate_logits))

    def gate_prob(self, index: int, exit_logits: Tensor) -> Tensor:
        """Gate probability ``g`` of a single exit, for layer-by-layer inference.

        Args:
            index: 0-based exit index in ``0 .. L-2``.
            exit_logits: that exit's classifier logits, shape ``(B, C)``.

        Returns:
            ``(B,)`` probabilities, equal to ``forward(logits).probs[:, index]``.
        """
        if not 0 <= index < self.num_exits - 1:
            raise IndexError(f"gate index must lie in 0..{self.num_exits - 2}, got {index}")
        return torch.sigmoid(self._gate_logit(index, exit_logits))


def exit_distribution(g: Tensor) -> Tensor:
    """Exit distribution ``π`` from gate probabilities (DESIGN.md §4).

    ``π_l = max(0, min(g_l, 1 - Σ_{j<l} g_j))`` for ``l < L`` (the sum runs over the previous *gate
    values*, as in the paper), and ``π_L = 1 - Σ_{l<L} π_l``. The first exit at which the running sum of
    ``g`` reaches 1 takes the remaining mass and every later IM gets 0, so ``π`` is a distribution.

    Args:
        g: gate probabilities, shape ``(N, L-1)``.

    Returns:
        ``π`` of shape ``(N, L)``, non-negative, rows summing to 1 (up to rounding).
    """
    # An explicit running sum rather than torch.cumsum: cumsum may accumulate in another precision,
    # and SequentialExitRule must reproduce these values exactly with one addition per exit.
    g_sum = torch.zeros_like(g[:, 0])  # (N,)
    columns = []
    for k in range(g.shape[1]):
        columns.append(torch.minimum(g[:, k], 1 - g_sum).clamp_min(0))
        g_sum = g_sum + g[:, k]
    pi = torch.stack(columns, dim=1)  # (N, L-1)
    last = (1 - pi.sum(dim=1, keepdim=True)).clamp_min(0)  # (N, 1); clamp only absorbs rounding
    return torch.cat([pi, last], dim=1)  # (N, L)


def _conditional_exit(pi_l: Tensor, survival: Tensor) -> Tensor:
    """``a_l = clip(π_l / Π_{j<l}(1 - a_j), 0, 1)``.

    A sample still running at exit ``l`` had every earlier ``a_j < 0.5``, so its survival product is at
    least ``2^-(l-1)`` and never 0. A zero product only occurs for a sample that already exited (some
    ``a_j = 1``); its later ``a`` values are irrelevant, and dividing by 1 instead keeps them finite.
    """
    safe = torch.where(survival > 0, survival, torch.ones_like(survival))
    return (pi_l / safe).clamp(0, 1)


def exit_decision(g: Tensor) -> Tensor:
    """Deterministic exit of each sample (DESIGN.md §4).

    ``a_l = clip(π_l / Π_{j<l}(1 - a_j), 0, 1)``: the probability of exiting at ``l`` given that the
    sample did not exit earlier. The sample exits at the first ``l < L`` with ``a_l ≥ 0.5``, else at the
    last exit. For example ``g = (0.2, 0.5)`` gives ``π = (0.2, 0.5, 0.3)``, ``a_1 = 0.2``,
    ``a_2 = 0.5 / 0.8 = 0.625``: exit index 1.

    Args:
        g: gate probabilities, shape ``(N, L-1)``.

    Returns:
        ``(N,)`` long tensor of 0-based exit indices in ``0 .. L-1``.
    """
    n, num_gates = g.shape
    pi = exit_distribution(g)  # (N, L)
    exit_index = torch.full((n,), num_gates, dtype=torch.long, device=g.device)
    active = torch.ones(n, dtype=torch.bool, device=g.device)
    survival = torch.ones_like(g[:, 0])  # (N,) Π_{j<l}(1 - a_j)
    for k in range(num_gates):
        a = _conditional_exit(pi[:, k], survival)
        exits = active & (a >= EXIT_THRESHOLD)
        exit_index[exits] = k
        active &= ~exits
        survival = survival * (1 - a)
    return exit_index


@dataclass
class ExitState:
    """Per-sample state of :class:`SequentialExitRule` between exits.

    Attributes:
        g_sum: ``Σ_{j<l} g_j``, the running sum of earlier gate probabilities, shape ``(B,)``.
        survival: ``Π_{j<l} (1 - a_j)``, shape ``(B,)``.
    """

    g_sum: Tensor  # (B,)
    survival: Tensor  # (B,)

    @classmethod
    def initial(
        cls, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> ExitState:
        """State before the first exit: nothing summed, full survival."""
        return cls(
            g_sum=torch.zeros(batch_size, device=device, dtype=dtype),
            survival=torch.ones(batch_size, device=device, dtype=dtype),
        )

    def __getitem__(self, idx: Tensor | slice) -> ExitState:
        """Keep the rows ``idx`` (a bool mask or index tensor), e.g. the samples that did not exit."""
        return ExitState(g_sum=self.g_sum[idx], survival=self.survival[idx])

    def __len__(self) -> int:
        return self.g_sum.shape[0]


class SequentialExitRule:
    """The rule of :func:`exit_decision`, one exit at a time, for layer-skipping inference.

    Feed the gate probabilities of exit ``l`` for the samples still running together with their state;
    get back which of them exit now and the updated state. Subset the state with the samples that
    continue (``state[~exit_now]``) before the next exit. The last exit has no gate: every sample still
    running there exits. The arithmetic is the same as :func:`exit_decision`'s, so the exits match it
    exactly.

    Example:
        >>> rule = SequentialExitRule()
        >>> state = rule.init_state(4)
        >>> exit_now, state = rule.step(torch.tensor([0.6, 0.2, 0.1, 0.9]), state)
        >>> exit_now
        tensor([ True, False, False,  True])
        >>> state = state[~exit_now]  # continue with the two remaining samples
    """

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> ExitState:
        """State of ``batch_size`` samples before the first exit."""
        return ExitState.initial(batch_size, device=device, dtype=dtype)

    def step(self, g: Tensor, state: ExitState) -> tuple[Tensor, ExitState]:
        """Decide at one gated exit.

        Args:
            g: gate probabilities of this exit for the running samples, shape ``(B,)``.
            state: their state, ``len(state) == B``.

        Returns:
            ``exit_now`` (bool, ``(B,)``) and the state after this exit for all ``B`` rows.
        """
        if g.shape != state.g_sum.shape:
            raise ValueError(f"gate probabilities of shape {tuple(g.shape)} vs. a state of {len(state)} rows")
        pi_l = torch.minimum(g, 1 - state.g_sum).clamp_min(0)
        a = _conditional_exit(pi_l, state.survival)
        new_state = ExitState(g_sum=state.g_sum + g, survival=state.survival * (1 - a))
        return a >= EXIT_THRESHOLD, new_state
