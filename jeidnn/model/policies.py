"""Exit policies: the baselines' and the one rule every learned model shares (docs/evaluation.md).

Every policy maps per-exit predictions of N samples at L exits to a 0-based exit index
per sample, shape (N,) int64. The last exit (index L - 1) is the final classifier and
takes every sample that no earlier exit claimed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ConfidenceMeasure",
    "apply_thresholds",
    "confidence",
    "fit_budgeted_thresholds",
    "geometric_exit_distribution",
    "global_threshold_exits",
    "oracle_exits",
    "patience_confidence_exits",
    "patience_exits",
    "running_product",
    "score_exits",
    "search_thresholds",
    "select_exit",
    "static_exits",
]

ConfidenceMeasure = Literal["maxprob", "entropy", "margin"]


def confidence(probs: Tensor, measure: ConfidenceMeasure) -> Tensor:
    """Confidence of each prediction; higher always means more confident.

    Args:
        probs: (..., C) probabilities.
        measure: ``maxprob`` = max_y p_y; ``entropy`` = negative Shannon entropy (nats), so
            that lower entropy ranks as more confident; ``margin`` = p(1) - p(2), the gap
            between the two largest probabilities.

    Returns:
        (...) confidences.
    """
    if measure == "maxprob":
        return probs.max(dim=-1).values
    if measure == "entropy":
        # xlogy gives 0 * log 0 = 0 for saturated softmax outputs.
        return torch.special.xlogy(probs, probs).sum(dim=-1)
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values  # (..., 2)
        return top2[..., 0] - top2[..., 1]
    raise ValueError(
        f"Expected argument `measure` to be one of 'maxprob', 'entropy', 'margin' but got {measure!r}"
    )


def select_exit(values: Tensor, exits: Tensor) -> Tensor:
    """Pick each sample's row at its exit: values (N, L, ...) and exits (N,) -> (N, ...)."""
    index = exits.long().view(-1, 1, *([1] * (values.ndim - 2))).expand(-1, 1, *values.shape[2:])
    return values.gather(1, index).squeeze(1)


def geometric_exit_distribution(p: float, num_exits: int) -> Tensor:
    """MSDNet target exit distribution ``q_k ∝ p^k``, k = 0 .. L - 1, normalised to sum to 1.

    p < 1 front-loads exits (cheap), p > 1 pushes samples to deep exits, p = 1 is uniform.
    """
    if p <= 0:
        raise ValueError(f"Expected argument `p` to be positive but got {p}")
    k = torch.arange(num_exits, dtype=torch.float64)
    # Computed in log space so large p and many exits do not overflow.
    log_q = k * torch.log(torch.tensor(float(p), dtype=torch.float64))
    return torch.softmax(log_q, dim=0)


def fit_budgeted_thresholds(conf: Tensor, target: Tensor) -> Tensor:
    """MSDNet "budgeted batch" per-exit thresholds for a target exit distribution.

    Walk the exits in order. At exit ``k`` the still-running samples are sorted by their
    confidence at ``k`` and ``T_k`` is set so that the cumulative number of exited samples
    reaches ``round(N * (q_0 + ... + q_k))``, i.e. a fraction ``q_k`` of ALL samples exits at
    ``k`` (cumulative rounding keeps the total error under one sample). ``T_k`` is the
    confidence of the last sample that must exit, so samples tied with it exit too: the
    realised fractions match the targets up to such ties, and the surplus is absorbed by
    the following exits' targets. No threshold exists for the last exit, which takes the rest.

    Args:
        conf: (N, L) confidences (higher = more confident) on the calibration split.
        target: (L,) target exit distribution, sums to 1.

    Returns:
        (L - 1,) thresholds; ``+inf`` means nobody exits there, ``-inf`` everybody still running.
    """
    n, num_exits = conf.shape
    assert target.shape == (num_exits,), (target.shape, num_exits)
    cumulative = torch.round(torch.cumsum(target.double(), 0) * n).long()  # (L,) samples exited by k
    running = torch.ones(n, dtype=torch.bool)
    thresholds = torch.full((num_exits - 1,), float("inf"), dtype=conf.dtype)
    for k in range(num_exits - 1):
        need = int(cumulative[k]) - int(n - running.sum())
        candidates = conf[running, k]
        if need <= 0 or candidates.numel() == 0:
            continue
        if need >= candidates.numel():
            thresholds[k] = float("-inf")
        else:
            thresholds[k] = candidates.sort(descending=True).values[need - 1]
        running &= ~(conf[:, k] >= thresholds[k])
    return thresholds


def apply_thresholds(conf: Tensor, thresholds: Tensor) -> Tensor:
    """Exit at the first exit ``k < L - 1`` with ``conf[:, k] >= thresholds[k]``, else at the last.

    Args:
        conf: (N, L) confidences.
        thresholds: (L - 1,) per-exit thresholds.

    Returns:
        (N,) int64 0-based exits.
    """
    num_exits = conf.shape[1]
    assert thresholds.shape == (num_exits - 1,), (thresholds.shape, num_exits)
    passed = conf[:, :-1] >= thresholds.to(conf)[None, :]  # (N, L - 1)
    last = torch.ones(conf.shape[0], 1, dtype=torch.bool, device=conf.device)
    passed = torch.cat([passed, last], dim=1)  # (N, L): the last exit always passes
    return passed.int().argmax(dim=1)  # argmax returns the first maximum = the first exit that passes


def global_threshold_exits(conf: Tensor, threshold: float) -> Tensor:
    """One threshold for every exit (DeeBERT style): first exit with ``conf >= threshold``, else last."""
    return apply_thresholds(conf, torch.full((conf.shape[1] - 1,), float(threshold), dtype=conf.dtype))


def patience_exits(preds: Tensor, patience: int) -> Tensor:
    """PABEE: exit once the prediction has stayed the same for ``patience`` consecutive exits.

    Convention (0-based exits): a sample exits at the first ``l`` with
    ``preds[l] == preds[l - 1] == ... == preds[l - patience]``, i.e. after ``patience``
    consecutive exits that agree with their predecessor (PABEE's counter reaching t).
    ``patience = 0`` exits every sample at the first exit; a sample whose counter never
    reaches ``patience`` runs to the last exit. ``patience >= L - 1`` only stops early at
    the last exit, which is where everyone stops anyway: it equals the full model.

    Args:
        preds: (N, L) argmax prediction at each exit.
        patience: t >= 0.

    Returns:
        (N,) int64 0-based exits.
    """
    if patience < 0:
        raise ValueError(f"Expected argument `patience` to be a non-negative integer but got {patience}")
    n, num_exits = preds.shape
    run = torch.zeros(n, dtype=torch.long)  # consecutive agreements ending at exit l
    exits = torch.full((n,), num_exits - 1, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for exit_ in range(num_exits):
        if exit_ > 0:
            same = preds[:, exit_] == preds[:, exit_ - 1]
            run = torch.where(same, run + 1, torch.zeros_like(run))
        stop = ~done & (run >= patience)
        exits[stop] = exit_
        done |= stop
    return exits


def running_product(conf: Tensor) -> Tensor:
    """History-aware confidence: ``out[:, l] = conf[:, 0] * ... * conf[:, l]``, shape (N, L) -> (N, L).

    Multiplied left to right one exit at a time, the operations the layer-by-layer gates repeat
    (:class:`jeidnn.model.rule_gates.ProductGates`), so both give the same value to the last bit.
    """
    product = torch.ones_like(conf[:, 0])
    columns = []
    for k in range(conf.shape[1]):
        product = product * conf[:, k]
        columns.append(product)
    return torch.stack(columns, dim=1)


def patience_confidence_exits(preds: Tensor, maxprob: Tensor, patience: int, threshold: float) -> Tensor:
    """Patience and confidence together: leave at the first exit ``l`` where the prediction has stayed the
    same for ``patience`` consecutive exits (:func:`patience_exits`' counter) *and* ``maxprob[:, l] >=
    threshold``; else at the last exit.

    ``threshold = 0`` is :func:`patience_exits`; ``patience = 0`` is :func:`global_threshold_exits`.

    Args:
        preds: (N, L) argmax prediction at each exit.
        maxprob: (N, L) max probability at each exit.
        patience: k >= 0.
        threshold: t; ``inf`` sends every sample to the last exit.

    Returns:
        (N,) int64 0-based exits.

    Example:
        >>> preds = torch.tensor([[0, 0, 1], [2, 2, 2]])
        >>> maxprob = torch.tensor([[0.9, 0.6, 0.8], [0.5, 0.95, 0.4]])
        >>> patience_confidence_exits(preds, maxprob, 1, 0.7).tolist()  # row 0: at exit 1 p = 0.6 < 0.7
        [2, 1]
    """
    if patience < 0:
        raise ValueError(f"Expected argument `patience` to be a non-negative integer but got {patience}")
    n, num_exits = preds.shape
    run = torch.zeros(n, dtype=torch.long)
    passed = []
    for k in range(num_exits - 1):
        if k > 0:
            run = torch.where(preds[:, k] == preds[:, k - 1], run + 1, torch.zeros_like(run))
        passed.append((run >= patience) & (maxprob[:, k] >= threshold))
    passed.append(torch.ones(n, dtype=torch.bool))  # the last exit takes the rest
    return torch.stack(passed, dim=1).int().argmax(dim=1)


def static_exits(num_samples: int, exit_index: int) -> Tensor:
    """Every sample exits at ``exit_index`` (static depth = layer pruning)."""
    return torch.full((num_samples,), exit_index, dtype=torch.long)


def oracle_exits(preds: Tensor, labels: Tensor) -> Tensor:
    """Upper bound: the first exit whose prediction is correct, else the last exit.

    Args:
        preds: (N, L) argmax prediction at each exit.
        labels: (N,) true classes.
    """
    correct = preds == labels[:, None]  # (N, L)
    correct[:, -1] = True  # never-correct samples run to the end
    return correct.int().argmax(dim=1)


def score_exits(scores: Tensor, tau: float = 0.5) -> Tensor:
    """The exit rule of every learned model: the first ``l < L - 1`` with ``scores[:, l] >= tau``, else L - 1.

    Args:
        scores: (N, L - 1) per-exit exit scores in [0, 1] (e.g. gate probabilities).
        tau: score threshold; 0.5 is the native rule, ``inf`` sends every sample to the last exit.

    Returns:
        (N,) int64 0-based exits.

    Example:
        >>> score_exits(torch.tensor([[0.2, 0.7], [0.9, 0.1], [0.1, 0.1]]), 0.5).tolist()
        [1, 0, 2]
    """
    passed = scores >= tau  # (N, L - 1)
    last = torch.ones(scores.shape[0], 1, dtype=torch.bool, device=scores.device)
    return torch.cat([passed, last], dim=1).int().argmax(dim=1)  # the first exit that passes


def _threshold_batch_stats(
    conf: Tensor, correct: Tensor, costs: Tensor, thresholds: Tensor
) -> tuple[Tensor, Tensor]:
    """Accuracy and mean cost of G threshold vectors at once: thresholds (G, L - 1) -> (G,), (G,)."""
    n, num_exits = conf.shape
    passed = conf[None, :, :-1] >= thresholds[:, None, :]  # (G, N, L - 1)
    last = torch.ones(*passed.shape[:2], 1, dtype=torch.bool)
    exits = torch.cat([passed, last], dim=2).int().argmax(dim=2)  # (G, N)
    acc = correct.gather(1, exits.T).double().mean(dim=0)  # (G,)
    cost = costs.double()[exits].mean(dim=1)  # (G,)
    return acc, cost


def _vary_one_exit(
    conf: Tensor, correct: Tensor, costs: Tensor, thresholds: Tensor, k: int, grid: Tensor
) -> tuple[Tensor, Tensor]:
    """Accuracy and cost, (G,) each, of ``thresholds`` with exit k's threshold replaced by each grid value.

    Only exit k changes, so each sample's fate is fixed unless it reaches k: O(G N) instead of O(G N L).
    """
    n, num_exits = conf.shape
    passed = conf[:, :-1] >= thresholds[None, :]  # (N, L - 1)
    index = torch.arange(num_exits - 1).expand(n, -1)
    never = torch.full_like(index, num_exits - 1)
    before = torch.where(passed & (index < k), index, never).amin(dim=1)  # (N,) L - 1 = none before k
    after = torch.where(passed & (index > k), index, never).amin(dim=1)  # (N,) first gated exit after k
    exits = torch.where(conf[None, :, k] >= grid[:, None], k, after[None, :])  # (G, N)
    exits = torch.where(before[None, :] < k, before[None, :], exits)
    acc = correct.gather(1, exits.T).double().mean(dim=0)
    return acc, costs[exits].mean(dim=1)


def _coordinate_ascent(
    conf: Tensor,
    correct: Tensor,
    costs: Tensor,
    budget: float,
    thresholds: Tensor,
    accuracy: float,
    grids: list[Tensor],
    passes: int,
) -> tuple[Tensor, float, float]:
    tol = 1e-12
    cost = float(_threshold_batch_stats(conf, correct, costs, thresholds[None])[1][0])
    for _ in range(passes):
        changed = False
        for k, grid in enumerate(grids):
            acc, trial_cost = _vary_one_exit(conf, correct, costs, thresholds, k, grid)
            feasible = trial_cost <= budget + tol
            better = [g for g in range(len(grid)) if feasible[g] and acc[g] > accuracy + tol]
            if better:
                g = min(better, key=lambda i: (-float(acc[i]), float(trial_cost[i]), i))
                thresholds = thresholds.clone()
                thresholds[k] = grid[g]
                accuracy, cost = float(acc[g]), float(trial_cost[g])
                changed = True
        if not changed:
            break
    return thresholds, accuracy, cost


def search_thresholds(
    conf: Tensor,
    correct: Tensor,
    costs: Tensor,
    budget: float,
    start_grid: list[float],
    num_quantiles: int = 20,
    passes: int = 4,
    starts: int = 3,
) -> Tensor | None:
    """Per-exit thresholds that maximise accuracy subject to mean cost <= budget, searched on one split.

    Deterministic coordinate ascent from several starts. The starts are the ``starts`` best global
    thresholds of ``start_grid`` that meet the budget (by accuracy, then lower cost, then grid order).
    From each, for up to ``passes`` rounds, visit exits 0 .. L - 2 in order; for each, try every value of
    that exit's grid (the split's confidences at that exit at the quantile levels 0, 1/Q, ..., 1, plus
    ``inf``) with the other thresholds fixed, and move to the most accurate value that keeps cost <=
    budget if it is strictly more accurate (ties: lower cost, then the smaller value). A round without a
    move ends the search. The best result over the starts wins (accuracy, then cost, then start order).
    More than one start matters: from a start where every sample leaves at exit 0, no single exit's
    threshold can change anything.

    Args:
        conf: (N, L) confidences (higher = more confident) on the selection split.
        correct: (N, L) bool, prediction at each exit is right.
        costs: (L,) normalised cost of each exit.
        budget: the largest allowed mean cost.
        start_grid: global thresholds to start from.
        num_quantiles: Q, the grid resolution per exit.
        passes: most rounds over the exits per start.
        starts: how many global thresholds to start from.

    Returns:
        (L - 1,) thresholds, or None when no global threshold of ``start_grid`` meets the budget.
    """
    num_exits = conf.shape[1]
    conf, costs = conf.double(), torch.as_tensor(costs, dtype=torch.float64)
    global_ = torch.tensor(start_grid, dtype=torch.float64)[:, None].expand(-1, num_exits - 1)
    acc, cost = _threshold_batch_stats(conf, correct, costs, global_)
    ok = [i for i in range(len(start_grid)) if cost[i] <= budget + 1e-12]
    if not ok:
        return None
    ok.sort(key=lambda i: (-float(acc[i]), float(cost[i]), i))
    levels = torch.linspace(0, 1, num_quantiles + 1, dtype=torch.float64)
    grids = [
        torch.cat([torch.quantile(conf[:, k], levels, interpolation="lower"), torch.tensor([float("inf")])])
        for k in range(num_exits - 1)
    ]
    results = [
        _coordinate_ascent(conf, correct, costs, budget, global_[i].clone(), float(acc[i]), grids, passes)
        for i in ok[:starts]
    ]
    best = min(range(len(results)), key=lambda r: (-results[r][1], results[r][2], r))
    return results[best][0]
