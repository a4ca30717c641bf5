"""Whom each method is compared with at a budget, and by how much it wins or loses on test.

At every budget each method has played its calib-A choice (:func:`jeidnn.evaluate.budgeted.budgeted_rows`).
The comparisons here only pick among those choices (docs/evaluation.md, "Compared with which baseline"):

* the **reference baseline**: the non-learned method whose choice is the most accurate on **val**, and the
  **best learned method** likewise. No configuration was chosen on val (thresholds, τ and λ are all chosen
  on calib A) and it is not test, so neither pick favours anyone: picking on test takes a maximum over noisy
  estimates (biased against the learned methods), picking on calib A favours whichever baseline searched
  calib A hardest (``threshold_search`` maximises calib-A accuracy directly). Runs without val predictions
  fall back to calib-A accuracy, and say so (``picked_on``). A learned method whose gates were trained on
  val (``gate_data: val``) would win a val pick by fitting it, so it is not a candidate for the best learned
  method while one trained elsewhere met the budget; where none did, the learned methods are picked on
  calib A (``best_learned_picked_on``).
* the **test-best baseline**: the non-learned method most accurate on test, kept as a secondary reference
  that favours the baselines.

Ties go to the lower cost on the same split, then to report order. The oracle never takes part (it has no
budgeted rows). Every difference is test accuracy minus test accuracy with a paired percentile bootstrap
interval (:func:`jeidnn.evaluate.metrics.paired_bootstrap`); all intervals share the same resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from jeidnn.evaluate.metrics import paired_bootstrap

__all__ = ["Entry", "compare", "pick"]


@dataclass
class Entry:
    """One method's choice at one budget, as the comparisons see it."""

    row: dict
    """Its row of ``summary.budgeted`` (``method``, ``kind``, ``accuracy``, ``cost``, ``calib_accuracy``,
    ``calib_cost``); the comparisons write their keys into it."""
    correct: Tensor  # (N_test,) bool: right at the exit the configuration takes
    val: dict[str, float] | None
    """Accuracy and cost of the configuration on val; None where the run kept no val predictions."""
    fitted_on_val: bool = False
    """Its gates were trained on val (a learned method with ``gate_data: val``)."""

    @property
    def is_baseline(self) -> bool:
        return self.row["kind"] not in ("learned", "oracle")

    def outcome(self, split: str) -> tuple[float, float]:
        """(accuracy, cost) of the configuration on ``split``: ``val``, ``calib_a`` or ``test``."""
        if split == "val":
            assert self.val is not None
            return self.val["accuracy"], self.val["cost"]
        if split == "calib_a":
            return self.row["calib_accuracy"], self.row["calib_cost"]
        return self.row["accuracy"], self.row["cost"]


def pick(entries: list[Entry], split: str) -> Entry | None:
    """The entry most accurate on ``split`` (ties: lower cost on ``split``, then the earlier entry)."""
    if not entries:
        return None
    best = min(
        range(len(entries)), key=lambda i: (-entries[i].outcome(split)[0], entries[i].outcome(split)[1], i)
    )
    return entries[best]


def _best_learned(learned: list[Entry], on: str) -> tuple[Entry | None, str | None]:
    """The best learned entry picked on ``on``, leaving out those trained on val when picking on val (all of
    them trained on val: picked on calib A instead), and the split it was picked on."""
    if not learned:
        return None, None
    if on == "val":
        clean = [e for e in learned if not e.fitted_on_val]
        return (pick(clean, "val"), "val") if clean else (pick(learned, "calib_a"), "calib_a")
    return pick(learned, on), on


def _interval(stats: list[float]) -> dict[str, float]:
    mean, lo, hi = stats
    return {"mean": mean, "ci_low": lo, "ci_high": hi}


def compare(budgets: list[tuple[float, list[Entry]]], resamples: int, seed: int) -> list[dict]:
    """Pick the references at each budget, write each row's differences, and return the headline.

    Every row gets ``val_accuracy`` / ``val_cost`` (None without val), ``reference_baseline`` and
    ``delta_vs_reference``, ``best_baseline`` (the test-best baseline) and ``delta_vs_best_baseline``.

    Args:
        budgets: per budget, the entries of the methods that met it on calib A, in report order.
        resamples: bootstrap resamples of the test indices.
        seed: seeds the resamples (the same for every column).

    Returns:
        ``summary.budgeted.headline``: per budget with a baseline, ``budget``, ``picked_on`` (``val`` or
        ``calib_a``), ``best_learned`` and ``best_learned_picked_on``, ``reference_baseline``, ``delta``
        (best learned − reference, the
        headline; None without a learned method), ``test_best_baseline``, ``delta_vs_test_best`` (best
        learned − test-best baseline) and ``vs_each_baseline`` (best learned − each baseline, by name).
    """
    columns: list[tuple[dict, str, Tensor, Tensor]] = []  # (where the result goes, key, correct, reference)
    headline = []
    for budget, entries in budgets:
        for e in entries:
            e.row.update(
                val_accuracy=e.val["accuracy"] if e.val else None,
                val_cost=e.val["cost"] if e.val else None,
            )
        baselines = [e for e in entries if e.is_baseline]
        if not baselines:
            continue
        on = "val" if all(e.val is not None for e in entries) else "calib_a"
        reference, test_best = pick(baselines, on), pick(baselines, "test")
        assert reference is not None and test_best is not None
        for e in entries:
            e.row.update(reference_baseline=reference.row["method"], best_baseline=test_best.row["method"])
            columns.append((e.row, "delta_vs_reference", e.correct, reference.correct))
            columns.append((e.row, "delta_vs_best_baseline", e.correct, test_best.correct))
        learned, learned_on = _best_learned([e for e in entries if e.row["kind"] == "learned"], on)
        line: dict = {
            "budget": budget,
            "picked_on": on,
            "best_learned": learned.row["method"] if learned else None,
            "best_learned_picked_on": learned_on,
            "reference_baseline": reference.row["method"],
            "delta": None,
            "test_best_baseline": test_best.row["method"],
            "delta_vs_test_best": None,
            "vs_each_baseline": {},
        }
        headline.append(line)
        if learned is not None:
            columns.append((line, "delta", learned.correct, reference.correct))
            columns.append((line, "delta_vs_test_best", learned.correct, test_best.correct))
            for b in baselines:
                columns.append((line["vs_each_baseline"], b.row["method"], learned.correct, b.correct))
    if columns:
        diffs = torch.stack([c.double() - r.double() for _, _, c, r in columns], dim=1)  # (N_test, columns)
        stats = paired_bootstrap(diffs, resamples, seed)
        for (target, key, _, _), values in zip(columns, stats.tolist(), strict=True):
            target[key] = _interval(values)
    return headline
