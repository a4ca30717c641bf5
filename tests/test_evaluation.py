"""evaluate_run / evaluate on a small synthetic run folder in the training pipeline's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from jeidnn.config.schema import EvalConfig
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.budgeted import Settings, budgeted_rows
from jeidnn.evaluate.evaluation import evaluate, evaluate_run
from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.evaluate.selection import build_methods
from jeidnn.io import json_safe

NUM_EXITS, NUM_CLASSES = 4, 3
SIZES = {"val": 200, "calib": 300, "test": 400}
LAMBDAS = [0.05, 0.5]
COST = [0.3, 0.55, 0.8, 1.02]
GATED_COST = [c + 0.001 * (i + 1) for i, c in enumerate(COST)]
LABELS: dict[str, torch.Tensor] = {}
POINT_KEYS = {
    "param",
    "accuracy",
    "cost",
    "gflops",
    "exit_fractions",
    "ece",
    "ece_temperature_scaled",
    "conformal",
}
BASELINES = [
    "threshold_maxprob",
    "threshold_entropy",
    "threshold_margin",
    "global_maxprob",
    "threshold_search",
    "product_maxprob",
    "patience",
    "patience_confidence",
    "static",
]
LEARNED = ["jeidnn_paper", "gate_trajectory_expected"]
ROW_KEYS = {
    "budget",
    "method",
    "kind",
    "label",
    "extension",
    "param",
    "accuracy",
    "cost",
    "gflops",
    "calib_accuracy",
    "calib_cost",
    "ece",
    "ece_temperature_scaled",
    "exit_fractions",
    "coverage",
    "set_size",
    "merged_groups",
    "resplit_miss",
    "val_accuracy",
    "val_cost",
    "reference_baseline",
    "delta_vs_reference",
    "best_baseline",
    "delta_vs_best_baseline",
}


def _logits(
    n: int, gen: torch.Generator, sharpness: float, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-exit logits whose accuracy grows with depth: (N, L, C) and labels (N,)."""
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    signal = torch.linspace(0.3, 2.5, NUM_EXITS)[None, :, None]  # (1, L, 1)
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()[:, None, :]  # (N, 1, C)
    # Noise shared across exits keeps predictions stable with depth, as in real networks (patience needs it).
    shared = torch.randn(n, 1, NUM_CLASSES, generator=gen)
    noise = shared + 0.5 * torch.randn(n, NUM_EXITS, NUM_CLASSES, generator=gen)
    return sharpness * (signal * onehot + noise), labels


def _learned_entry(run: Path, method: str, gen: torch.Generator, native: bool, bias: float) -> dict:
    """Two models per method; a larger λ opens the exit scores earlier (cheaper)."""
    models = []
    for k, lam in enumerate(LAMBDAS):
        tensors = {}
        for split, n in SIZES.items():
            # every file holds the same labels: the splits are the run's, whatever the model
            logits, labels = _logits(n, gen, sharpness=1.2, labels=LABELS[split])
            conf = logits.softmax(-1).amax(-1)[:, :-1]  # (N, L - 1): exit scores read the IM's confidence
            tensors[f"{split}_logits"], tensors[f"{split}_labels"] = logits, labels
            tensors[f"{split}_scores"] = torch.sigmoid(8 * (conf - 0.75 + bias + 0.2 * lam))
        rel = f"predictions/learned/{method}/{k}.safetensors"
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(run / rel))
        models.append({"lambda": lam, "file": rel, "val_cost": 0.5, "val_accuracy": 0.7})
    return {
        "label": "JEI-DNN, paper preset" if native else "gate trajectory (expected)",
        "extension": not native,
        "operating_point": "native" if native else "calib_threshold",
        "costs": GATED_COST,
        "settings": {"preset": method},
        "models": models,
    }


def make_run(root: Path, learned: bool = True, config: dict | None = None) -> Path:
    run = root / "runs" / "synthetic"
    (run / "predictions").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    report = {
        "backbone": {"name": "tiny-bert", "num_layers": NUM_EXITS, "gflops_full": 2.0},
        "dataset": {
            "name": "synthetic",
            "num_classes": NUM_CLASSES,
            "labels": ["a", "b", "c"],
            "splits": SIZES,
        },
        "exits": {
            "layers": [1, 2, 3, 4],
            "cost": COST,
            "cost_with_gates": GATED_COST,
            "gflops": [2.0 * c for c in COST],
            "test_accuracy": [0.5, 0.6, 0.7, 0.8],
        },
        "timings_s": {"warmup": 1.0},
    }
    tensors = {}
    for split, n in SIZES.items():
        tensors[f"{split}_logits"], tensors[f"{split}_labels"] = _logits(n, gen, sharpness=1.5)
        LABELS[split] = tensors[f"{split}_labels"]
    save_file(tensors, str(run / "predictions" / "warmup.safetensors"))
    if learned:
        report["learned"] = {
            "jeidnn_paper": _learned_entry(run, "jeidnn_paper", gen, native=True, bias=0.0),
            "gate_trajectory_expected": _learned_entry(run, "gate_trajectory_expected", gen, False, 0.05),
        }
    (run / "report.json").write_text(json.dumps(report))
    eval_cfg = {"threshold_ps": [0.5, 1.0, 2.0], "bootstrap": 200, "resplits": 5, **(config or {})}
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "synthetic", "seed": 3, "eval": eval_cfg}))
    return run


def _check_point(point: dict, alphas: list[str]) -> None:
    assert set(point) == POINT_KEYS
    assert 0 <= point["accuracy"] <= 1 and 0.25 <= point["cost"] <= 1.1
    assert point["gflops"] == pytest.approx(2.0 * point["cost"])
    assert len(point["exit_fractions"]) == NUM_EXITS and sum(point["exit_fractions"]) == pytest.approx(1.0)
    assert 0 <= point["ece"] <= 1 and 0 <= point["ece_temperature_scaled"] <= 1
    assert set(point["conformal"]) == set(alphas)
    for a in alphas:
        c = point["conformal"][a]
        assert {"coverage", "mean_set_size", "merged_groups", "quantiles"} <= set(c)
        assert 0 <= c["mean_set_size"] <= NUM_CLASSES and 0 <= c["coverage"] <= 1
        assert all(len(g) > 1 and all(0 <= e < NUM_EXITS for e in g) for g in c["merged_groups"])


def test_evaluate_run_full_schema_and_files(tmp_path):
    run = make_run(tmp_path)
    report = evaluate_run(run)
    alphas = ["0.01", "0.05", "0.1"]

    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk == report
    assert not list(run.glob("*.tmp"))
    # Keys written by training are kept untouched.
    assert on_disk["exits"]["cost"] == COST and on_disk["timings_s"] == {"warmup": 1.0}
    assert on_disk["learned"]["jeidnn_paper"]["models"][0]["lambda"] == LAMBDAS[0]

    methods = report["methods"]
    assert list(methods) == [*LEARNED, *BASELINES, "oracle", "jeidnn_ims_threshold_maxprob"]
    for name, method in methods.items():
        assert method["kind"] in {"learned", "threshold", "patience", "static", "oracle"}
        assert method["points"], name
        for point in method["points"]:
            _check_point(point, alphas)
    assert methods["oracle"]["upper_bound"] is True
    assert methods["gate_trajectory_expected"]["extension"] is True
    assert methods["gate_trajectory_expected"]["settings"] == {"preset": "gate_trajectory_expected"}
    # Envelope points of learned methods: each model at tau 0.5 only.
    for name in LEARNED:
        assert [p["param"] for p in methods[name]["points"]] == [
            {"model": k, "lambda": lam, "tau": 0.5} for k, lam in enumerate(LAMBDAS)
        ]
    assert [p["param"] for p in methods["threshold_maxprob"]["points"]] == [0.5, 1.0, 2.0]
    assert [p["param"] for p in methods["static"]["points"]] == [1, 2, 3, 4]
    assert [p["param"] for p in methods["patience"]["points"]] == [0, 1, 2, 3]
    # The global grid spans everyone-at-exit-0 to nobody-exits-early (inf is null in JSON).
    globals_ = [p["param"] for p in methods["global_maxprob"]["points"]]
    assert globals_[0] == 0.0 and globals_[-1] is None
    # thresholds on the IMs of every jeidnn_paper model
    assert [p["param"] for p in methods["jeidnn_ims_threshold_maxprob"]["points"]] == [
        {"model": k, "lambda": lam, "p": p} for k, lam in enumerate(LAMBDAS) for p in (0.5, 1.0, 2.0)
    ]

    # Static depth at the last exit is the full model: cost of that exit, accuracy of the final head.
    last = methods["static"]["points"][-1]
    assert last["cost"] == pytest.approx(1.02) and last["exit_fractions"][-1] == 1.0
    # Learned costs use the method's own costs: a sample leaving at exit 0 costs 0.301, not 0.3.
    jp = methods["jeidnn_paper"]["points"][0]
    assert jp["cost"] == pytest.approx(
        sum(f * c for f, c in zip(jp["exit_fractions"], GATED_COST, strict=True))
    )
    assert methods["oracle"]["points"][0]["accuracy"] >= last["accuracy"]

    summary = report["summary"]
    assert "optimistic" in summary["envelope_note"]
    lo, hi = summary["cost_range"]
    assert lo <= hi
    assert set(summary["auc"]) == set(methods) - {"oracle"}
    assert len(summary["matched_cost"]) == 2 * len(LAMBDAS)
    row = summary["matched_cost"][0]
    assert row["method"] == "jeidnn_paper" and "set_size_0.05" in row
    assert set(row["baselines"]) == set(BASELINES) | {"jeidnn_ims_threshold_maxprob"}
    for b in row["baselines"].values():
        assert {"accuracy", "ece", "ece_temperature_scaled", "ece_best", "set_size_0.05"} <= set(b)
    ev = report["evaluation"]
    assert ev["alphas"] == [0.01, 0.05, 0.1] and ev["ece_bins"] == 15 and ev["seed"] == 3
    assert set(ev["temperatures"]["learned"]) == set(LEARNED)

    md = (run / "report.md").read_text()
    assert md.index("## Headline: best learned method vs. reference baseline") < md.index(
        "## Budgeted comparison (test-blind)"
    )
    assert md.index("## Budgeted comparison (test-blind)") < md.index("## Envelope on test (optimistic)")
    assert "the most accurate on **val**" in md and "### Best learned method against each baseline" in md
    assert "gate trajectory (expected) (extension)" in md
    for heading in ("### Details of the budgeted choices", "### Exits", "### Matched cost", "### AUC"):
        assert heading in md
    for png in (
        "budgeted_accuracy",
        "accuracy_vs_cost",
        "ece_vs_cost",
        "conformal_vs_cost",
        "reliability",
        "exit_fractions",
    ):
        assert (run / "plots" / f"{png}.png").stat().st_size > 10_000
        assert f"](plots/{png}.png)" in md


def test_budgeted_summary_format_and_selection_rules(tmp_path):
    run = make_run(tmp_path)
    report = evaluate_run(run, write=False)
    b = report["summary"]["budgeted"]
    assert b["budgets"] == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert b["calib_split"] == {"a": 150, "b": 150, "seed": 3} and b["bootstrap"] == 200
    names = [*LEARNED, *BASELINES, "jeidnn_ims_threshold_maxprob"]  # no oracle: it reads the labels
    assert [(r["budget"], r["method"]) for r in b["rows"]] == [(x, n) for x in b["budgets"] for n in names]
    for row in b["rows"]:
        assert ROW_KEYS <= set(row)
        if row["accuracy"] is None:
            # Nothing is cheaper than exit 0 (cost 0.3): budget 0.2 cannot be met by anyone.
            assert "calib-A cost" in row["reason"] and row["param"] is None
            continue
        assert "reason" not in row
        assert row["calib_cost"] <= row["budget"] + 1e-9  # the budget is never exceeded on calib A
        assert row["gflops"] == pytest.approx(2.0 * row["cost"])
        assert (
            set(row["coverage"])
            == set(row["set_size"])
            == set(row["resplit_miss"])
            == {"0.01", "0.05", "0.1"}
        )
        for stats in row["resplit_miss"].values():
            assert stats["min"] <= stats["mean"] <= stats["max"]
        d = row["delta_vs_best_baseline"]
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
        best = next(
            r for r in b["rows"] if r["budget"] == row["budget"] and r["method"] == row["best_baseline"]
        )
        assert best["kind"] != "learned"
        assert d["mean"] == pytest.approx(row["accuracy"] - best["accuracy"])
        if row["method"] == row["best_baseline"]:
            assert d == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        if row["kind"] != "learned":  # the best baseline is the most accurate on test
            assert row["accuracy"] <= best["accuracy"]
    assert all(r["accuracy"] is None for r in b["rows"] if r["budget"] == 0.2)
    # The headline: at each budget with a row, the val-best learned method against the val-best baseline.
    assert [line["budget"] for line in b["headline"]] == b["budgets"][1:]
    for line in b["headline"]:
        here = {
            r["method"]: r for r in b["rows"] if r["budget"] == line["budget"] and r["accuracy"] is not None
        }
        assert line["picked_on"] == "val"
        if not any(r["kind"] == "learned" for r in here.values()):
            assert line["best_learned"] is None and line["delta"] is None
            continue
        for key, learned in (("reference_baseline", False), ("best_learned", True)):
            kind = [r for r in here.values() if (r["kind"] == "learned") == learned]
            assert here[line[key]]["val_accuracy"] == max(r["val_accuracy"] for r in kind)
        best, ref = here[line["best_learned"]], here[line["reference_baseline"]]
        assert line["delta"]["mean"] == pytest.approx(best["accuracy"] - ref["accuracy"])
        assert best["delta_vs_reference"] == line["delta"]
        test_best = here[line["test_best_baseline"]]
        assert test_best["accuracy"] == max(r["accuracy"] for r in here.values() if r["kind"] != "learned")
        assert line["delta_vs_test_best"]["mean"] == pytest.approx(best["accuracy"] - test_best["accuracy"])
        assert set(line["vs_each_baseline"]) == {n for n, r in here.items() if r["kind"] != "learned"}
        for name, d in line["vs_each_baseline"].items():
            assert d["ci_low"] <= d["mean"] == pytest.approx(best["accuracy"] - here[name]["accuracy"])
    # The native method plays tau 0.5 only; the calib_threshold one may pick any tau of its grid.
    assert {r["param"]["tau"] for r in b["rows"] if r["method"] == "jeidnn_paper" and r["param"]} == {0.5}
    # threshold_search starts from the best global threshold: never worse on calib A.
    for budget in b["budgets"]:
        by = {r["method"]: r for r in b["rows"] if r["budget"] == budget}
        if by["global_maxprob"]["accuracy"] is not None:
            assert by["threshold_search"]["calib_accuracy"] >= by["global_maxprob"]["calib_accuracy"]
        # patience_confidence holds patience (t = 0) and global_maxprob (k = 0): never worse on calib A.
        for parent in ("patience", "global_maxprob"):
            if by[parent]["accuracy"] is not None:
                assert by["patience_confidence"]["calib_accuracy"] >= by[parent]["calib_accuracy"]


def test_the_export_choice_matches_the_evaluation_rows(tmp_path):
    """`jeidnn export`'s choice (operating_point.choose) is the evaluation's row at every budget."""
    from jeidnn.export.operating_point import Run, choose

    run = make_run(tmp_path)
    report_in = json.loads((run / "report.json").read_text())
    cfg = EvalConfig(threshold_ps=[0.5, 1.0, 2.0], bootstrap=100)
    predictions = RunPredictions.read(report_in, run)
    out = evaluate(report_in, run, cfg, 3, predictions=predictions, write_markdown=False)
    assert "methods" not in report_in  # the input is not modified
    assert not (run / "report.md").exists()
    rows = {(r["budget"], r["method"]): r for r in out.report["summary"]["budgeted"]["rows"]}
    # The evaluation returns what each row played, in memory: one choice per row with a configuration.
    assert set(out.chosen) == {key for key, row in rows.items() if row["accuracy"] is not None}
    for key, choice in out.chosen.items():
        row = rows[key]
        assert (choice.method, choice.budget, json_safe(choice.param)) == (key[1], key[0], row["param"])
        assert (choice.calib_accuracy, choice.calib_cost) == (row["calib_accuracy"], row["calib_cost"])
        outcome = choice.test_outcome()
        assert (outcome["test_accuracy"], outcome["test_cost"]) == (row["accuracy"], row["cost"])
        assert outcome["test_exit_fractions"] == row["exit_fractions"]
    search = out.chosen[(0.5, "threshold_search")]
    assert search.rule_gates().thresholds.tolist() == pytest.approx(search.param["thresholds"])
    assert out.chosen[(0.5, "patience")].uses == {"patience": out.chosen[(0.5, "patience")].param}
    opened = Run.open(run)
    for budget in (0.5, 0.7, 0.9):
        for method in ("gate_trajectory_expected", "threshold_maxprob", "patience"):
            row = rows[(budget, method)]
            point = choose(opened, method, budget)
            assert point.candidate.calib_cost == pytest.approx(row["calib_cost"])
            assert row["calib_cost"] <= budget
            assert point.candidate.calib_accuracy == pytest.approx(row["calib_accuracy"])
            assert point.test_metrics()["test_exit_fractions"] == pytest.approx(row["exit_fractions"])
        chosen = choose(opened, "gate_trajectory_expected", budget).param
        learned_row = rows[(budget, "gate_trajectory_expected")]["param"]
        assert (chosen["model"], chosen["tau"]) == (learned_row["model"], learned_row["tau"])
    with pytest.raises(JeidnnError, match="0.2"):
        choose(opened, "jeidnn_paper", 0.2)
    with pytest.raises(JeidnnError, match="nope"):
        choose(opened, "nope", 0.5)


def test_a_run_that_failed_in_evaluation_can_be_evaluated(tmp_path, caplog):
    """Training finished, stages 3-4 failed: report.partial.json is what `jeidnn evaluate` reads."""
    run = make_run(tmp_path)
    finished = evaluate_run(run, write=False)
    (run / "report.json").rename(run / "report.partial.json")
    with caplog.at_level("WARNING", logger="jeidnn"):
        again = evaluate_run(run)
    assert "did not finish" in caplog.text and "--resume true" in caplog.text
    assert again["summary"]["budgeted"] == finished["summary"]["budgeted"]
    assert (
        json.loads((run / "report.json").read_text())["summary"]["budgeted"]
        == finished["summary"]["budgeted"]
    )
    (run / "report.json").unlink()
    (run / "report.partial.json").unlink()
    with pytest.raises(JeidnnError, match="is not a trained run"):
        evaluate_run(run)


def test_evaluate_run_without_learned_and_overrides(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, learned=False, config={"budgets": [0.5, 0.8], "resplits": 2})
    monkeypatch.setenv("HOME", str(tmp_path))
    home_run = "~/" + str(run.relative_to(tmp_path))
    report = evaluate_run(home_run, alphas=[0.1], ece_bins=10, write=False, progress=True)
    # The progress bar counts every configuration evaluated on test (the envelope points).
    configs = sum(len(m["points"]) for m in report["methods"].values())
    err = capsys.readouterr().err
    assert f"evaluate on test:   0%|          | 0/{configs} " in err and configs > 100
    evaluate_run(run, alphas=[0.1], write=False)
    assert capsys.readouterr().err == ""  # no bar by default
    assert not set(LEARNED) & set(report["methods"])
    assert "jeidnn_ims_threshold_maxprob" not in report["methods"]
    assert report["summary"]["matched_cost"] == []
    assert report["summary"]["budgeted"]["budgets"] == [0.5, 0.8]
    assert set(report["methods"]["static"]["points"][0]["conformal"]) == {"0.1"}
    assert report["evaluation"]["ece_bins"] == 10
    assert not (run / "report.md").exists()
    assert "methods" not in json.loads((run / "report.json").read_text())  # write=False leaves files alone


def test_evaluate_run_errors(tmp_path):
    with pytest.raises(JeidnnError, match="does not exist"):
        evaluate_run(tmp_path / "nope")
    with pytest.raises(JeidnnError, match="report.json"):
        evaluate_run(tmp_path)
    run = make_run(tmp_path)
    (run / "predictions" / "learned" / "jeidnn_paper" / "1.safetensors").unlink()
    with pytest.raises(JeidnnError, match="jeidnn_paper/1.safetensors"):
        evaluate_run(run, write=False)
    (run / "predictions" / "warmup.safetensors").unlink()
    with pytest.raises(JeidnnError, match="warmup.safetensors"):
        evaluate_run(run, write=False)
    with pytest.raises(JeidnnError, match="eval.ece_bins"):
        evaluate_run(run, ece_bins=0)


def test_threshold_search_under_its_cheapest_cost_names_that_cost(tmp_path):
    """docs/evaluation.md: a row whose method cannot meet the budget names the cheapest candidate's cost.
    threshold_search offers nothing below the cheapest global threshold it starts from (all at exit 0)."""
    run = make_run(tmp_path, learned=False)
    report = json.loads((run / "report.json").read_text())
    predictions = RunPredictions.read(report, run)
    methods = build_methods(report, predictions, EvalConfig(threshold_ps=[1.0]), 3, temperatures=False)
    search = methods["threshold_search"]
    assert search.candidates_at(0.2) == [] and search.floor_cost == pytest.approx(COST[0])
    settings = Settings([0.1], 15, 30, [0.2], 100, 2, 3)
    summary, chosen = budgeted_rows([search], methods.split, settings)
    (row,) = summary["rows"]
    assert row["accuracy"] is None and not chosen
    assert row["reason"] == "no calib-A cost <= 0.2 (cheapest configuration costs 0.300)"
