from pathlib import Path

import pytest
import yaml

from jeidnn.config import RunConfig, config_from_dict, load_config
from jeidnn.errors import JeidnnError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_shipped_configs_parse_and_validate():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "smoke.yaml", "sst2-bert.yaml", "cifar10-vit.yaml"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(CONFIGS[0], ["--data.max_train_samples", "123", "--jeidnn.lambdas", "[0.1, 2]"])
    assert cfg.data.max_train_samples == 123
    assert cfg.jeidnn.lambdas == [0.1, 2.0]
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["data"]["max_train_samples"] == 123


def test_variants_and_automatic_lambdas():
    cfg = load_config(None)
    assert cfg.jeidnn.lambdas is None  # automatic
    assert cfg.jeidnn.variants[0].name == "jeidnn_paper" and not cfg.jeidnn.variants[0].extension
    assert load_config(None, ["--jeidnn.lambdas", "null"]).jeidnn.lambdas is None
    cfg = config_from_dict({"jeidnn": {"variants": [{"name": "g", "inputs": "hidden", "arch": "mlp"}]}})
    (variant,) = cfg.jeidnn.variants
    assert (variant.name, variant.inputs, variant.arch, variant.exit_rule) == ("g", "hidden", "mlp", "paper")
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_override_forms():
    cfg = load_config(None, ["--name=abc", "--finetune.enabled", "false", "--model.exit_layers", "[1, 3]"])
    assert (cfg.name, cfg.finetune.enabled, cfg.model.exit_layers) == ("abc", False, [1, 3])


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"dataa": {}}, "`dataa`"),
        ({"data": {"max_train_sampels": 3}}, "`data.max_train_sampels`"),
        ({"data": {"max_train_samples": "many"}}, "`data.max_train_samples`"),
        ({"finetune": {"enabled": "yes"}}, "`finetune.enabled`"),
        ({"jeidnn": {"variants": [{"im_loss": "mean"}]}}, "`jeidnn.variants[0].im_loss`"),
        ({"jeidnn": {"variants": [{"nme": "x"}]}}, "`jeidnn.variants[0].nme`"),
        ({"jeidnn": {"variants": []}}, "jeidnn.variants"),
        ({"jeidnn": {"variants": [{"name": "a"}, {"name": "a"}]}}, "'a' must be unique"),
        ({"jeidnn": {"lambdas": [0.1, "x"]}}, "`jeidnn.lambdas[1]`"),
        ({"jeidnn": {"lambdas": []}}, "jeidnn.lambdas"),
        ({"export": {"method": "nope"}}, "export.method 'nope'"),
        ({"export": {"cost_budget": 0}}, "export.cost_budget"),
        # removed keys are refused by name, not silently ignored
        ({"jeidnn": {"im_loss": "weighted"}}, "`jeidnn.im_loss`"),
        ({"jeidnn": {"min_positive_weight": 1.0}}, "`jeidnn.min_positive_weight`"),
        ({"export": {"lam": 0.1}}, "`export.lam`"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "val_fraction"),
        ({"data": {"source": "csv"}}, "data.path"),
        ({"model": {"random_config": {"hidden_size": 3}}}, "model_type"),
    ],
)
def test_bad_configs_name_the_key(data, needle):
    with pytest.raises(JeidnnError) as err:
        config_from_dict(data)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(JeidnnError, match="data.nope"):
        load_config(None, ["--data.nope", "1"])
    with pytest.raises(JeidnnError, match="needs a value"):
        load_config(None, ["--seed"])
    with pytest.raises(JeidnnError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(JeidnnError, match="mapping"):
        load_config(bad)


def test_override_into_an_empty_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\nname: x\n")  # `data:` with nothing under it is YAML null
    cfg = load_config(path, ["--data.max_eval_samples", "7"])
    assert cfg.data.max_eval_samples == 7 and cfg.name == "x"
    path.write_text("data: 5\n")
    with pytest.raises(JeidnnError, match="`data` must be a mapping"):
        load_config(path, ["--data.max_eval_samples", "7"])
