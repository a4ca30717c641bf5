"""Structured pruning (`jeidnn prune`): sliced weights equal masked ones on every architecture, importance
equals an independent weight-gradient computation, the least important units go, truncated gates score as
before; on a tiny run the pruned model is smaller, loads, and its layer-skipping path equals its full path;
pruning nothing changes nothing; bad settings are one line and exit 2."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_run_overrides, write_sentiment_csv
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel

from jeidnn import EarlyExitModel
from jeidnn.cli.main import main as cli
from jeidnn.cli.main import train_main
from jeidnn.compress.importance import importance, least_important
from jeidnn.compress.pruning import PruneSettings, prune_model, prune_run, run_data
from jeidnn.config.gating import GateSettings
from jeidnn.config.parser import load_config
from jeidnn.data.sources import load_raw
from jeidnn.data.splits import make_splits, split_fingerprint
from jeidnn.errors import JeidnnError
from jeidnn.export.exporter import build_model, load_backbone
from jeidnn.export.operating_point import Run, choose
from jeidnn.export.selection import default_choice
from jeidnn.hf.batches import make_batches
from jeidnn.model.backbone import Backbone
from jeidnn.model.early_exit import PatienceGates, StaticGates, ThresholdGates
from jeidnn.model.families import family_of
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.structured import (
    head_dim,
    keep_exits,
    layer_sizes,
    layer_stack,
    projection,
    prune_ffn,
    prune_heads,
    restore_pruned_shapes,
)

ROOT = Path(__file__).resolve().parent.parent


def tiny(arch):
    fields = dict(TINY_CONFIGS[arch])
    return AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).eval()


def inputs_for(backbone):
    if backbone.modality == "image":
        return {"pixel_values": torch.randn(3, 3, 16, 16)}
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # padding must not matter
    return {"input_ids": torch.randint(5, 99, (3, 7)), "attention_mask": mask}


def layers_of(model):
    return list(getattr(*layer_stack(model)))


# --------------------------------------------------------------------------- structure


PRUNABLE = [a for a, fields in TINY_CONFIGS.items() if family_of(fields["model_type"]).prune_refusal is None]


@pytest.mark.parametrize("arch", PRUNABLE)  # the others: test_families checks that jeidnn prune refuses them
def test_sliced_model_equals_the_masked_one_and_reloads(arch):
    model = tiny(arch)
    inputs = inputs_for(Backbone(model))
    masked = copy.deepcopy(model)
    size = head_dim(model.config)
    layers = layers_of(masked)
    with torch.no_grad():  # a head / neuron whose output weights are zero contributes nothing
        projection(layers[0], "attn_out").weight[:, size : 2 * size] = 0
        projection(layers[2], "ffn_out").weight[:, [0, 3, 5]] = 0
    params = sum(p.numel() for p in model.parameters())

    prune_heads(model, {0: [1]})
    prune_ffn(model, {2: [0, 3, 5]})

    assert layer_sizes(model) == ([1, 2, 2], [37, 37, 34])
    assert model.config.jeidnn_pruned == {"heads": [1, 2, 2], "ffn": [37, 37, 34]}
    # Q, K, V: a head's rows (weights and bias); O: its columns; FFN: a neuron's row and bias, then column.
    removed = 3 * size * (32 + 1) + 32 * size + 3 * (32 + 1) + 3 * 32
    assert sum(p.numel() for p in model.parameters()) == params - removed
    out = Backbone(model)(inputs)
    torch.testing.assert_close(out, Backbone(masked)(inputs), atol=1e-6, rtol=1e-6)
    # A model built from the saved config gets the pruned shapes back, so the weights load.
    fields = model.config.to_dict()
    fresh = restore_pruned_shapes(
        AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    )
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(Backbone(fresh.eval())(inputs), out)


def test_removing_every_head_of_a_layer_is_refused():
    model = tiny("bert")
    with pytest.raises(JeidnnError, match="cannot remove every head of layer 2"):
        prune_heads(model, {1: [0, 1]})


def test_importance_equals_the_weight_gradient_reference():
    """∂L/∂ξ_h of a mask on head h's output equals Σ (W_O ⊙ ∂L/∂W_O) over head h's columns of the output
    projection (and likewise for an FFN neuron): an independent computation, one sample at a time."""
    model = tiny("bert")
    backbone, size = Backbone(model).eval(), head_dim(model.config)
    heads = ExitHeads([1, 2, 3], 32, 3, "tanh", im_head="linear").eval()
    layers = layers_of(model)
    with torch.no_grad():  # a dead head (zero values) and dead neurons (zero output weights)
        projection(layers[1], "value").weight[size:] = 0
        projection(layers[1], "value").bias[size:] = 0
        projection(layers[0], "ffn_out").weight[:, :4] = 0
    inputs, labels = inputs_for(backbone), torch.tensor([0, 2, 1])

    scores = importance(backbone, heads, [(inputs, labels)])

    ref_heads = [torch.zeros(2, dtype=torch.float64) for _ in layers]
    ref_ffn = [torch.zeros(37, dtype=torch.float64) for _ in layers]
    for b in range(3):
        model.zero_grad()
        one = {k: v[b : b + 1] for k, v in inputs.items()}
        logits = heads(backbone(one, heads.layers))[0]  # (L, C)
        F.cross_entropy(logits, labels[b].repeat(3), reduction="sum").backward()
        for i, layer in enumerate(layers):
            o, f = projection(layer, "attn_out"), projection(layer, "ffn_out")
            per_column = (o.weight * o.weight.grad).sum(0).double()  # (heads * size,)
            ref_heads[i] += per_column.view(2, size).sum(1).abs()
            ref_ffn[i] += (f.weight * f.weight.grad).sum(0).double().abs()
    assert scores.samples == 3
    for got, ref in [*zip(scores.heads, ref_heads, strict=True), *zip(scores.ffn, ref_ffn, strict=True)]:
        torch.testing.assert_close(got, ref / ref.norm(), atol=1e-6, rtol=1e-5)
    assert scores.heads[1][1] == 0 and bool((scores.ffn[0][:4] == 0).all())
    assert least_important(scores.heads, 0.2, "head", "--heads") == {0: [], 1: [1], 2: []}
    assert least_important(scores.ffn, 4 / 111, "neuron", "--ffn") == {0: [0, 1, 2, 3], 1: [], 2: []}


def test_least_important_is_global_and_never_empties_a_layer():
    scores = [torch.tensor([0.1, 0.9]), torch.tensor([0.05, 0.02, 0.8]), torch.tensor([0.3])]
    assert least_important(scores, 0.0, "head", "--heads") == {0: [], 1: [], 2: []}
    assert least_important(scores, 0.34, "head", "--heads") == {0: [], 1: [0, 1], 2: []}  # ⌊0.34 × 6⌋ = 2
    # The third lowest (0.1) goes; 0.3 is the only head of its layer, so the fourth is 0.8, not 0.3.
    assert least_important(scores, 0.5, "head", "--heads") == {0: [0], 1: [0, 1], 2: []}
    with pytest.raises(JeidnnError, match=r"--heads 0.7 removes 4 of 6 heads, which empties a layer"):
        least_important(scores, 0.7, "head", "--heads")


# --------------------------------------------------------------------------- exits after dropped layers


@pytest.mark.parametrize("inputs", ["confidence", "trajectory", "hidden"])
@pytest.mark.parametrize("arch", ["linear", "mlp"])
@pytest.mark.parametrize("standardize", [False, True])
def test_truncated_learned_gates_score_as_before(inputs, arch, standardize):
    settings = GateSettings(inputs=inputs, arch=arch, standardize=standardize, width=4, projection=3)
    gates = Gates(5, settings, hidden_size=6, generator=torch.Generator().manual_seed(1))
    logits, hidden = torch.randn(50, 5, 3) * 2, torch.randn(50, 4, 6)
    gates.set_statistics(logits[:, :4], hidden)
    heads = ExitHeads([1, 2, 3, 4, 5], 6, 3, "tanh", im_head="linear")

    new_heads, new_gates = keep_exits(heads, gates, 2)

    assert new_heads.layers == [1, 2, 3] and new_gates.num_exits == 3
    assert new_heads.heads[2] is heads.heads[2] and new_heads.activation == "none"
    expected = gates.scores(logits, hidden)[:, :2]
    torch.testing.assert_close(new_gates.scores(logits[:, :3], hidden[:, :2]), expected, atol=1e-6, rtol=1e-5)


def test_truncated_rule_gates():
    heads = ExitHeads([1, 2, 3, 4], 6, 3, "tanh", im_head="mlp")
    new_heads, gates = keep_exits(heads, ThresholdGates([0.5, 0.6, 0.7], "margin"), 2)
    assert gates.thresholds.tolist() == pytest.approx([0.5, 0.6]) and gates.measure == "margin"
    assert new_heads.activation == "tanh"  # MLP IMs already have the final head's shape
    assert keep_exits(heads, StaticGates(3), 1)[1].exit_index == 1
    patience = PatienceGates(2)
    assert keep_exits(heads, patience, 1)[1] is patience
    assert keep_exits(heads, patience, 0)[1] is None  # a single exit has no gate
    assert keep_exits(heads, patience, 3) == (heads, patience)


# --------------------------------------------------------------------------- on a tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    corpus = write_sentiment_csv(tmp / "d.csv", n=500)
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), *tiny_run_overrides(corpus, tmp / "runs")]
    fast = ["--warmup.max_epochs", "5", "--eval.bootstrap", "100", "--eval.resplits", "2", "--no-progress"]
    assert train_main([*args, *fast]) == 0
    return tmp / "runs" / "t"


@pytest.fixture(scope="module")
def test_texts(run):
    cfg = load_config(run / "config.yaml")
    raw = load_raw(cfg.data, "text")
    return [raw.inputs[i] for i in make_splits(len(raw.labels), cfg.data, cfg.seed).indices["test"]]


def both_paths(model, texts):
    exits, logits = (
        torch.zeros(2, len(texts), dtype=torch.long),
        torch.zeros(2, len(texts), model.num_classes),
    )
    with torch.no_grad():
        for positions, batch in make_batches(model, texts, 32):
            for i, out in enumerate((model.forward_full(batch), model.forward_dynamic(batch))):
                exits[i, positions], logits[i, positions] = out.exit_index, out.logits
    return exits, logits


@pytest.fixture(scope="module")
def pruned(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "m"
    settings = PruneSettings(heads=0.5, ffn=0.5, layers=2)
    summary = prune_run(run, settings, method="threshold_maxprob", budget=0.9, out=out, progress=False)
    return out, summary


def test_pruned_model_is_smaller_loads_and_leaves_where_its_full_path_does(run, pruned, test_texts):
    out, summary = pruned
    report = json.loads((run / "report.json").read_text())
    model = EarlyExitModel.from_pretrained(out)
    from transformers import AutoModelForSequenceClassification  # `import jeidnn` registered the class

    auto = AutoModelForSequenceClassification.from_pretrained(out)

    assert type(auto).__name__ == "EarlyExitForSequenceClassification"
    params = sum(p.numel() for p in model.parameters())
    assert params == summary["parameters_after"] < summary["parameters_before"]
    heads, ffn = layer_sizes(model.backbone.model)  # 2 of 4 heads, 64 of 128 FFN neurons of layers 1-2
    assert heads == [1, 1] and sum(ffn) == 64 and min(ffn) >= 1
    assert model.heads.layers == [1, 2] and isinstance(model.gates, ThresholdGates)
    assert (
        model.config.gates["thresholds"] == unpruned(run, "threshold_maxprob").config.gates["thresholds"][:1]
    )
    # Cheaper than the same exits of the unpruned model, relative to the same full model.
    assert all(a < b for a, b in zip(model.costs, report["exits"]["cost"][:2], strict=False))
    assert model.costs == summary["costs"]
    assert len(model.conformal_quantiles["0.1"]) == 2 and "calib half B" in summary["refitted"]
    saved = model.metadata["pruning"]
    assert (saved["heads_fraction"], saved["ffn_fraction"], saved["layers"]) == (0.5, 0.5, 2)
    assert saved["heads_per_layer"] == {"before": [2, 2, 2], "after": [1, 1]}
    assert saved["importance"].startswith("Michel et al. (2019)")
    exits, logits = both_paths(model, test_texts)
    assert torch.equal(exits[0], exits[1])
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    fractions = (torch.bincount(exits[0], minlength=2).double() / len(test_texts)).tolist()
    assert fractions == pytest.approx(saved["test_exit_fractions"])
    assert [p.label for p in auto.predict(test_texts[:20])] == [
        p.label for p in model.predict(test_texts[:20])
    ]
    # The tiny run's thresholds may send everyone out at one exit; at the median confidence of the first
    # exit half the samples skip the second layer, whose pruned heads then run on the remaining rows only.
    with torch.no_grad():
        full = model.forward_full(next(make_batches(model, test_texts, len(test_texts)))[1])
    model.gates = ThresholdGates([float(full.exit_logits[:, 0].softmax(-1).max(-1).values.median())])
    exits, logits = both_paths(model, test_texts)
    assert 0.3 < float(exits[0].double().mean()) < 0.7
    assert torch.equal(exits[0], exits[1])
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def unpruned(run, method=None):
    """The model `jeidnn export` writes for ``method`` at budget 0.9 (default: the run's own choice)."""
    r = Run.open(run)
    backbone, preprocessor = load_backbone(r)
    point = choose(r, method, 0.9) if method else default_choice(r)
    return build_model(r, point, backbone, preprocessor)[0]


def test_loading_restores_the_pruned_shapes_without_help(pruned):
    model = EarlyExitModel.from_pretrained(pruned[0])
    assert layer_sizes(model.backbone.model)[0] == [1, 1]


def test_layers_auto_keeps_the_deepest_exit_used_on_calib(run, tmp_path):
    r = Run.open(run)
    layers, deepest = r.report["exits"]["layers"], int(choose(r, "static", 0.7).candidate.calib_exits.max())
    assert deepest < len(layers) - 1  # a static depth within cost 0.7 leaves the last layer unused

    settings = PruneSettings(layers="auto")
    summary = prune_run(run, settings, method="static", budget=0.7, out=tmp_path / "m", progress=False)

    assert summary["exit_layers"] == layers[: deepest + 1] and summary["layers_kept"] == layers[deepest]
    assert summary["parameters_after"] < summary["parameters_before"]
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["exit_layers"] == layers[: deepest + 1]
    assert saved["backbone_config"]["num_hidden_layers"] == layers[deepest]
    if deepest == 0:  # one exit left: no gate
        assert saved["gates"] == {"kind": "none"} and summary["test_exit_fractions"] == [1.0]
    card = (tmp_path / "m" / "README.md").read_text()  # the model card follows the pruned model
    assert f"| test (pruned) | {summary['test_accuracy']:.4f} | {summary['test_cost']:.4f} |" in card
    assert f"layers kept: {layers[deepest]}" in card and f"exits at layers {layers[: deepest + 1]}" in card


def test_pruning_nothing_gives_back_the_same_model(run, test_texts):
    r, model = Run.open(run), unpruned(run)
    same, info = prune_model(r, model, PruneSettings(), run_data(r, model.backbone, model.preprocessor))

    assert info["parameters_after"] == info["parameters_before"] and info["refitted"].startswith("nothing")
    assert same.conformal_quantiles == model.conformal_quantiles
    assert same.costs == pytest.approx(model.costs, rel=1e-9)  # recounted by the same counter
    assert [p.to_json() for p in same.predict(test_texts)] == [p.to_json() for p in model.predict(test_texts)]


def test_run_data_refuses_data_that_changed_since_the_run(run):
    r, model = Run.open(run), unpruned(run)
    data = run_data(r, model.backbone, model.preprocessor)
    assert r.report["dataset"]["fingerprint"] == split_fingerprint(
        data.dm.raw, data.dm.splits
    )  # recorded by the run
    run_data(r, model.backbone, model.preprocessor)  # the data the run saw: accepted
    r.report["dataset"]["fingerprint"] = "0" * 64
    with pytest.raises(
        JeidnnError, match=r"^the data file \S+d\.csv changed since the run: .*train a new run$"
    ):
        run_data(r, model.backbone, model.preprocessor)


def test_recovery_trains_deterministically_and_refits(run):
    r, model = Run.open(run), unpruned(run)
    data = run_data(r, model.backbone, model.preprocessor)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    settings = PruneSettings(ffn=0.25, recover_steps=3, recover_lr=1e-3)
    first, info = prune_model(r, model, settings, data)
    second, _ = prune_model(r, model, settings, data)

    assert info["recover_steps"] == 3 and info["recover_lr"] == 1e-3 and len(info["recover_loss"]) == 2
    assert "calib half B" in info["refitted"]
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    unrecovered, _ = prune_model(r, model, PruneSettings(ffn=0.25), data)
    changed = [k for k, v in first.state_dict().items() if not torch.equal(v, unrecovered.state_dict()[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("heads.") for k in changed)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the input is untouched


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--heads", "1"], "--heads must be a fraction in [0, 1), got 1.0"),
        (["--ffn", "-0.1"], "--ffn must be a fraction in [0, 1), got -0.1"),
        (["--heads", "0.9"], "--heads 0.9 removes 5 of 6 heads, which empties a layer"),
        (["--layers", "7"], "--layers 7 is beyond the model's 3 layers"),
        (["--layers", "x"], "--layers must be auto or a number of layers, got 'x'"),
        (["--method", "fly"], "unknown method 'fly'; this run can export:"),
        (["--recover-steps", "-1"], "--recover-steps must be >= 0, got -1"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(args, needle, run, tmp_path, capsys):
    assert cli(["prune", str(run), *args, "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {needle}") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_jeidnn_help_lists_prune(capsys):
    assert cli(["--help"]) == 0
    assert "\n  prune " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli(["prune", "--help"])
    assert exit_.value.code == 0 and "--recover-steps" in capsys.readouterr().out


def test_missing_run_and_existing_output(run, tmp_path, capsys):
    assert cli(["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert f"run folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    assert cli(["prune", str(run), "--heads", "0.5", "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert not any((tmp_path / "m").iterdir())


def test_benchmark_script_on_the_tiny_run(run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports speed.py as the script would
    spec = importlib.util.spec_from_file_location("pruning_benchmark", ROOT / "benchmarks" / "pruning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = [str(run), "--levels", "0.5", "--num-inputs", "16", "--repeats", "1", "--out", str(tmp_path)]

    assert bench.main(args) == 0

    result = json.loads((tmp_path / "pruning.json").read_text())
    rows = {(r["level"], r["regime"]): r for r in result["rows"]}
    assert set(rows) == {(0.0, "static"), (0.0, "early exit"), (0.5, "static"), (0.5, "early exit")}
    report = json.loads((run / "report.json").read_text())
    assert rows[0.0, "static"]["test_cost"] == pytest.approx(report["exits"]["cost"][-1], rel=1e-9)
    assert rows[0.5, "static"]["test_cost"] < rows[0.0, "static"]["test_cost"]
    assert rows[0.5, "static"]["parameters"] < rows[0.0, "static"]["parameters"]
    assert all(r["ms_per_sample"] > 0 for r in rows.values())
    text = (tmp_path / "pruning.md").read_text()
    assert (
        text.startswith("# Structured pruning") and f"`python benchmarks/pruning.py {' '.join(args)}`" in text
    )
    assert (tmp_path / "pruning.png").stat().st_size > 0


def test_a_family_the_pruning_cannot_cut_is_refused_in_one_line(monkeypatch):
    from jeidnn.compress.pruning import check_prunable
    from jeidnn.model.families import family_of

    check_prunable("bert")  # supported: nothing raised
    monkeypatch.setattr(family_of("bert"), "prune_refusal", "its heads share key/value projections")
    with pytest.raises(
        JeidnnError, match="^jeidnn prune cannot prune a bert backbone: its heads share key/value"
    ):
        check_prunable("bert")
