"""Does a certified guarantee hold? Re-split calib half B ∪ test many times, certify on one part, measure the
risk on the rest (docs/evaluation.md, "Guarantees").

Everything is cached, so each re-split is a matrix product: the candidates' losses and costs on the pool are
(K, P) matrices, the re-splits an (R, P) mask, and every count of every candidate on every certification part
comes out of one product. The candidates' sequence (and the bets) stay those of calib half A, as in
:func:`jeidnn.evaluate.certify.certify`. Side by side, in the same re-splits:

* ``naive``: the cheapest candidate whose risk on the certification part is <= eps (no bound);
* ``calm``: fixed-sequence testing with Hoeffding p-values (CALM's test);
* ``ours``: what :func:`certify` does (its p-value, or conformal risk control for ``expectation``);
* ``peeking``: the cheapest candidate whose held-out risk is <= eps: a lower bound on cost, not a method;
  for the accuracy gap also ``peeking_clipped``, the same on max(gap, 0), the bound of any test that reads
  the clipped loss.

When a rule certifies nothing the full model is played (cost of the last exit, risk 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from jeidnn.config.schema import GuaranteeConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.certify import certify, check_guarantee, method_points, shared_methods
from jeidnn.evaluate.risk import BETTING, PVALUES, Counts, conformal_risk_control, fixed_sequence, kelly_bet
from jeidnn.evaluate.risk_data import RiskData, certifiable_names, sequence, signed_test
from jeidnn.evaluate.selection import MethodSet

__all__ = ["EPSILON_GRID", "RULES", "ResplitCheck", "guarantees_summary", "wilson"]

RULES = ("naive", "calm", "ours", "peeking", "peeking_clipped")
"""The rules side by side; ``peeking_clipped`` for the accuracy gap only."""
DEFAULT_RESPLITS = 500
EPSILON_GRID = (0.005, 0.01, 0.02, 0.05)
"""The eps values of the cost-against-eps curve in report.md."""


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a frequency ``hits / n`` (the re-splits' Monte-Carlo error)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class _Pool:
    """One method's candidates on calib B ∪ test, and the re-splits' certification masks."""

    losses: Tensor  # (K, P) int8, the candidates in the method's full calib-A order
    costs: Tensor  # (K, P) float32
    seq: Tensor  # (S,) indices into K of the certified sequence
    bets: Tensor | None  # (S,) betting test only
    a: Counts | None = None  # the sequence's counts on calib half A, which size the bets


class _Sums:
    """Counts and costs of every candidate on every certification part and its held-out rest."""

    def __init__(self, pool: _Pool, mask: Tensor, n: int) -> None:
        loss = pool.losses.float()
        self.mask = mask
        self.n, self.h = n, mask.shape[1] - n
        self.plus = mask @ (loss == 1).float().T  # (R, K)
        self.minus = mask @ (loss == -1).float().T
        plus_all, minus_all = (loss == 1).sum(1).float(), (loss == -1).sum(1).float()
        self.risk = (self.plus - self.minus) / n
        self.held_risk = ((plus_all - self.plus) - (minus_all - self.minus)) / self.h
        self.held_clipped = (plus_all - self.plus) / self.h  # the mean of max(loss, 0)
        cost = mask @ pool.costs.T  # (R, K)
        self.cost = cost / n
        self.held_cost = (pool.costs.sum(1) - cost) / self.h


def _cheapest(cost: Tensor, allowed: Tensor) -> Tensor:
    """(R,) index of the cheapest allowed candidate per re-split, −1 where none is allowed."""
    picked = torch.where(allowed, cost, torch.full_like(cost, math.inf)).argmin(1)
    return torch.where(allowed.any(1), picked, torch.full_like(picked, -1))


def _bounded_plays(sums: _Sums, g: GuaranteeConfig) -> dict[str, Tensor]:
    """Per rule without a level (naive, peeking), the (R,) candidate played (index into K, −1: none)."""
    plays = {
        "naive": _cheapest(sums.cost, sums.risk <= g.epsilon + 1e-12),
        "peeking": _cheapest(sums.held_cost, sums.held_risk <= g.epsilon + 1e-12),
    }
    if g.risk == "accuracy_gap":
        plays["peeking_clipped"] = _cheapest(sums.held_cost, sums.held_clipped <= g.epsilon + 1e-12)
    return plays


def _tested_plays(pool: _Pool, sums: _Sums, g: GuaranteeConfig, test: str, level: float) -> dict[str, Tensor]:
    """CALM's and ours: the (R,) candidate played (index into K, −1: nothing certified)."""
    seq = pool.seq
    counts = Counts(sums.n, sums.plus[:, seq].long(), sums.minus[:, seq].long())
    cost = sums.cost[:, seq]
    positions = torch.arange(len(seq))[None, :]

    def walk(pvalues: Tensor) -> Tensor:
        passed = fixed_sequence(pvalues, level)
        local = _cheapest(cost, positions < passed[:, None])
        return torch.where(local >= 0, seq[local.clamp(min=0)], local)

    plays = {"calm": walk(PVALUES["hoeffding"](counts, g.epsilon, None))}
    if g.kind == "expectation":
        passed = conformal_risk_control(_monotone_sums(pool, sums), sums.n, g.epsilon)
        plays["ours"] = torch.where(passed > 0, seq[(passed - 1).clamp(min=0)], torch.full_like(passed, -1))
    else:
        plays["ours"] = walk(PVALUES[test](counts, g.epsilon, pool.bets))
    return plays


def _monotone_sums(pool: _Pool, sums: _Sums) -> Tensor:
    """(R, S) sums over each certification part of the losses made monotone along the sequence."""
    mono = torch.cummax(pool.losses[pool.seq].float(), dim=0).values  # (S, P)
    return sums.mask @ mono.T


def _outcomes(plays: Tensor, sums: _Sums, full_cost: float) -> dict:
    rows = torch.arange(len(plays))
    none = plays < 0
    index = plays.clamp(min=0)
    risk = torch.where(none, 0.0, sums.held_risk[rows, index])
    cost = torch.where(none, full_cost, sums.held_cost[rows, index])
    return {"risk": risk, "cost": cost, "certified": ~none}


def _summary(out: dict, g: GuaranteeConfig) -> dict:
    r = len(out["risk"])
    hits = int((out["risk"] > g.epsilon + 1e-12).sum())
    lo, hi = wilson(hits, r)
    risk = out["risk"].double()
    return {
        "violation": hits / r,
        "violation_ci": [lo, hi],
        "mean_cost": float(out["cost"].double().mean()),
        "certified": float(out["certified"].double().mean()),
        "mean_risk": float(risk.mean()),
        "mean_risk_se": float(risk.std() / math.sqrt(r)) if r > 1 else 0.0,
    }


class ResplitCheck:
    """The re-split check of one risk on one run: the pools are built once, then each guarantee (eps, delta,
    kind) of that risk costs a few tensor operations.

    Example:
        >>> check = ResplitCheck(run.methods, "accuracy_gap")  # doctest: +SKIP
        >>> out = check.run(GuaranteeConfig("accuracy_gap", 0.01, 0.1))  # doctest: +SKIP
        >>> out["all"]["ours"]["violation"], out["all"]["peeking"]["mean_cost"]  # doctest: +SKIP
    """

    def __init__(
        self,
        methods: MethodSet,
        risk: str,
        names: list[str] | None = None,
        *,
        resplits: int = DEFAULT_RESPLITS,
        seed: int = 0,
        data: RiskData | None = None,
    ) -> None:
        self.methods, self.risk, self.resplits, self.seed = methods, risk, resplits, seed
        self.names = names or certifiable_names(methods)
        self.data = data or RiskData(methods)
        split = methods.split
        self.n = len(split.b)
        size = self.n + len(methods.inputs.warm.labels["test"])
        gen = torch.Generator().manual_seed(seed)
        order = torch.stack([torch.randperm(size, generator=gen) for _ in range(resplits)])  # (R, P)
        self.mask = torch.zeros(resplits, size).scatter_(1, order[:, : self.n], 1.0)
        self.full_cost = float(methods.inputs.costs[-1])
        self._pools: dict[tuple[str, bool], tuple[_Pool, _Sums] | None] = {}

    def _pool(self, name: str, signed: bool) -> tuple[_Pool, _Sums] | None:
        """The method's pool and sums; None when it offers no candidate (threshold_search may not)."""
        key = (name, signed)
        if key not in self._pools:
            split, data = self.methods.split, self.data
            cands = sequence(self.methods, name)
            if not cands:
                self._pools[key] = None
                return None
            kept = {id(c) for c in sequence(self.methods, name, self.risk, data, signed)}
            seq = torch.tensor([i for i, c in enumerate(cands) if id(c) in kept])
            parts = [("calib", split.b), ("test", None)]
            pool = _Pool(data.losses(cands, self.risk, parts), data.costs(cands, parts).float(), seq, None)
            pool.a = Counts.of(data.losses([cands[i] for i in seq.tolist()], self.risk, [("calib", split.a)]))
            self._pools[key] = (pool, _Sums(pool, self.mask, self.n))
        return self._pools[key]

    def run(self, guarantee: GuaranteeConfig, pvalue: str | None = None, across: str = "screen_on_a") -> dict:
        """Violation frequency and mean cost of each rule, per method and across methods, over the re-splits.

        Returns:
            ``{"resplits", "seed", "pvalue", "across", "num_methods", "shared", "methods": {name: {rule:
            summary}}, "all": {rule: summary}}``. A summary is ``violation`` (held-out risk > eps),
            ``violation_ci`` (Wilson 95 %), ``mean_cost`` and ``mean_risk`` (held-out), ``certified``
            (fraction of re-splits certifying anything). ``methods`` certifies each method alone at delta;
            ``all`` plays, per re-split, the cheapest play of ``ours`` and ``calm`` among the methods
            :func:`certify` shares delta over (``shared``, at its level) and of ``naive`` and ``peeking``
            among every method.
        """
        g = guarantee
        assert g.risk == self.risk, (g.risk, self.risk)
        test = check_guarantee(g, pvalue, across)
        signed = signed_test(test, g)
        shared, level = shared_methods(self.methods, self.names, g, test, across, self.data)
        per_method: dict[str, dict] = {}
        every: dict[str, list] = {}
        rows = torch.arange(self.resplits)
        for name in self.names:
            built = self._pool(name, signed)
            if built is None:  # nothing to play: the full model, every time
                nothing = {
                    "risk": torch.zeros(self.resplits),
                    "cost": torch.full((self.resplits,), self.full_cost),
                    "certified": torch.zeros(self.resplits, dtype=torch.bool),
                }
                rules = ["naive", "peeking", "calm", "ours"] + ["peeking_clipped"] * (
                    g.risk == "accuracy_gap"
                )
                per_method[name] = {r: _summary(nothing, g) for r in rules}
                continue
            pool, sums = built
            pool.bets = kelly_bet(pool.a.plus, pool.a.minus, pool.a.n, g.epsilon) if test in BETTING else None
            alone = {**_bounded_plays(sums, g), **_tested_plays(pool, sums, g, test, g.delta)}
            outcomes = {r: _outcomes(p, sums, self.full_cost) for r, p in alone.items()}
            per_method[name] = {r: _summary(out, g) for r, out in outcomes.items()}
            together = {r: p for r, p in alone.items() if r not in ("calm", "ours")}
            if name in shared:
                together.update(_tested_plays(pool, sums, g, test, level) if level != g.delta else alone)
            for rule, plays in together.items():
                out = outcomes[rule] if plays is alone[rule] else _outcomes(plays, sums, self.full_cost)
                seen = out["cost"] if rule.startswith("peeking") else sums.cost[rows, plays.clamp(min=0)]
                every.setdefault(rule, []).append((torch.where(plays < 0, math.inf, seen), out))
        return {
            "resplits": self.resplits,
            "seed": self.seed,
            "pvalue": "conformal risk control" if g.kind == "expectation" else test,
            "across": across,
            "num_methods": len(self.names),
            "shared": shared,
            "methods": per_method,
            "all": {rule: _summary(_across(found, self.full_cost), g) for rule, found in every.items()},
        }


def _across(results: list[tuple[Tensor, dict]], full_cost: float) -> dict:
    """Per re-split, the cheapest play across methods (by its cost on the certification part; peeking: on
    the held-out part)."""
    costs = torch.stack([c for c, _ in results], 1)  # (R, M)
    best = costs.argmin(1)
    rows = torch.arange(len(best))
    none = torch.isinf(costs[rows, best])
    pick = {k: torch.stack([o[k] for _, o in results], 1)[rows, best] for k in ("risk", "cost")}
    return {
        "risk": torch.where(none, 0.0, pick["risk"]),
        "cost": torch.where(none, full_cost, pick["cost"]),
        "certified": ~none,
    }


def guarantees_summary(
    methods: MethodSet,
    guarantees: list[GuaranteeConfig],
    seed: int,
    resplits: int = DEFAULT_RESPLITS,
    grid: tuple[float, ...] = EPSILON_GRID,
) -> list[dict]:
    """report.json ``summary.guarantees``: per guarantee, the certificate (or why there is none), each method
    certified alone, the re-split check and the cost-against-eps curve of every rule at its delta.

    Re-splits are seeded with ``seed + 3`` (the bootstrap uses ``seed + 1``, the conformal re-splits
    ``seed + 2``).
    """
    data = RiskData(methods)
    checks: dict[str, ResplitCheck] = {}
    out = []
    for g in guarantees:
        if g.risk not in checks:
            checks[g.risk] = ResplitCheck(methods, g.risk, resplits=resplits, seed=seed + 3, data=data)
        check = checks[g.risk]
        entry: dict = {
            "guarantee": {"risk": g.risk, "epsilon": g.epsilon, "delta": g.delta, "kind": g.kind},
            "certificate": None,
            "reason": None,
        }
        try:
            entry["certificate"] = certify(methods, g, data=data).to_dict()
        except JeidnnError as exc:
            entry["reason"] = str(exc)
        entry["methods"] = method_points(methods, g, data=data)
        entry["resplit"] = check.run(g)
        curve = []
        for eps in sorted(set(grid) | {g.epsilon}):
            at = (
                entry["resplit"]
                if eps == g.epsilon
                else check.run(GuaranteeConfig(g.risk, eps, g.delta, g.kind))
            )
            rules = {r: {k: v[k] for k in ("mean_cost", "violation")} for r, v in at["all"].items()}
            curve.append({"epsilon": eps, **rules})
        entry["curve"] = curve
        out.append(entry)
    return out
