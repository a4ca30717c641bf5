"""Certification of a run's operating points, the re-split check and `jeidnn certify`, on the small synthetic
run of test_evaluation.py (calib 300: halves of 150; test 400; val 200)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_evaluation import COST, make_run

from jeidnn.cli.main import main
from jeidnn.config.schema import GuaranteeConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.certify import ANCHOR, SCREENED, certify, walk
from jeidnn.evaluate.conformal import conformal_quantile, group_exits
from jeidnn.evaluate.evaluation import evaluate_run
from jeidnn.evaluate.guarantees import ResplitCheck, wilson
from jeidnn.evaluate.risk_data import RiskData, sequence
from jeidnn.export.operating_point import Run
from jeidnn.io import json_safe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("certify"))


@pytest.fixture(scope="module")
def methods(run_dir):
    return Run.open(run_dir).methods


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _hand_losses(methods, cand, split, index):
    """Clipped accuracy-gap losses of one candidate, read the plain way: exit wrong and full model right."""
    warm, src = methods.inputs.warm, cand.source
    exits = {"calib": cand.calib_exits, "test": cand.test_exits}[split].long()[index]
    right = src.correct[split][index].gather(1, exits[:, None]).squeeze(1)
    full_right = warm.correct[split][index][:, -1]
    return (~right & full_right).long(), (right & ~full_right).long(), cand.costs[exits]


def test_certify_plays_the_cheapest_candidate_fixed_sequence_testing_rejects(methods):
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1)
    cert = certify(methods, g, ["global_maxprob"], pvalue="binomial")
    split = methods.split
    # The sequence by hand: calib-A cost from high to low, then the calib-A Pareto front of the clipped risk.
    cands = sorted(methods["global_maxprob"].candidates, key=lambda c: -c.calib_cost)
    risk_a = [_hand_losses(methods, c, "calib", split.a)[0].double().mean().item() for c in cands]
    keep = [0] + [
        i for i in range(1, len(cands)) if all(risk_a[i] < risk_a[j] for j in range(i + 1, len(cands)))
    ]
    seq = [cands[i] for i in keep]
    assert [id(c) for c in seq] == [
        id(c) for c in sequence(methods, "global_maxprob", "accuracy_gap", signed=False)
    ]
    rejected = []
    for cand in seq:
        plus, _, cost = _hand_losses(methods, cand, "calib", split.b)
        if _binomial_cdf(int(plus.sum()), len(split.b), 0.1) > 0.1:
            break
        rejected.append((cost.double().mean().item(), cand))
    assert rejected and len(rejected) < len(seq)  # the walk stopped inside the sequence
    best = min(rejected, key=lambda x: x[0])[1]
    assert cert.choice.candidate is best and cert.method == "global_maxprob"
    assert cert.per_method["global_maxprob"]["passed"] == len(rejected)
    plus, minus, _ = _hand_losses(methods, best, "test", slice(None))
    assert cert.test_risk == pytest.approx((plus - minus).double().mean().item())
    assert cert.choice.budget is None and "one method" in cert.proof and "n = 150" in cert.proof


def test_bonferroni_shares_delta_over_every_method(methods):
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1)
    cert = certify(methods, g, across="bonferroni")
    names = [m.name for m in methods.methods if m.kind != "oracle"]
    assert cert.num_methods == len(names) == 12 and list(cert.per_method) == names
    assert "Bonferroni over 12 methods" in cert.proof
    for entry in cert.per_method.values():
        assert entry["pvalue"] is None or entry["pvalue"] <= 0.1 / 12
    # the winner is the cheapest certified one on calib B
    costs = {n: e["calib_b_cost"] for n, e in cert.per_method.items() if e["calib_b_cost"] is not None}
    assert cert.method == min(costs, key=costs.get)


def test_screening_on_calib_a_keeps_the_cheapest_methods_there(methods):
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1)
    cert = certify(methods, g)
    data, part = RiskData(methods), [("calib", methods.split.a)]
    reach = {}
    for name in [m.name for m in methods.methods if m.kind != "oracle"]:
        w = walk(
            name,
            sequence(methods, name, "accuracy_gap", data, False),
            data,
            g,
            part,
            0.1,
            "binomial_or_betting",
        )
        reach[name] = math.inf if w.cost is None else w.cost
    top = sorted(reach, key=lambda n: reach[n])[:SCREENED]
    assert list(cert.per_method)[:SCREENED] == top
    assert set(cert.per_method) == set(top) | {ANCHOR}
    for entry in cert.per_method.values():
        assert entry["pvalue"] is None or entry["pvalue"] <= 0.1 / len(cert.per_method)


def test_expectation_certifies_one_method_by_conformal_risk_control(methods):
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1, "expectation")
    cert = certify(methods, g)
    assert len(cert.per_method) == 1 and "conformal risk control" in cert.proof
    (entry,) = cert.per_method.values()
    # its bound (n R + 1) / (n + 1) on the monotone losses passes, the next candidate's does not
    assert entry["pvalue"] <= 0.1


def test_certificate_conformal_quantiles_are_fitted_on_val(methods):
    cert = certify(methods, GuaranteeConfig("accuracy_gap", 0.1, 0.1))
    quantiles, groups = cert.conformal([0.1], min_samples=30)
    cand, split = cert.choice.candidate, methods.split
    num_exits = len(cand.costs)
    assert groups == group_exits(torch.bincount(cand.calib_exits[split.a].long(), minlength=num_exits), 30)
    src, exits = cand.source, cand.val_exits.long()
    scores = 1 - src.probs["val"][torch.arange(len(exits)), exits, src.labels["val"]].double()
    for group in groups:
        members = torch.isin(exits, torch.tensor(group))
        want = conformal_quantile(scores[members], 0.1)
        assert all(quantiles["0.1"][e] == pytest.approx(want) for e in group)
    out = json.loads(json.dumps(json_safe(cert.to_dict())))
    assert out["guarantee"] == {
        "risk": "accuracy_gap",
        "epsilon": 0.1,
        "delta": 0.1,
        "kind": "high_probability",
    }
    assert out["method"] == cert.method and out["test_cost"] == pytest.approx(
        cert.test_outcome()["test_cost"]
    )


def test_bad_guarantees_and_methods_are_refused_in_one_line(methods):
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1)
    with pytest.raises(JeidnnError, match=r"unknown method 'nope'; this run can certify: jeidnn_paper, "):
        certify(methods, g, ["nope"])
    with pytest.raises(JeidnnError, match="oracle reads each sample's label"):
        certify(methods, g, ["oracle"])
    with pytest.raises(JeidnnError, match=r"epsilon must lie in \(0, 1\), got 1.5"):
        certify(methods, GuaranteeConfig("accuracy_gap", 1.5, 0.1))
    with pytest.raises(JeidnnError, match="unknown risk 'error'"):
        certify(methods, GuaranteeConfig("error", 0.1, 0.1))
    # The full model (global_maxprob at threshold ∞) makes no loss: it passes once (1 - eps)^150 <= 0.1.
    smallest = 1 - 0.1 ** (1 / 150)
    with pytest.raises(JeidnnError, match=f"smallest epsilon certifiable at delta 0.1 is {smallest:.4f}"):
        certify(methods, GuaranteeConfig("accuracy_gap", 0.01, 0.1), ["global_maxprob"], pvalue="binomial")


def test_resplit_check_matches_a_plain_loop(methods):
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1)
    check = ResplitCheck(methods, "accuracy_gap", ["global_maxprob"], resplits=6, seed=5)
    got = check.run(g, pvalue="binomial")["methods"]["global_maxprob"]
    seq = sequence(methods, "global_maxprob", "accuracy_gap", signed=False)
    cands = sorted(methods["global_maxprob"].candidates, key=lambda c: -c.calib_cost)
    b = methods.split.b
    losses = {id(c): [torch.cat(t) for t in zip(_hand_losses(methods, c, "calib", b),
                                                _hand_losses(methods, c, "test", slice(None)))]
              for c in cands}  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    size, n = len(b) + 400, len(b)
    ours, naive, peeking = [], [], []
    for _ in range(6):
        perm = torch.randperm(size, generator=gen)
        cert, held = perm[:n], perm[n:]

        def stats(c, part):
            plus, minus, cost = losses[id(c)]
            return (plus[part] - minus[part]).double().mean().item(), cost[part].double().mean().item()

        passed = []
        for c in seq:
            if _binomial_cdf(int(losses[id(c)][0][cert].sum()), n, 0.1) > 0.1:
                break
            passed.append(c)
        play = min(passed, key=lambda c: stats(c, cert)[1])
        ours.append(stats(play, held))
        naive.append(
            stats(min((c for c in cands if stats(c, cert)[0] <= 0.1), key=lambda c: stats(c, cert)[1]), held)
        )
        peeking.append(min((stats(c, held) for c in cands if stats(c, held)[0] <= 0.1), key=lambda x: x[1]))
    for rule, plays in (("ours", ours), ("naive", naive), ("peeking", peeking)):
        assert got[rule]["mean_cost"] == pytest.approx(sum(c for _, c in plays) / 6, rel=1e-5)
        assert got[rule]["mean_risk"] == pytest.approx(sum(r for r, _ in plays) / 6, abs=1e-6)
        assert got[rule]["violation"] == sum(r > 0.1 for r, _ in plays) / 6


def test_wilson_interval_by_hand():
    lo, hi = wilson(0, 500)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (500 + 1.96**2))
    lo, hi = wilson(50, 500)
    assert lo < 0.1 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.1 * 0.9 / 500), rel=0.02)


def test_jeidnn_certify_prints_the_certificate_and_the_check(run_dir, capsys):
    assert main(["certify", str(run_dir), "--epsilon", "0.1", "--resplits", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "certified: " in out and "proof: Learn-Then-Test" in out
    assert "re-split check: 20 re-splits" in out and "ALL (as certified)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "1.5"], "error: --epsilon must lie in (0, 1), got 1.5"),
        (["--delta", "0"], "error: --delta must lie in (0, 1), got 0"),
        (["--risk", "error"], "error: unknown risk 'error'; choose one of consistency, accuracy_gap"),
        (["--method", "nope"], "error: unknown method 'nope'; this run can certify: "),
        (["--epsilon", "0.001"], "error: nothing meets accuracy_gap <= 0.001 on calib half B"),
    ],
)
def test_jeidnn_certify_refuses_bad_input(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "model"
    assert main(["certify", str(run_dir), *args, "--export", str(out), "--resplits", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_jeidnn_certify_refuses_a_run_without_predictions(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("predictions"))
    assert main(["certify", str(copy)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {copy} has no predictions/ folder")


def test_the_evaluation_reports_eval_guarantees(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = copy / "config.yaml"
    text = config.read_text().replace(
        "eval:", "eval:\n  guarantees: [{risk: accuracy_gap, epsilon: 0.1, delta: 0.1}]"
    )
    config.write_text(text)
    report = evaluate_run(copy)
    (entry,) = report["summary"]["guarantees"]
    cert = certify(Run.open(copy).methods, GuaranteeConfig("accuracy_gap", 0.1, 0.1))
    assert entry["certificate"]["method"] == cert.method
    assert entry["certificate"]["test_cost"] == pytest.approx(cert.test_outcome()["test_cost"])
    assert entry["resplit"]["resplits"] == 500 and set(entry["resplit"]["all"]) >= {"naive", "calm", "ours"}
    assert [c["epsilon"] for c in entry["curve"]] == [0.005, 0.01, 0.02, 0.05, 0.1]
    assert report["evaluation"]["guarantees"] == [
        {"risk": "accuracy_gap", "epsilon": 0.1, "delta": 0.1, "kind": "high_probability"}
    ]
    markdown = (copy / "report.md").read_text()
    assert "## Guarantees" in markdown and "### accuracy_gap ≤ 0.1 with probability ≥ 0.9" in markdown
    assert (copy / "plots" / "guarantees.png").stat().st_size > 0


def test_a_method_without_candidates_certifies_nothing(tmp_path):
    # with budgets below the cheapest global threshold, threshold_search offers no candidate at all
    run_dir = make_run(tmp_path, config={"budgets": [0.2]})
    methods = Run.open(run_dir).methods
    assert sequence(methods, "threshold_search") == []
    g = GuaranteeConfig("accuracy_gap", 0.1, 0.1)
    cert = certify(methods, g, across="bonferroni")
    assert cert.per_method["threshold_search"]["param"] is None
    check = ResplitCheck(methods, "accuracy_gap", ["threshold_search", "global_maxprob"], resplits=10).run(g)
    assert check["methods"]["threshold_search"]["ours"] == {
        "violation": 0.0,
        "violation_ci": list(wilson(0, 10)),
        "mean_cost": pytest.approx(COST[-1]),
        "certified": 0.0,
        "mean_risk": 0.0,
        "mean_risk_se": 0.0,
    }
