"""Exit rules without parameters: the baselines of docs/evaluation.md as gates of a deployable model.

Each rule plays one configuration of an evaluated baseline (:mod:`jeidnn.model.policies` computes the same
exits from cached logits) in both inference paths of :mod:`jeidnn.model.early_exit`:

* ``exits(exit_logits)``: per-exit logits ``(N, L, C)`` of every sample -> ``(N,)`` 0-based exits (the full
  path);
* ``init_state`` / ``step``: exit by exit on the rows still running (the layer-skipping path), with
  ``reads_exit(k)`` (must exit ``k``'s head run?) and ``can_exit(k)`` (may anyone leave at ``k``?) telling it
  which heads and host synchronisations it can skip.

Stateless: :class:`ThresholdGates`, :class:`StaticGates`. History-aware (their state carries what earlier
exits said): :class:`PatienceGates`, :class:`ProductGates`, :class:`PatienceConfidenceGates`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jeidnn.errors import JeidnnError
from jeidnn.model.policies import (
    ConfidenceMeasure,
    apply_thresholds,
    confidence,
    patience_confidence_exits,
    patience_exits,
    running_product,
    static_exits,
)

__all__ = [
    "MEASURES",
    "PatienceConfidenceGates",
    "PatienceGates",
    "PatienceState",
    "ProductGates",
    "RuleGates",
    "StaticGates",
    "ThresholdGates",
]

MEASURES: tuple[str, ...] = ("maxprob", "entropy", "margin")


def _thresholds(values: Sequence[float] | Tensor) -> Tensor:
    """Per-exit thresholds, float32 on the CPU whatever the default device. Not a buffer: they live in the
    model's config, readable by a person (a model is built on the meta device before its weights load); they
    move to the confidences' device and dtype where they are compared."""
    return torch.as_tensor(values, dtype=torch.float32, device="cpu").flatten().clone()


def _maxprob(exit_logits: Tensor) -> Tensor:
    return confidence(exit_logits.softmax(dim=-1), "maxprob")


class ThresholdGates(nn.Module):
    """Threshold gating baseline: exit at the first exit whose confidence reaches its threshold.

    One threshold repeated at every exit is the global-threshold (DeeBERT-style) baseline.

    Args:
        thresholds: one threshold per intermediate exit, shape ``(L-1,)``.
        measure: ``maxprob``, ``entropy`` (negative entropy as confidence) or ``margin``.

    Example:
        >>> gates = ThresholdGates([0.9, 0.8], measure="maxprob")
        >>> gates.exits(torch.randn(4, 3, 5)).shape  # per-exit logits (N, L, C) -> 0-based exits (N,)
        torch.Size([4])
    """

    def __init__(self, thresholds: Sequence[float] | Tensor, measure: ConfidenceMeasure = "maxprob") -> None:
        super().__init__()
        if measure not in MEASURES:
            raise JeidnnError(f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")
        self.measure: ConfidenceMeasure = measure
        self.thresholds = _thresholds(thresholds)

    @property
    def num_exits(self) -> int:
        return self.thresholds.numel() + 1

    def forward(self, logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> confidence at every exit ``(N, L)``."""
        return confidence(logits.softmax(dim=-1), self.measure)

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exit: the first at or above its threshold."""
        return apply_thresholds(self(exit_logits), self.thresholds)

    def can_exit(self, index: int) -> bool:  # no confidence reaches +inf
        return float(self.thresholds[index]) != float("inf")

    reads_exit = can_exit  # the rule keeps no state: an exit nobody can leave is not evaluated

    def init_state(self, batch: int, device: torch.device | str | None = None) -> None:
        return None

    def step(self, index: int, exit_logits: Tensor, state: None) -> tuple[Tensor, None]:
        """Whether each running sample exits at intermediate exit ``index``: ``(B, C)`` -> ``(B,)`` bool."""
        # A Python float holding the float32 threshold compares in the confidences' dtype, as the full path.
        return confidence(exit_logits.softmax(dim=-1), self.measure) >= float(self.thresholds[index]), None


@dataclass
class PatienceState:
    """Per-sample state of :class:`PatienceGates` and :class:`PatienceConfidenceGates` between exits."""

    run: Tensor  # (B,) long: consecutive exits so far whose argmax equals their predecessor's
    pred: Tensor  # (B,) long: argmax at the last exit seen

    @staticmethod
    def start(batch: int, device: torch.device | str | None = None) -> PatienceState:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return PatienceState(zeros, zeros)

    def __getitem__(self, idx: Tensor) -> PatienceState:
        return PatienceState(self.run[idx], self.pred[idx])

    def after(self, index: int, exit_logits: Tensor) -> PatienceState:
        """The state after exit ``index`` with logits ``(B, C)``: the counter grows while the argmax holds."""
        pred = _predictions(exit_logits)  # (B,)
        run = torch.where(pred == self.pred, self.run + 1, 0) if index > 0 else self.run
        return PatienceState(run, pred)


def _check_patience(patience: int) -> None:
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise JeidnnError(f"patience must be a non-negative integer, got {patience!r}")


def _predictions(exit_logits: Tensor) -> Tensor:
    """Argmax of the softmax, as the evaluation takes it (float32 softmax ties resolve the same way)."""
    return exit_logits.float().softmax(dim=-1).argmax(dim=-1)


class PatienceGates(nn.Module):
    """PABEE: exit once the argmax has stayed the same for ``patience`` consecutive exits.

    The rule of :func:`jeidnn.model.policies.patience_exits`: a sample leaves at the first exit ``l`` whose
    prediction equals those of exits ``l - 1 .. l - patience``; ``patience = 0`` leaves at the first exit.

    Args:
        patience: ``t >= 0``.

    Example:
        >>> PatienceGates(1).exits(torch.tensor([[[0.0, 1.0], [0.0, 2.0], [3.0, 0.0]]])).tolist()
        [1]
    """

    def __init__(self, patience: int) -> None:
        super().__init__()
        _check_patience(patience)
        self.patience = patience

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exits."""
        # The evaluation's own function (it works on the CPU): the reference path is the baseline's rule.
        return patience_exits(_predictions(exit_logits).cpu(), self.patience).to(exit_logits.device)

    def reads_exit(self, index: int) -> bool:
        return True  # every exit's argmax feeds the agreement count

    def can_exit(self, index: int) -> bool:  # at most `index` agreements are counted at exit `index`
        return index >= self.patience

    def init_state(self, batch: int, device: torch.device | str | None = None) -> PatienceState:
        return PatienceState.start(batch, device)

    def step(self, index: int, exit_logits: Tensor, state: PatienceState) -> tuple[Tensor, PatienceState]:
        """Whether each running sample exits at exit ``index`` ``(B,)`` bool, and the state after it."""
        state = state.after(index, exit_logits)
        return state.run >= self.patience, state


class StaticGates(nn.Module):
    """Static depth (layer pruning): every sample exits at the 0-based exit ``exit_index``.

    The layer-skipping path never runs the layers after that exit, nor the exit heads before it.

    Example:
        >>> StaticGates(1).exits(torch.randn(4, 3, 5)).tolist()
        [1, 1, 1, 1]
    """

    def __init__(self, exit_index: int) -> None:
        super().__init__()
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or exit_index < 0:
            raise JeidnnError(f"the static exit index must be a non-negative integer, got {exit_index!r}")
        self.exit_index = exit_index

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exits, all ``exit_index``."""
        return static_exits(exit_logits.shape[0], self.exit_index).to(exit_logits.device)

    def reads_exit(self, index: int) -> bool:
        return index == self.exit_index

    can_exit = reads_exit

    def init_state(self, batch: int, device: torch.device | str | None = None) -> None:
        return None

    def step(self, index: int, exit_logits: Tensor, state: None) -> tuple[Tensor, None]:
        stop = index == self.exit_index
        return torch.full((exit_logits.shape[0],), stop, dtype=torch.bool, device=exit_logits.device), None


class ProductGates(nn.Module):
    """History-aware max-probability thresholds: leave at the first exit ``l`` where the product of the
    max-probabilities of exits ``0 .. l`` reaches the exit's own threshold.

    The product only falls with depth, so one threshold for every exit would send each sample to the first
    exit or the last; each exit has its own (fitted on calib A by the budgeted-batch rule,
    docs/method.md "History-aware baselines"). A sample ranks high at exit ``l`` when it was confident at
    every exit so far, not only at this one.

    Args:
        thresholds: one threshold per intermediate exit, shape ``(L-1,)``; ``inf``: nobody leaves there.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.5, 0.5]]]))  # max-probs 0.9, 0.8
        >>> ProductGates([0.95, 0.7]).exits(logits).tolist()  # 0.9 < 0.95; 0.9 * 0.8 = 0.72 >= 0.7
        [1]
    """

    def __init__(self, thresholds: Sequence[float] | Tensor) -> None:
        super().__init__()
        self.thresholds = _thresholds(thresholds)

    @property
    def num_exits(self) -> int:
        return self.thresholds.numel() + 1

    def forward(self, logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> the running product of max-probabilities ``(N, L)``."""
        return running_product(_maxprob(logits))

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exits."""
        return apply_thresholds(self(exit_logits), self.thresholds)

    def can_exit(self, index: int) -> bool:
        return float(self.thresholds[index]) != math.inf

    def reads_exit(self, index: int) -> bool:
        """The product at a later exit where someone may leave needs this exit's max-probability."""
        return any(self.can_exit(k) for k in range(index, self.num_exits - 1))

    def init_state(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        return torch.ones(batch, device=device)  # (B,) the empty product

    def step(self, index: int, exit_logits: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Whether each running sample exits at ``index`` ``(B,)`` bool, and the product so far ``(B,)``."""
        product = state * _maxprob(exit_logits)  # the multiplications of running_product, in the same order
        return product >= float(self.thresholds[index]), product


class PatienceConfidenceGates(nn.Module):
    """Patience and confidence together: leave at the first exit where the prediction has stayed the same
    for ``patience`` consecutive exits (PABEE's counter) and the max-probability reaches ``threshold``.

    The rule of :func:`jeidnn.model.policies.patience_confidence_exits`; ``threshold = 0`` is
    :class:`PatienceGates`, ``patience = 0`` one global :class:`ThresholdGates` threshold.

    Args:
        patience: ``k >= 0``.
        threshold: ``t``; ``inf``: every sample takes the last exit.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]]]))  # argmax 0, 0, 0
        >>> PatienceConfidenceGates(1, 0.7).exits(logits).tolist()  # exit 1 agrees but 0.6 < 0.7
        [2]
    """

    def __init__(self, patience: int, threshold: float) -> None:
        super().__init__()
        _check_patience(patience)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise JeidnnError(f"the confidence threshold must be a number, got {threshold!r}")
        self.patience = patience
        # Rounded to float32, as the evaluation's float32 confidences compare it (on the CPU: a model is built
        # on the meta device before its weights load).
        self.threshold = float(torch.tensor(threshold, dtype=torch.float32, device="cpu"))

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exits."""
        preds, maxprob = _predictions(exit_logits).cpu(), _maxprob(exit_logits).cpu()
        return patience_confidence_exits(preds, maxprob, self.patience, self.threshold).to(exit_logits.device)

    def reads_exit(self, index: int) -> bool:
        return self.threshold != math.inf  # every exit's argmax feeds the agreement count

    def can_exit(self, index: int) -> bool:
        return index >= self.patience and self.threshold != math.inf

    def init_state(self, batch: int, device: torch.device | str | None = None) -> PatienceState:
        return PatienceState.start(batch, device)

    def step(self, index: int, exit_logits: Tensor, state: PatienceState) -> tuple[Tensor, PatienceState]:
        """Whether each running sample exits at exit ``index`` ``(B,)`` bool, and the state after it."""
        state = state.after(index, exit_logits)
        return (state.run >= self.patience) & (_maxprob(exit_logits) >= self.threshold), state


RuleGates = ThresholdGates | PatienceGates | StaticGates | ProductGates | PatienceConfidenceGates
"""Gates without parameters: an exit rule on the exits' logits (the baselines of docs/evaluation.md)."""
