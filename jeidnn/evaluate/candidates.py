"""Where every sample exits under each configuration a method offers: the candidate builders.

A builder reads one run's cached predictions (:class:`Source`, from
:class:`jeidnn.evaluate.predictions.RunPredictions`) and returns a method's candidates
(:class:`jeidnn.evaluate.budgeted.Candidate`), or, for ``threshold_search``, a function of the budget that
returns them. Each candidate keeps in ``uses`` what its gates need to play it again (thresholds and their
confidence measure, a patience, an exit), so export reads the evaluation's choice instead of refitting it.
The registry (:mod:`jeidnn.evaluate.methods`) names which builder serves which method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jeidnn.evaluate.budgeted import CalibSplit, Candidate, Source, make_candidate
from jeidnn.model import policies as bl
from jeidnn.model.policies import score_exits

__all__ = [
    "GLOBAL_GRID",
    "PRODUCT_PS",
    "TAU_GRID",
    "Inputs",
    "learned_candidates",
]

GLOBAL_GRID: list[float] = [round(0.01 * i, 2) for i in range(101)] + [0.995, 0.999, math.inf]
"""Global thresholds always tried besides ``eval.global_thresholds``: 0 sends everyone to the first
exit, ``inf`` nobody exits early, so the grid spans every budget."""
TAU_GRID: list[float] = sorted({0.001, 0.5, 0.999, *(round(0.01 * i, 2) for i in range(1, 100))}) + [math.inf]
"""Exit-score thresholds of a ``calib_threshold`` learned method; ``inf``: nobody exits early."""
PRODUCT_PS: list[float] = [round(0.05 * 400 ** (i / 40), 4) for i in range(41)]
"""Geometric targets ``q_k ∝ p^k`` that ``product_maxprob`` always tries besides ``eval.threshold_ps``: 41
values log-spaced from 0.05 (nearly everyone at the first exit) to 20 (nearly everyone at the last), so that
every budget has a candidate close to it."""


@dataclass
class Inputs:
    """What the builders read: the warm-up IMs' predictions, the learned models' and the grids."""

    warm: Source
    costs: list[float]  # exits.cost, what every non-learned method pays
    layers: list[int]  # 1-based backbone layer of each exit
    split: CalibSplit
    cfg: Any  # EvalConfig: threshold_ps, global_thresholds, patience_values
    learned: dict[str, dict] = field(default_factory=dict)  # report.json `learned`
    sources: dict[str, list[Source]] = field(default_factory=dict)  # learned method -> each model's

    def __post_init__(self) -> None:
        self.maxprob = {s: bl.confidence(p, "maxprob") for s, p in self.warm.probs.items()}
        self.preds = {s: p.argmax(-1) for s, p in self.warm.probs.items()}
        self.ps = list(self.cfg.threshold_ps)
        self.grid = sorted(set(self.cfg.global_thresholds) | set(GLOBAL_GRID))
        values = self.cfg.patience_values
        self.patience = list(values) if values is not None else list(range(len(self.costs)))

    def grids(self) -> dict:
        """The grids the baselines used, as report.json ``evaluation`` lists them."""
        return {"threshold_ps": self.ps, "global_thresholds": self.grid, "patience_values": self.patience}


def _budgeted_batch(
    src: Source,
    conf: dict[str, Tensor],
    costs: list[float],
    split: CalibSplit,
    ps: list[float],
    tag: Callable,
    uses: Callable[[Tensor], dict],
) -> list[Candidate]:
    """Per-exit thresholds on the confidences ``conf`` (split -> (N, L)) fitted on calib A by the
    budgeted-batch rule, one candidate per geometric target q_k ∝ p^k."""
    out = []
    for p in ps:
        target = bl.geometric_exit_distribution(p, len(costs))
        thresholds = bl.fit_budgeted_thresholds(conf["calib"][split.a], target)
        exits = {s: bl.apply_thresholds(conf[s], thresholds) for s in conf}
        out.append(
            make_candidate(
                tag(p), src, costs, exits["calib"], exits["test"], split, uses(thresholds), exits.get("val")
            )
        )
    return out


def geometric_candidates(
    src: Source, costs: list[float], split: CalibSplit, measure: str, ps: list[float], tag: Callable
) -> list[Candidate]:
    """Budgeted-batch thresholds on one confidence ``measure`` for each geometric target q_k ∝ p^k."""
    conf = {s: bl.confidence(p, measure) for s, p in src.probs.items()}  # (N, L) each
    return _budgeted_batch(src, conf, costs, split, ps, tag, lambda t: {"thresholds": t, "measure": measure})


def _val_exits(src: Source, exits: Callable[[str], Tensor]) -> Tensor | None:
    """``exits("val")`` where the predictions have a val split, else None."""
    return exits("val") if "val" in src.logits else None


def _policy(x: Inputs, params: list, policy: Callable, uses: Callable) -> list[Candidate]:
    return [
        make_candidate(
            p,
            x.warm,
            x.costs,
            policy("calib", p),
            policy("test", p),
            x.split,
            uses(p),
            _val_exits(x.warm, lambda s, p=p: policy(s, p)),
        )
        for p in params
    ]


def thresholds_of(measure: str) -> Callable[[Inputs], list[Candidate]]:
    """``threshold_<measure>``: budgeted-batch thresholds on the warm-up IMs, one per ``threshold_ps`` p."""
    return lambda x: geometric_candidates(x.warm, x.costs, x.split, measure, x.ps, lambda p: p)


def global_maxprob(x: Inputs) -> list[Candidate]:
    """One max-prob threshold at every exit, over the global grid."""
    num_gates = len(x.costs) - 1
    return _policy(
        x,
        x.grid,
        lambda s, t: bl.global_threshold_exits(x.maxprob[s], t),
        lambda t: {"thresholds": [float(t)] * num_gates, "measure": "maxprob"},
    )


def threshold_search(x: Inputs) -> Callable[[float], list[Candidate]]:
    """Per-exit max-prob thresholds searched on calib A for each budget (none when no start meets it)."""
    searched: dict[float, list[Candidate]] = {}

    def search(budget: float) -> list[Candidate]:
        if budget not in searched:
            a = x.split.a
            thr = bl.search_thresholds(
                x.maxprob["calib"][a], x.warm.correct["calib"][a], x.costs, budget, x.grid
            )
            searched[budget] = (
                []
                if thr is None
                else [
                    make_candidate(
                        {"budget": budget, "thresholds": thr.tolist()},
                        x.warm,
                        x.costs,
                        bl.apply_thresholds(x.maxprob["calib"], thr),
                        bl.apply_thresholds(x.maxprob["test"], thr),
                        x.split,
                        {"thresholds": thr.tolist(), "measure": "maxprob"},
                        _val_exits(x.warm, lambda s: bl.apply_thresholds(x.maxprob[s], thr)),
                    )
                ]
            )
        return searched[budget]

    return search


def product_maxprob(x: Inputs) -> list[Candidate]:
    """Budgeted-batch thresholds on the running product of max-probabilities (history-aware), one per p of
    ``eval.threshold_ps`` and :data:`PRODUCT_PS`."""
    conf = {s: bl.running_product(m) for s, m in x.maxprob.items()}  # (N, L) each
    ps = sorted(set(x.ps) | set(PRODUCT_PS))
    return _budgeted_batch(x.warm, conf, x.costs, x.split, ps, lambda p: p, lambda t: {"thresholds": t})


def patience_confidence(x: Inputs) -> list[Candidate]:
    """Leave once the prediction has held for ``patience`` exits and the max-probability reaches
    ``threshold``: every patience value x every global threshold."""
    params = [{"patience": int(k), "threshold": float(t)} for k in x.patience for t in x.grid]

    def policy(s: str, q: dict) -> Tensor:
        return bl.patience_confidence_exits(x.preds[s], x.maxprob[s], q["patience"], q["threshold"])

    return _policy(x, params, policy, dict)


def patience(x: Inputs) -> list[Candidate]:
    """PABEE: exit once the prediction has stayed the same for ``patience`` more exits."""
    policy = lambda s, t: bl.patience_exits(x.preds[s], t)  # noqa: E731
    return _policy(x, x.patience, policy, lambda t: {"patience": int(t)})


def static(x: Inputs) -> list[Candidate]:
    """Every sample at one exit; the param is its 1-based backbone layer."""
    exit_of_layer = {layer: e for e, layer in enumerate(x.layers)}
    n = {s: len(labels) for s, labels in x.warm.labels.items()}
    policy = lambda s, la: bl.static_exits(n[s], exit_of_layer[la])  # noqa: E731
    return _policy(x, list(x.layers), policy, lambda la: {"exit": exit_of_layer[la]})


def oracle(x: Inputs) -> list[Candidate]:
    """The first correct exit of each sample (reads the labels: an upper bound)."""
    return _policy(x, [None], lambda s, _: bl.oracle_exits(x.preds[s], x.warm.labels[s]), lambda _: {})


def model_tag(k: int, lam: float | None) -> Callable:
    return lambda p: {"model": k, "lambda": lam, "p": p}


def thresholds_on_learned_ims(learned: str) -> Callable[[Inputs], list[Candidate]]:
    """Max-prob budgeted-batch thresholds on the IMs of every model of the learned method ``learned``."""

    def build(x: Inputs) -> list[Candidate]:
        cands = []
        for k, (model, src) in enumerate(zip(x.learned[learned]["models"], x.sources[learned], strict=True)):
            tag = model_tag(k, model.get("lambda"))
            cands += geometric_candidates(src, x.costs, x.split, "maxprob", x.ps, tag)
        return cands

    return build


def learned_candidates(entry: dict, sources: list[Source], split: CalibSplit) -> list[Candidate]:
    """Every model x every tau of the method's grid (tau = 0.5 only for ``native``)."""
    taus = [0.5] if entry["operating_point"] == "native" else TAU_GRID
    # float64 as counted: float32 costs would move calib costs off the budgets they are compared with at 1e-9.
    costs = torch.tensor(entry["costs"], dtype=torch.float64)
    out = []
    for k, (model, src) in enumerate(zip(entry["models"], sources, strict=True)):
        assert src.scores is not None
        for tau in taus:
            param = {"model": k, "lambda": model.get("lambda"), "tau": tau}
            exits = {s: score_exits(scores, tau) for s, scores in src.scores.items()}
            out.append(
                make_candidate(
                    param, src, costs, exits["calib"], exits["test"], split, None, exits.get("val")
                )
            )
    return out
