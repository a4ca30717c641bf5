"""A method's candidates as a certification sequence, and their losses against the full model on any part of
a run's data (docs/evaluation.md, "Guarantees").

:func:`sequence` orders a method's candidates from the most conservative to the cheapest by calib-A cost and,
for a risk, keeps the calib-A Pareto front; :class:`RiskData` turns candidates into (K, N) loss and cost
matrices with one gather, for :mod:`jeidnn.evaluate.certify` and the re-split check of
:mod:`jeidnn.evaluate.guarantees`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jeidnn.config.schema import GuaranteeConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import DEFAULT_BUDGETS, Candidate
from jeidnn.evaluate.risk import sample_losses
from jeidnn.evaluate.selection import MethodSet

__all__ = ["SIGNED", "RiskData", "certifiable_names", "check_names", "sequence", "signed_test"]

SIGNED = {"betting"}
"""The p-values that read the signed loss; the others read its +1 part (the 0/1 loss or the clipped gap)."""


def signed_test(test: str, g: GuaranteeConfig) -> bool:
    """Whether the rule reads the signed loss (betting, conformal risk control) rather than its +1 part."""
    return test in SIGNED or g.kind == "expectation"


def certifiable_names(methods: MethodSet) -> list[str]:
    """Every method of the run but the oracle (it reads each sample's label)."""
    return [m.name for m in methods.methods if m.kind != "oracle"]


def check_names(methods: MethodSet, names: list[str] | None) -> list[str]:
    """``names`` (default: every certifiable method) without repeats; an unknown one or the oracle is a
    one-line JeidnnError."""
    valid = certifiable_names(methods)
    if names is None:
        return valid
    for name in names:
        if name == "oracle":
            raise JeidnnError("the oracle reads each sample's label and cannot be certified; choose a method")
        if name not in valid:
            raise JeidnnError(f"unknown method {name!r}; this run can certify: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def sequence(
    methods: MethodSet, name: str, risk: str | None = None, data: RiskData | None = None, signed: bool = True
) -> list[Candidate]:
    """The method's candidates from the most conservative to the cheapest by calib-A cost (ties: the earlier
    candidate first). ``threshold_search`` offers its search at every budget of ``eval.budgets``.

    With ``risk``, only the most conservative candidate and the calib-A Pareto front are kept: a candidate
    stays when every cheaper one (by calib-A cost) has a higher calib-A risk. Calib A is not the data that
    tests the sequence, so the sequence is still fixed before it; dropping dominated candidates keeps one
    noisy candidate from ending the walk early. ``signed=False`` compares the clipped losses max(loss, 0),
    which the count-based p-values read."""
    method = methods[name]
    if callable(method.candidates):  # threshold_search may offer nothing at every budget: an empty sequence
        budgets = getattr(methods.inputs.cfg, "budgets", None) or DEFAULT_BUDGETS
        found: dict[str, Candidate] = {}
        for budget in sorted(budgets):
            for cand in method.candidates_at(budget):
                found.setdefault(repr(cand.uses), cand)  # the same thresholds at several budgets: once
        cands = list(found.values())
    else:
        cands = list(method.candidates)
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].calib_cost, i))
    cands = [cands[i] for i in order]
    if risk is None or not cands:
        return cands
    data = data or RiskData(methods)
    losses_a = data.losses(cands, risk, [("calib", methods.split.a)])
    risk_a = (losses_a if signed else losses_a.clamp(min=0)).double().mean(-1).tolist()
    keep, best = [], float("inf")
    for i in reversed(range(1, len(cands))):  # cheapest first; the most conservative one always stays
        if risk_a[i] < best - 1e-12:
            keep.append(i)
            best = risk_a[i]
    return [cands[i] for i in [0, *reversed(keep)]]


class RiskData:
    """Per-sample losses and costs of candidates on any part of a run's data, against the full model (the
    warm-up exits' last exit: the backbone's own final classifier)."""

    def __init__(self, methods: MethodSet) -> None:
        warm = methods.inputs.warm
        self.methods = methods
        self.full_pred = {s: p[:, -1].argmax(-1) for s, p in warm.probs.items()}
        self.full_correct = {s: c[:, -1] for s, c in warm.correct.items()}
        self._preds: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._losses: dict[tuple, Tensor] = {}

    def _exits(self, cands: list[Candidate], split: str, index: Tensor | None) -> Tensor:
        """(K, n) long: where each candidate's samples of ``split`` (``index``: those only) exit."""
        rows = []
        for cand in cands:
            exits = {"calib": cand.calib_exits, "test": cand.test_exits, "val": cand.val_exits}[split]
            if exits is None:
                raise JeidnnError("this run kept no val predictions; re-run training to certify it")
            rows.append(exits if index is None else exits[index])
        return torch.stack(rows).long()

    def _tables(self, cands: list[Candidate], split: str) -> tuple[Tensor, Tensor, Tensor]:
        """Each candidate's source as an index, and every source's (N, L) predictions and correctness stacked
        (S, N, L), so one gather reads every candidate's row."""
        sources: dict[int, int] = {}
        which = torch.tensor([sources.setdefault(id(c.source), len(sources)) for c in cands])
        key = (tuple(sources), split)
        if key not in self._preds:
            srcs = {id(c.source): c.source for c in cands}
            pred = torch.stack([srcs[i].probs[split].argmax(-1) for i in sources])
            right = torch.stack([srcs[i].correct[split] for i in sources])
            self._preds[key] = (pred, right)
        return (which, *self._preds[key])

    def losses(self, cands: list[Candidate], risk: str, parts: list[tuple[str, Tensor | None]]) -> Tensor:
        """(K, N) int8 losses on the concatenation of ``parts`` (split name, sample indices or None: all).

        Remembered per (candidates, risk, parts): the re-split check and the rules ask again for each eps."""
        key = (tuple(map(id, cands)), risk, tuple((s, None if i is None else id(i)) for s, i in parts))
        if key not in self._losses:
            self._losses[key] = self._compute_losses(cands, risk, parts)
        return self._losses[key]

    def _compute_losses(
        self, cands: list[Candidate], risk: str, parts: list[tuple[str, Tensor | None]]
    ) -> Tensor:
        cols = []
        for split, index in parts:
            exits = self._exits(cands, split, index)  # (K, n)
            which, pred, right = self._tables(cands, split)  # (K,), (S, N, L), (S, N, L)
            _, num, width = pred.shape
            rows = torch.arange(num) if index is None else index
            flat = (which[:, None] * num + rows[None, :]) * width + exits  # (K, n) into the stacked tables
            full_pred, full_correct = self.full_pred[split][rows], self.full_correct[split][rows]
            loss = sample_losses(risk, pred.view(-1)[flat], right.view(-1)[flat], full_pred, full_correct)
            cols.append(loss)
        return torch.cat(cols, dim=1)

    def costs(self, cands: list[Candidate], parts: list[tuple[str, Tensor | None]]) -> Tensor:
        """(K, N) float64 cost each sample pays, on the concatenation of ``parts`` (remembered too)."""
        key = (tuple(map(id, cands)), "cost", tuple((s, None if i is None else id(i)) for s, i in parts))
        if key not in self._losses:
            table = torch.stack([c.costs for c in cands])  # (K, L)
            self._losses[key] = torch.cat(
                [table.gather(1, self._exits(cands, s, i)) for s, i in parts], dim=1
            )
        return self._losses[key]
