"""The learned gate network: one small network per intermediate exit, ``K`` models side by side.

An early-exit model has ``L`` exits (0-based ``0 .. L-1`` in code); exits ``0 .. L-2`` carry a gate, the
last exit (the backbone's final classifier) has none. Every gate reads *detached* probabilities of the IMs,
so a gate loss never trains an IM (docs/method.md). What a gate reads is in :mod:`jeidnn.model.gate_inputs`,
how its outputs become exits in :mod:`jeidnn.model.exit_rules`; its shape is a
:class:`~jeidnn.config.gating.GateSettings`.

:class:`StackedGates` holds ``K`` gate sets of one kind side by side (stage 2 trains every λ at once); a
deployed model uses ``K = 1``. :meth:`StackedGates.forward` scores all exits of a batch at once;
:meth:`StackedGates.step` scores one exit for the rows still running (layer-skipping inference) through the
same functions, so both paths give the same exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jeidnn.config.gating import GateSettings
from jeidnn.model.exit_rules import RuleState, exit_scores, paper_step
from jeidnn.model.gate_inputs import (
    NUM_CONFIDENCE_FEATURES,
    confidence_features,
    exit_inputs,
    input_size,
    probabilities,
)

__all__ = ["GateState", "Gates", "StackedGates"]

_SCORED_ROWS = 2048
"""Rows scored at once without gradient (a whole split at once needs memory for every exit's products)."""


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> Tensor:
    """``nn.Linear``'s default initialisation: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class StackedGates(nn.Module):
    """``K`` gate sets of one kind, one gate per intermediate exit, evaluated in one batched pass.

    Parameters per model ``k`` and exit ``l``: ``linear`` gates ``w (F,)``, ``b``; ``mlp`` gates
    ``W1 (F, width)``, ``b1``, ``w2 (width,)``, ``b2``; ``hidden`` inputs add a projection
    ``P (H, projection)`` of the standardised pooled hidden state, whose output joins the
    ``F - projection`` other inputs.

    Args:
        settings: the gate kind.
        num_exits: ``L`` (at least 2).
        hidden_size: ``H`` of the pooled features (used by ``hidden`` inputs).
        num_models: ``K``.
        generator: draws the initial weights (each model its own draw).

    Example:
        >>> gates = StackedGates(GateSettings(), num_exits=3, hidden_size=8, num_models=2)
        >>> gates(torch.randn(2, 5, 3, 4)).shape  # per-exit logits (K, N, L, C) -> gate logits (K, N, L-1)
        torch.Size([2, 5, 2])
    """

    def __init__(
        self,
        settings: GateSettings,
        num_exits: int,
        hidden_size: int,
        num_models: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_exits < 2:
            raise ValueError(
                f"gates need at least 2 exits (gated IMs + the final classifier), got {num_exits}"
            )
        self.settings, self.num_exits, self.num_models = settings, num_exits, num_models
        g, k = num_exits - 1, num_models
        proj = settings.projection if settings.inputs == "hidden" else 0
        f = input_size(settings.inputs, g, proj)
        self.num_inputs = f
        if proj:
            self.proj = nn.Parameter(_uniform((k, g, hidden_size, proj), hidden_size, generator))
        if settings.arch == "linear":
            self.w = nn.Parameter(_uniform((k, g, f), f, generator))
            self.b = nn.Parameter(_uniform((k, g), f, generator))
        else:
            self.w1 = nn.Parameter(_uniform((k, g, f, settings.width), f, generator))
            self.b1 = nn.Parameter(_uniform((k, g, settings.width), f, generator))
            self.w = nn.Parameter(_uniform((k, g, settings.width), settings.width, generator))
            self.b = nn.Parameter(_uniform((k, g), settings.width, generator))
        # Standardisation statistics (identity until set_statistics): inputs (L-1, F - proj), hidden (L-1, H).
        self.register_buffer("input_mean", torch.zeros(g, f - proj))
        self.register_buffer("input_std", torch.ones(g, f - proj))
        self.register_buffer("hidden_mean", torch.zeros(g, hidden_size))
        self.register_buffer("hidden_std", torch.ones(g, hidden_size))

    # ------------------------------------------------------------------ inputs

    def _raw_inputs(self, probs: Tensor) -> Tensor:
        """Unstandardised inputs ``(..., L-1, F - proj)`` from IM probabilities ``(..., L-1, C)``."""
        return exit_inputs(confidence_features(probs), probs.argmax(dim=-1), self.settings.inputs)

    @torch.no_grad()
    def set_statistics(self, im_logits: Tensor, hidden: Tensor | None = None) -> None:
        """Standardisation statistics from training data: IM logits ``(N, L-1, C)``, hidden ``(N, L-1, H)``.

        A no-op unless ``settings.standardize``. Constant inputs (for example the zero padding of early
        gates' trajectories) keep mean 0 and std 1.
        """
        if not self.settings.standardize:
            return
        x = self._raw_inputs(probabilities(im_logits))  # (N, L-1, F')
        std = x.std(dim=0)
        self.input_mean.copy_(torch.where(std > 1e-6, x.mean(dim=0), torch.zeros_like(std)))
        self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        if hidden is not None and self.settings.inputs == "hidden":
            h_std = hidden.float().std(dim=0)
            self.hidden_mean.copy_(hidden.float().mean(dim=0))
            self.hidden_std.copy_(h_std.clamp_min(1e-6))

    def _net(self, x: Tensor, hidden: Tensor | None, index: int | None = None) -> Tensor:
        """Gate logits from raw inputs: of every gate, ``(K, N, L-1)`` from ``x`` ``(K, N, L-1, F')`` and
        ``hidden`` ``(K, N, L-1, H)``; of gate ``index`` alone, ``(K, N)`` from ``(K, N, F')`` and
        ``(K, N, H)``.

        Training, evaluation and layer-by-layer inference all go through here, so they compute every gate
        with the same operations.
        """
        # The small gate layers as products and sums rather than matmuls, whose rounding may depend on the
        # number of rows: the layer-skipping path scores fewer rows and should reproduce these values. The
        # hidden projection (H inputs) stays a matmul for speed; its scores may differ in the last bit.
        at = slice(None) if index is None else index  # selects the gates' dim of every parameter
        standardize = self.settings.standardize
        if standardize:
            x = (x - self.input_mean[at]) / self.input_std[at]
        if self.settings.inputs == "hidden":
            assert hidden is not None
            h = (hidden - self.hidden_mean[at]) / self.hidden_std[at] if standardize else hidden
            projection = self.proj[:, at]  # (K[, L-1], H, projection)
            if index is None:
                projected = torch.einsum("knlh,klhp->knlp", h, projection)
            else:
                projected = torch.bmm(h, projection)
            x = torch.cat([x, projected], dim=-1)  # (K, N[, L-1], F)
        # Each model's parameters broadcast over its rows: (K, 1[, L-1], ...).
        if self.settings.arch == "mlp":
            x = (x[..., None] * self.w1[:, None, at]).sum(-2) + self.b1[:, None, at]  # (K, N[, L-1], width)
            x = torch.relu(x)
        return (x * self.w[:, None, at]).sum(-1) + self.b[:, None, at]  # (K, N[, L-1])

    def forward(self, logits: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Gate logits of every intermediate exit.

        Args:
            logits: per-exit classifier logits ``(K, N, L, C)`` (or ``(N, L, C)`` when ``K = 1``); the last
                exit is ignored. Detached here: the gate loss never reaches the IMs.
            hidden: pooled features of the gated exits ``(N, ≥ L-1, H)``, shared by the ``K`` models
                (``hidden`` inputs only).

        Returns:
            ``(K, N, L-1)`` gate logits (``(N, L-1)`` for unbatched input).
        """
        unbatched = logits.dim() == 3
        if unbatched:
            logits = logits[None]
        g = self.num_exits - 1
        if logits.shape[-2] != self.num_exits:
            raise ValueError(f"expected logits for {self.num_exits} exits, got shape {tuple(logits.shape)}")
        x = self._raw_inputs(probabilities(logits[..., :g, :].detach()))  # (K, N, L-1, F')
        if self.settings.inputs == "hidden" and hidden is None:
            raise ValueError("gates with `hidden` inputs need the pooled hidden states")
        h = None
        if self.settings.inputs == "hidden":  # the gated exits' (further exits may be given too)
            h = hidden[:, :g].float()[None].expand(x.shape[0], -1, -1, -1)  # (K, N, L-1, H)
        if torch.is_grad_enabled() or x.shape[1] <= _SCORED_ROWS:
            out = self._net(x, h)  # (K, N, L-1)
        else:
            # Every gate at once holds (K, rows, L-1, F', width) products for an mlp gate: a whole split is
            # scored a block of rows at a time (each row's logits are its own either way).
            blocks = range(0, x.shape[1], _SCORED_ROWS)
            out = torch.cat(
                [
                    self._net(x[:, i : i + _SCORED_ROWS], h if h is None else h[:, i : i + _SCORED_ROWS])
                    for i in blocks
                ],
                dim=1,
            )
        return out[0] if unbatched else out

    def scores(self, logits: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Exit scores ``(K, N, L-1)`` (or ``(N, L-1)``) under the gates' exit rule."""
        g = torch.sigmoid(self.forward(logits, hidden))
        flat = g.reshape(-1, g.shape[-1])
        return exit_scores(flat, self.settings.exit_rule).view(g.shape)

    # ------------------------------------------------------------------ one exit at a time (K = 1)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> GateState:
        """State of ``batch`` samples before the first exit."""
        g = self.num_exits - 1
        z = torch.zeros(batch, device=device)
        return GateState(
            conf=torch.zeros(batch, g * NUM_CONFIDENCE_FEATURES, device=device),
            agree=z,
            pred=torch.zeros(batch, dtype=torch.long, device=device),
            p_max=z[:, None],
            rule=RuleState(z, torch.ones(batch, device=device)),
        )

    def step(
        self, index: int, exit_logits: Tensor, hidden: Tensor | None, state: GateState
    ) -> tuple[Tensor, GateState]:
        """Exit score of gate ``index`` for the running rows (``K = 1``).

        Args:
            index: 0-based gated exit.
            exit_logits: that exit's logits ``(B, C)``.
            hidden: its pooled features ``(B, H)`` (``hidden`` inputs only).
            state: the rows' state (``len == B``); filled in for this exit and returned.

        Returns:
            ``(B,)`` scores, equal to ``scores(...)[:, index]`` of the full forward, and the new state.
        """
        probs = probabilities(exit_logits)  # (B, C)
        if self.settings.inputs == "confidence":  # no trajectory to keep
            x = confidence_features(probs)
        else:
            own = confidence_features(probs)
            pred = probs.argmax(dim=-1)
            g = self.num_exits - 1
            f = NUM_CONFIDENCE_FEATURES
            if index > 0:
                agree = torch.where(pred == state.pred, state.agree + 1, 0.0)
                delta = own[:, :1] - state.p_max
            else:
                agree, delta = state.agree, own[:, :1] * 0
            x = torch.cat([own, state.conf[:, : f * (g - 1)], (agree / g)[:, None], delta], dim=-1)
            state.conf[:, f * index : f * index + f] = own
            state.agree, state.pred, state.p_max = agree, pred, own[:, :1]
        h = hidden.float()[None] if self.settings.inputs == "hidden" else None
        g = torch.sigmoid(self._net(x[None], h, index)[0])  # (B,)
        if self.settings.exit_rule == "conditional":
            return g, state
        a, state.rule = paper_step(g, state.rule)
        return a, state

    def select(self, model: int) -> Gates:
        """A ``K = 1`` copy holding model ``model``'s gates."""
        single = Gates.__new__(Gates)
        nn.Module.__init__(single)
        single.settings, single.num_exits, single.num_models = self.settings, self.num_exits, 1
        single.num_inputs = self.num_inputs
        for name, param in self.named_parameters(recurse=False):
            single.register_parameter(name, nn.Parameter(param.detach()[model : model + 1].clone()))
        for name, buf in self.named_buffers(recurse=False):
            single.register_buffer(name, buf.detach().clone())
        return single


@dataclass
class GateState:
    """Per-sample state of layer-by-layer gating: the confidence features of the exits seen so far, the
    running agreement count, the last argmax and max probability, and the paper rule's state."""

    conf: Tensor  # (B, 4 (L-1)): exits seen so far, zeros after
    agree: Tensor  # (B,)
    pred: Tensor  # (B,)
    p_max: Tensor  # (B, 1)
    rule: RuleState

    def __getitem__(self, idx: Tensor) -> GateState:
        """Keep the rows ``idx`` (the samples that continue)."""
        return GateState(self.conf[idx], self.agree[idx], self.pred[idx], self.p_max[idx], self.rule[idx])


class Gates(StackedGates):
    """The gates of one model (``K = 1``), as a deployed early-exit model holds them.

    Args:
        num_exits: ``L``.
        settings: the gate kind (default: the paper's ``Linear(4, 1)`` on confidence features).
        hidden_size: ``H`` of the pooled features (only ``hidden`` inputs use it).
        generator: draws the initial weights.

    Example:
        >>> gates = Gates(num_exits=3)
        >>> scores = gates.scores(torch.randn(8, 3, 5))  # per-exit logits (N, L, C) -> exit scores (N, L-1)
        >>> score_exits(scores).shape
        torch.Size([8])
    """

    def __init__(
        self,
        num_exits: int,
        settings: GateSettings | None = None,
        hidden_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(settings or GateSettings(), num_exits, hidden_size, 1, generator)
