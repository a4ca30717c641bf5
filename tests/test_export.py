"""`jeidnn export` on a tiny run: each method's operating point as the evaluation chose it, as a model that
loads, whose layer-skipping path equals its full path and whose exits on the test texts are the exits of
the evaluation's row (accuracy, exit fractions, conformal coverage included)."""

import json
import random
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_early_exit import split_value
from tiny_models import tiny_run_overrides

from jeidnn import EarlyExitModel
from jeidnn.cli.main import export_main, train_main
from jeidnn.config.parser import load_config
from jeidnn.data.sources import load_raw
from jeidnn.data.splits import make_splits
from jeidnn.evaluate.budgeted import make_candidate
from jeidnn.evaluate.selection import Choice
from jeidnn.export.exporter import build_model, export_run, load_backbone
from jeidnn.export.operating_point import OperatingPoint, Run
from jeidnn.hf.batches import make_batches
from jeidnn.io import json_safe
from jeidnn.model.policies import patience_confidence_exits

ROOT = Path(__file__).resolve().parent.parent
LEARNS = ["--finetune.epochs", "8", "--finetune.lr", "0.003", "--finetune.batch_size", "16"]
FAST = ["--warmup.max_epochs", "20", "--eval.bootstrap", "100", "--eval.resplits", "2", "--no-progress"]


def write_interaction_csv(path: Path, n: int, seed: int = 0) -> Path:
    """A 3-class corpus whose first exit is weaker than its last, so the chosen configurations spread over
    the exits: half the texts carry a class cue word, the other half three words whose class is the sum
    of their indices mod 3, which a linear head on the first layer cannot read."""
    rng = random.Random(seed)
    names, cues = ["negative", "neutral", "positive"], [["bad", "awful"], ["okay", "fine"], ["good", "great"]]
    groups = [["red", "green", "blue"], ["car", "phone", "road"], ["cat", "dog", "fish"]]
    fillers = "the a day it was this my very really today".split()
    lines = ["text,label"]
    for _ in range(n):
        words = rng.choices(fillers, k=rng.randint(3, 8))
        if rng.random() < 0.5:
            label = rng.randrange(3)
            words.insert(rng.randint(0, len(words)), rng.choice(cues[label]))
        else:
            picks = [rng.randrange(3) for _ in groups]
            for group, i in zip(groups, picks, strict=True):
                words.insert(rng.randint(0, len(words)), group[i])
            label = sum(picks) % 3
        lines.append(f"{' '.join(words)},{names[label]}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    corpus = write_interaction_csv(tmp / "d.csv", n=600)
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), *tiny_run_overrides(corpus, tmp / "runs")]
    assert train_main([*args, *LEARNS, *FAST]) == 0
    return tmp / "runs" / "t"


@pytest.fixture(scope="module")
def report(run):
    return json.loads((run / "report.json").read_text())


def split_of(run, name):
    cfg = load_config(run / "config.yaml")
    raw = load_raw(cfg.data, "text")
    indices = make_splits(len(raw.labels), cfg.data, cfg.seed).indices[name]
    return [raw.inputs[i] for i in indices], torch.tensor([raw.labels[i] for i in indices])


@pytest.fixture(scope="module")
def test_split(run):
    return split_of(run, "test")


def spread_row(report, method):
    """The method's budgeted row whose test exits use the most exits, then the most middle exits."""
    rows = [r for r in report["summary"]["budgeted"]["rows"] if r["method"] == method and r["accuracy"]]
    return max(rows, key=lambda r: (sum(f > 0 for f in r["exit_fractions"]), sum(r["exit_fractions"][1:-1])))


def both_paths(model, texts):
    """Exits and logits of the full and the layer-skipping path, in input order."""
    n = len(texts)
    exits, logits = torch.zeros(2, n, dtype=torch.long), torch.zeros(2, n, model.num_classes)
    with torch.no_grad():
        for positions, batch in make_batches(model, texts, 32):
            for i, out in enumerate((model.forward_full(batch), model.forward_dynamic(batch))):
                exits[i, positions], logits[i, positions] = out.exit_index, out.logits
    return exits, logits


def learned_row(report):
    """A learned method's row (any budget) whose test exits spread the most."""
    rows = [spread_row(report, m) for m in report["learned"]]
    return max(rows, key=lambda r: sum(f > 0 for f in r["exit_fractions"]))


# jeidnn_paper_tau: the paper's gates at an exit threshold chosen on calib; "learned": whichever learned
# method's row spreads over the most exits.
METHODS = [
    "threshold_maxprob",
    "threshold_search",
    "global_maxprob",
    "product_maxprob",
    "patience",
    "patience_confidence",
    "static",
    "jeidnn_paper_tau",
]


@pytest.mark.parametrize("method", [*METHODS, "learned"])
def test_exported_model_plays_the_evaluation_row(method, run, report, test_split, tmp_path):
    row = learned_row(report) if method == "learned" else spread_row(report, method)
    method, n = row["method"], len(test_split[1])
    summary = export_run(run, method, budget=row["budget"], out=tmp_path / "m")
    assert summary["param"] == row["param"]
    for key, reported in [
        ("calib_cost", "calib_cost"),
        ("calib_accuracy", "calib_accuracy"),
        ("test_accuracy", "accuracy"),
    ]:
        assert summary[key] == pytest.approx(row[reported], abs=1e-12)
    assert summary["test_exit_fractions"] == pytest.approx(row["exit_fractions"], abs=1e-12)

    model = EarlyExitModel.from_pretrained(tmp_path / "m")
    exits, logits = both_paths(model, test_split[0])
    assert torch.equal(exits[0], exits[1])  # the layer-skipping path leaves where the full path does
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    # The evaluation's own candidate with the row's param, built from the cached test predictions.
    cand = next(
        c
        for c in Run.open(run).methods[method].candidates_at(row["budget"])
        if json_safe(c.param) == row["param"]
    )
    assert (exits[0] != cand.test_exits.long()).sum() <= 1  # the same exits, up to one float tie
    fractions = torch.bincount(exits[0], minlength=model.num_exits).double() / n
    assert fractions.tolist() == pytest.approx(row["exit_fractions"], abs=1.5 / n)
    accuracy = (logits[0].argmax(-1) == test_split[1]).double().mean()
    assert float(accuracy) == pytest.approx(row["accuracy"], abs=1.5 / n)
    predictions = model.predict(test_split[0], alpha=0.1)
    names = model.labels
    covered = [names[y] in p.prediction_set for p, y in zip(predictions, test_split[1].tolist(), strict=True)]
    assert sum(covered) / n == pytest.approx(row["coverage"]["0.1"], abs=1.5 / n)


def spread_candidate(opened: Run, method: str):
    """A candidate of a history-aware rule whose test exits spread over at least two exits: the spread-most of
    the method's own (product_maxprob), or one made by its policy with a threshold between the test
    max-probabilities at exit 1 (this run's exits all predict alike, so patience alone never spreads)."""
    if method == "product_maxprob":
        return max(opened.methods[method].candidates, key=lambda c: len(set(c.test_exits.tolist())))
    x = opened.methods.inputs
    param = {"patience": 1, "threshold": split_value(x.maxprob["test"][:, 1])[0]}

    def exits(split):
        return patience_confidence_exits(x.preds[split], x.maxprob[split], 1, param["threshold"])

    return make_candidate(param, x.warm, x.costs, exits("calib"), exits("test"), x.split, dict(param))


@pytest.mark.parametrize("method", ["product_maxprob", "patience_confidence"])
def test_history_aware_gates_leave_where_their_candidate_leaves(method, run, test_split):
    """A configuration of a history-aware rule that sends test samples to several exits becomes a model whose
    both paths leave where the evaluation's policy does."""
    opened = Run.open(run)
    cand = spread_candidate(opened, method)
    assert len(set(cand.test_exits.tolist())) >= 2
    point = OperatingPoint(Choice(opened.methods.specs[method], None, cand, opened.split), "test")
    model, summary = build_model(opened, point, *load_backbone(opened))
    assert summary["param"] == json_safe(cand.param)
    exits, _ = both_paths(model, test_split[0])
    assert torch.equal(exits[0], exits[1])
    assert (exits[0] != cand.test_exits.long()).sum() <= 1  # the same exits, up to one float tie


def test_default_export_is_what_train_py_exported(run, report, tmp_path):
    summary = export_run(run, out=tmp_path / "m", alpha=0.2)
    exported = report["export"]
    keys = ("method", "param", "lambda", "exit_threshold", "selection", "considered", "chosen_by")
    assert {k: summary.get(k) for k in keys} == {k: exported.get(k) for k in keys}
    assert summary["budget"] == load_config(run / "config.yaml").export.cost_budget
    mine = json.loads((tmp_path / "m" / "config.json").read_text())
    trained = json.loads((run / "model" / "config.json").read_text())
    assert mine["gates"] == trained["gates"]
    assert set(mine["conformal_quantiles"]) == {"0.01", "0.05", "0.1", "0.2"}
    for alpha, quantiles in trained["conformal_quantiles"].items():
        assert mine["conformal_quantiles"][alpha] == quantiles
    assert mine["default_alpha"] == 0.2


def test_lambda_fixes_the_model(run, report, tmp_path):
    native = report["learned"]["jeidnn_paper"]
    lam = native["models"][1]["lambda"]
    summary = export_run(run, "jeidnn_paper", lam=lam, out=tmp_path / "native")
    assert (summary["model_index"], summary["lambda"], summary["exit_threshold"]) == (1, lam, 0.5)
    assert summary["budget"] is None
    tuned = next(n for n, e in report["learned"].items() if e["operating_point"] == "calib_threshold")
    summary = export_run(run, tuned, lam=lam * (1 + 1e-12), out=tmp_path / "tuned")
    assert (summary["model_index"], summary["lambda"]) == (1, lam)
    assert summary["calib_cost"] <= load_config(run / "config.yaml").export.cost_budget
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert saved["gates"]["exit_threshold"] == summary["exit_threshold"] == summary["param"]["tau"]


def test_default_output_folder(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    summary = export_run(copy, "static", budget=0.7)
    assert Path(summary["path"]) == copy / "export" / "static-0.7"
    assert (copy / "export" / "static-0.7" / "config.json").is_file()
    assert [p.name for p in (copy / "export").iterdir()] == ["static-0.7"]  # no temporary folder left


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "fly"], "unknown method 'fly'; this run can export: jeidnn_paper, jeidnn_paper_tau"),
        (
            ["--method", "oracle"],
            "method 'oracle' cannot be exported: it picks each sample's exit by reading",
        ),
        (["--method", "static", "--budget", "0.05"], "its lowest reachable calib cost is 0.33"),
        (["--method", "threshold_search", "--budget", "0.05"], "its lowest reachable calib cost is 0.33"),
        (["--budget", "0.5", "--lam", "0.01"], "pass --budget or --lam, not both"),
        (["--lam", "0.01"], "--lam picks a model of one learned method: name it with --method"),
        (["--method", "patience", "--lam", "0.01"], "'patience' is not one: use --budget"),
        (
            ["--method", "jeidnn_paper", "--lam", "0.02"],
            "no model trained with λ = 0.02; its λ values are 0.01, 0.5",
        ),
        (["--method", "static", "--alpha", "1.5"], "--alpha must lie strictly between 0 and 1, got 1.5"),
        (["--method", "jeidnn_paper", "--lam", "nan"], "--lam must be a finite number, got nan"),
        (["--method", "jeidnn_paper", "--lam", "inf"], "--lam must be a finite number, got inf"),
        (
            ["--budget", "0.05"],
            "no method meets cost budget 0.05 on calib half A (the cheapest configuration",
        ),
        (["--selection", "budget", "--method", "static"], "--method static names the one method to export"),
        (["--selection", "method"], "--selection method needs --method NAME"),
        (["--selection", "guarantee", "--budget", "0.5"], "--budget does not apply to --selection guarantee"),
    ],
)
def test_bad_requests_get_one_line_and_write_nothing(args, needle, run, tmp_path, capsys):
    out = tmp_path / "out" / "m"
    assert export_main([str(run), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_run_folders(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope")]) == 2
    assert "run folder " + str(tmp_path / "nope") + " does not exist" in capsys.readouterr().err
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "config.yaml").write_text("name: failed\n")
    assert export_main([str(tmp_path / "failed")]) == 2
    assert "is not a finished run (no report.json)" in capsys.readouterr().err


def test_existing_output_folder(run, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main([str(run), "--method", "patience", "--out", str(out)]) == 2
    assert f"{out} already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert export_main([str(run), "--method", "patience", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) != ["keep.txt"] and not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["gates"]["kind"] == "patience"


def test_a_failed_write_leaves_no_folder(run, tmp_path, monkeypatch):
    def broken(self, folder):
        (Path(folder) / "half.bin").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(EarlyExitModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, "static", budget=0.7, out=tmp_path / "a" / "b" / "m")
    assert not (tmp_path / "a").exists()


def test_backbone_folder_is_preferred_and_required(run, test_split, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    reference = EarlyExitModel.from_pretrained(run / "model")
    # A run folder with the fine-tuned backbone saved on its own, and no model/.
    reference.backbone.model.save_pretrained(copy / "backbone")
    reference.preprocessor.save_pretrained(copy / "backbone")
    shutil.rmtree(copy / "model")
    export_run(copy, out=tmp_path / "m")
    model = EarlyExitModel.from_pretrained(tmp_path / "m")
    texts = test_split[0][:16]
    assert torch.equal(both_paths(model, texts)[1][0], both_paths(reference, texts)[1][0])
    shutil.rmtree(copy / "backbone")
    assert export_main([str(copy), "--out", str(tmp_path / "n")]) == 2
    assert "has neither backbone/ nor model/" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_train_py_exports_a_baseline_named_in_the_config_without_stage2(tmp_path):
    corpus = write_interaction_csv(tmp_path / "d.csv", n=300)
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), *tiny_run_overrides(corpus, tmp_path / "runs")]
    extra = ["--jeidnn.enabled", "false", "--export.selection", "method", "--export.method", "patience"]
    extra += ["--export.cost_budget", "0.9"]
    assert train_main([*args, *FAST, *extra]) == 0
    run = tmp_path / "runs" / "t"
    report = json.loads((run / "report.json").read_text())
    assert "learned" not in report and report["export"]["method"] == "patience"
    model = EarlyExitModel.from_pretrained(run / "model")
    assert type(model.gates).__name__ == "PatienceGates" and model.gates.patience == report["export"]["param"]


# --------------------------------------------------------------------------- export.selection, model card


def test_train_py_exports_the_val_best_method_at_its_budgeted_row(run, report):
    exported, budget = report["export"], load_config(run / "config.yaml").export.cost_budget
    assert exported["selection"] == "budget" and exported["budget"] == budget
    rows = [r for r in exported["considered"] if "skipped" not in r]
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_cost"], i))
    assert rows[best]["method"] == exported["method"]
    assert [r["method"] for r in exported["considered"]] == [m for m in report["methods"] if m != "oracle"]
    # The exported test numbers are the budgeted table's row for that method at export.cost_budget.
    (row,) = [
        r
        for r in report["summary"]["budgeted"]["rows"]
        if r["method"] == exported["method"] and r["budget"] == budget
    ]
    assert (exported["param"], exported["calib_accuracy"], exported["calib_cost"]) == (
        row["param"],
        row["calib_accuracy"],
        row["calib_cost"],
    )
    assert (exported["test_accuracy"], exported["test_cost"]) == (row["accuracy"], row["cost"])
    assert exported["test_exit_fractions"] == row["exit_fractions"]
    # Its val accuracy, measured again by the saved model on the val texts.
    texts, labels = split_of(run, "val")
    predictions = EarlyExitModel.from_pretrained(run / "model").predict(texts, sets=False)
    names = report["dataset"]["labels"]
    right = [p.label == names[y] for p, y in zip(predictions, labels.tolist(), strict=True)]
    assert sum(right) / len(right) == pytest.approx(exported["val_accuracy"], abs=1.5 / len(right))


def read_card(folder: Path) -> tuple[dict, dict[str, list[str]]]:
    """A model card's YAML metadata, and each table row's cells keyed by its first cell."""
    text = (folder / "README.md").read_text()
    front, body = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S).groups()
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return yaml.safe_load(front), rows


def test_model_card_numbers_are_the_report_numbers(run, report):
    exported = report["export"]
    meta, rows = read_card(run / "model")
    assert meta["library_name"] == "jeidnn" and meta["pipeline_tag"] == "text-classification"
    assert {"early-exit", "jeidnn"} <= set(meta["tags"]) and "base_model" not in meta  # a random backbone
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": exported["test_accuracy"], "cost": exported["test_cost"]}

    def f(x):
        return f"{x:.4f}"

    assert rows["calib half A"] == [f(exported["calib_accuracy"]), f(exported["calib_cost"])]
    assert rows["val"] == [f(exported["val_accuracy"]), f(exported["val_cost"])]
    assert rows["test"] == [f(exported["test_accuracy"]), f(exported["test_cost"])]
    assert rows["chosen by"] == [exported["chosen_by"]]
    assert rows["method"][0].startswith(f"{exported['label']} (`{exported['method']}`")
    layers, costs = report["exits"]["layers"], report["exits"]["cost"]
    if exported["kind"] == "learned":
        costs = report["learned"][exported["method"]]["costs"]
    for i, fraction in enumerate(exported["test_exit_fractions"]):
        assert rows[str(i + 1)][:3] == [str(layers[i]), f(costs[i]), f(fraction)]
    for r in exported["considered"]:
        cells = rows[next(k for k in rows if k.startswith(f"`{r['method']}`"))]
        want = [f"skipped: {r['skipped']}", "", "", ""] if "skipped" in r else [
            f(r[k]) for k in ("val_accuracy", "val_cost", "calib_accuracy", "calib_cost")
        ]  # fmt: skip
        assert cells == want
    text = (run / "model" / "README.md").read_text()
    assert "None stated: the `budget` selection" in text and "EarlyExitModel.from_pretrained" in text


def test_an_old_run_without_val_predictions(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("export", "model"))
    for path in (old / "predictions").rglob("*.safetensors"):
        save_file({k: v for k, v in load_file(path).items() if not k.startswith("val_")}, path)
    assert export_main([str(old), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {old} has no val predictions (written by an older jeidnn)")
        and err.count("\n") == 1
    )
    assert "re-run training, or export one method with --method NAME" in err
    assert not (tmp_path / "m").exists()
    assert export_main([str(old), "--method", "static", "--out", str(tmp_path / "m")]) == 0
    assert read_card(tmp_path / "m")[1]["val"] == ["n/a", "n/a"]


class StandInCertificate:
    """What :func:`jeidnn.evaluate.certify.certify` returns, reduced to what export reads."""

    def __init__(self, choice, guarantee):
        self.choice, self.guarantee, self.method = choice, guarantee, choice.method
        self.proof = "stand-in: fixed-sequence testing, exact binomial p-values"
        self.certified_risk, self.test_risk = 0.0125, 0.0075

    def conformal(self, alphas, min_samples):
        n = len(self.choice.candidate.costs)
        return {str(a): [0.25] * n for a in alphas}, [[e] for e in range(n)]

    def to_dict(self):
        g = self.guarantee
        return {
            "guarantee": {"risk": g.risk, "epsilon": g.epsilon, "delta": g.delta, "kind": g.kind},
            "method": self.method,
            "proof": self.proof,
            "certified_risk": self.certified_risk,
            "test_risk": self.test_risk,
        }


def test_guarantee_selection_exports_the_certified_point(run, tmp_path, monkeypatch, capsys):
    seen = {}

    def certify(methods, guarantee, names=None):
        seen["names"] = names
        choice = methods.choose("global_maxprob", 0.8)
        return StandInCertificate(Choice(choice.spec, None, choice.candidate, choice.split), guarantee)

    module = types.ModuleType("jeidnn.evaluate.certify")
    module.certify = certify
    monkeypatch.setitem(sys.modules, "jeidnn.evaluate.certify", module)
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    summary = export_run(copy, selection="guarantee")

    assert Path(summary["path"]) == copy / "export" / "global_maxprob-accuracy_gap-eps0.01-delta0.1"
    assert seen["names"][:2] == ["jeidnn_paper", "jeidnn_paper_tau"] and "oracle" not in seen["names"]
    assert (summary["selection"], summary["method"], summary["budget"]) == (
        "guarantee",
        "global_maxprob",
        None,
    )
    assert summary["chosen_by"] == "stand-in: fixed-sequence testing, exact binomial p-values"
    assert summary["guarantee"]["certified_risk"] == 0.0125
    saved = json.loads((Path(summary["path"]) / "config.json").read_text())
    assert saved["conformal_quantiles"]["0.1"] == [0.25] * 3  # the certificate's, not calib B's
    meta, rows = read_card(Path(summary["path"]))
    assert rows["accuracy_gap"] == ["0.01", "0.1", "high_probability", "0.0125", "0.0075"]
    assert "Proof: stand-in: fixed-sequence testing" in (Path(summary["path"]) / "README.md").read_text()
    # Without the certification module, the selection is refused in one line.
    monkeypatch.setitem(sys.modules, "jeidnn.evaluate.certify", None)
    assert export_main([str(run), "--selection", "guarantee", "--out", str(tmp_path / "n")]) == 2
    assert "export.selection guarantee needs jeidnn.evaluate.certify" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_a_run_config_from_before_export_selection_keeps_its_export_method(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export", "model"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["export"] = {"method": "static", "cost_budget": 0.7, "alpha": 0.1}  # no `selection` key yet
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    summary = export_run(copy, out=tmp_path / "m")
    assert (summary["selection"], summary["method"], summary["budget"]) == ("method", "static", 0.7)
    assert summary["chosen_by"].startswith("named by export.method; ")
