import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from jeidnn.config.parser import config_from_dict, load_config, packaged_config
from jeidnn.config.schema import RunConfig
from jeidnn.config.validate import check_against_model
from jeidnn.errors import JeidnnError
from jeidnn.evaluate.methods import check_export_method

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))


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


def test_export_method_may_be_any_method_the_run_evaluates():
    for method in (
        "jeidnn_paper",
        "jeidnn_paper_tau",
        "gate_trajectory_expected",
        "threshold_search",
        "patience",
    ):
        cfg = config_from_dict({"export": {"selection": "method", "method": method}})
        check_export_method(cfg)
        assert cfg.export.method == method
    # A `_tau` twin exists only for native variants; thresholds on the paper's IMs need the paper preset.
    for method in ("gate_trajectory_expected_tau", "jeidnn_ims_threshold_maxprob"):
        cfg = config_from_dict(
            {
                "jeidnn": {"variants": [{"name": "g", "operating_point": "calib_threshold"}]},
                "export": {"selection": "method", "method": method},
            }
        )
        with pytest.raises(JeidnnError, match="choose one of"):
            check_export_method(cfg)
    check_export_method(
        config_from_dict(
            {"jeidnn": {"enabled": False}, "export": {"selection": "method", "method": "static"}}
        )
    )


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"export": {"selection": "method", "method": "nope"}}, "export.method 'nope'"),
        ({"export": {"selection": "method", "method": "oracle"}}, "export.method 'oracle'"),
        (
            {"jeidnn": {"enabled": False}, "export": {"selection": "method", "method": "jeidnn_paper"}},
            "export.method 'jeidnn_paper'",
        ),
    ],
)
def test_a_method_the_run_cannot_export_is_refused_in_one_line(data, needle):
    with pytest.raises(JeidnnError) as err:
        check_export_method(config_from_dict(data))
    assert needle in str(err.value) and "choose one of" in str(err.value)
    assert "\n" not in str(err.value)


def test_test_split_frees_test_fraction():
    # With data.test_split the test split is a dataset split: test_fraction is unused, so
    # val + calib may take what the three fractions could not.
    data = {"source": "hf", "path": "glue", "hf_splits": ["train", "validation"], "test_split": "validation"}
    cfg = config_from_dict({"data": {**data, "val_fraction": 0.45, "calib_fraction": 0.45}})
    assert cfg.data.test_split == "validation"
    assert load_config(ROOT / "configs" / "sst2-bert.yaml").data.test_split == "validation"


def test_conformal_min_samples_help_describes_the_exit_groups():
    from jeidnn.config.parser import default_parser
    from jeidnn.evaluate.conformal import group_exits

    text = " ".join(default_parser().format_help().split())
    entry = text.split("--eval.conformal_min_samples")[1].split("--eval.")[0]
    assert "pooled" not in entry  # no pooled quantile exists: small exits join a group
    assert "consecutive exits are merged into one group until it holds at least this many" in entry
    assert group_exits([10, 25, 3, 40, 2], min_samples=30) == [[0, 1], [2, 3, 4]]  # as described


def test_override_forms():
    cfg = load_config(None, ["--name=abc", "--finetune.enabled", "false", "--model.exit_layers", "[1, 3]"])
    assert (cfg.name, cfg.finetune.enabled, cfg.model.exit_layers) == ("abc", False, [1, 3])


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"dataa": {}}, "`dataa`"),
        ({"data": {"max_train_sampels": 3}}, "`data.max_train_sampels`"),
        ({"data": {"max_train_samples": "many"}}, "`data.max_train_samples`"),
        ({"finetune": {"enabled": "maybe"}}, "`finetune.enabled`"),
        ({"jeidnn": {"variants": [{"im_loss": "mean"}]}}, "`im_loss` of a `jeidnn.variants` item"),
        ({"jeidnn": {"variants": [{"nme": "x"}]}}, "`jeidnn.variants[0].nme`"),
        ({"jeidnn": {"variants": []}}, "jeidnn.variants"),
        ({"jeidnn": {"variants": [{"name": "a"}, {"name": "a"}]}}, "'a' must be unique"),
        ({"jeidnn": {"lambdas": [0.1, "x"]}}, "`jeidnn.lambdas` expects list[float] | null, got [0.1, 'x']"),
        ({"jeidnn": {"lambdas": []}}, "jeidnn.lambdas"),
        ({"export": {"cost_budget": 0}}, "export.cost_budget"),
        # removed keys are refused by name, not silently ignored
        ({"jeidnn": {"im_loss": "weighted"}}, "`jeidnn.im_loss`"),
        ({"jeidnn": {"min_positive_weight": 1.0}}, "`jeidnn.min_positive_weight`"),
        ({"export": {"lam": 0.1}}, "`export.lam`"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "val_fraction"),
        ({"data": {"source": "csv"}}, "data.path"),
        ({"model": {"random_config": {"hidden_size": 3}}}, "model_type"),
        (
            {"data": {"source": "csv", "path": "d.csv", "test_split": "validation"}},
            "data.test_split names a split of a `datasets` dataset, but data.source is 'csv'",
        ),
        (
            {"data": {"source": "hf", "path": "glue", "hf_splits": ["train"], "test_split": "validation"}},
            "data.test_split 'validation' is not one of data.hf_splits ['train']; add it there",
        ),
        (
            {
                "data": {
                    "source": "hf",
                    "path": "glue",
                    "test_split": "validation",
                    "val_fraction": 0.6,
                    "calib_fraction": 0.4,
                }
            },
            "data.val_fraction and data.calib_fraction must each lie in (0, 1) and sum to less than 1",
        ),
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


def test_values_keep_yaml_types_only_where_the_field_says_so(tmp_path):
    cfg = load_config(
        None,
        [
            "--name", "2024",
            "--data.labels", "[no, yes]",
            "--model.exit_layers", "[2, 4]",
            "--finetune.lr", "1e-4",
            "--finetune.enabled", "no",
            "--model.random_config", "{model_type: bert, num_hidden_layers: 2}",
        ],
    )  # fmt: skip
    assert cfg.name == "2024"
    assert cfg.data.labels == ["no", "yes"]
    assert cfg.model.exit_layers == [2, 4]
    assert cfg.finetune.lr == 1e-4 and isinstance(cfg.finetune.lr, float)
    assert cfg.finetune.enabled is False
    assert cfg.model.random_config == {"model_type": "bert", "num_hidden_layers": 2}
    # The same in a file: YAML 1.1 would read `no` / `yes` as booleans and `5e-5` as a string.
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  labels: [no, yes]\nfinetune:\n  lr: 5e-5\n  head_lr: 1\n")
    cfg = load_config(path)
    assert cfg.data.labels == ["no", "yes"]
    assert (cfg.finetune.lr, cfg.finetune.head_lr) == (5e-5, 1.0) and isinstance(cfg.finetune.head_lr, float)


def test_run_folder_config_round_trips(tmp_path):
    cfg = load_config(
        CONFIGS[0].parent / "smoke.yaml",
        ["--name", "2024", "--data.labels", "[no, yes, '1.0']", "--jeidnn.variants", "[{name: g, width: 3}]"],
    )
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())  # what the pipeline writes into the run folder
    again = load_config(path)
    assert again == cfg
    assert (again.name, again.data.labels) == ("2024", ["no", "yes", "1.0"])
    assert again.jeidnn.variants[0].width == 3


def test_dataclass_defaults_equal_default_yaml():
    # `python train.py` reads configs/default.yaml; the Python API without a file uses the dataclasses.
    assert load_config(packaged_config("default.yaml")) == RunConfig()


def test_packaged_configs_are_found_through_importlib_resources():
    import importlib.resources

    folder = importlib.resources.files("jeidnn.configs")
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml")) == [p.name for p in CONFIGS]
    assert packaged_config().read_text() == (ROOT / "configs" / "default.yaml").read_text()


def test_wheel_ships_every_module_and_config(tmp_path):
    """A regular (non-editable) install must carry configs/, or `jeidnn train` falls back to nothing."""
    src = tmp_path / "src"
    for name in ("jeidnn", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = ["pip", "wheel", str(src), "-w", str(tmp_path), "--no-deps", "--no-build-isolation"]  # offline
    subprocess.run(
        [sys.executable, "-m", *build],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("jeidnn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jeidnn").rglob("*.py")}
    assert len(modules) > 40 and "jeidnn/config/schema.py" in modules
    assert modules <= names  # every subpackage, found without a hand-written list
    assert {f"jeidnn/configs/{p.name}" for p in CONFIGS} <= names


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.nope", "1"], "unknown config key `data.nope`; valid keys in `data`: source, path,"),
        (["--nope", "1"], "unknown config key `nope`; valid keys at the top level: name,"),
        (["--data.max_train", "5"], "unknown config key `data.max_train`"),  # no prefix matching
        (["--seed.x", "1"], "`seed` is not a section; cannot set `seed.x`"),
        (["--data", "1"], "`data` is a section; override its keys (--data.<key> value)"),
        (["--seed"], "--seed needs a value"),
        (["--seed", "-1e3"], "--seed needs a value (write a value that starts with '-' as --seed=VALUE)"),
        (["stray"], "unexpected argument 'stray'; overrides look like --section.key value"),
        (["--finetune.epochs", "two"], "config key `finetune.epochs` expects int, got two;"),
        (["--data.labels", "[1, 2]"], "config key `data.labels` expects list[str] | null, got [1, 2];"),
        (["--eval.alphas", "0.1"], "config key `eval.alphas` expects list[float], got 0.1;"),
        (
            ["--jeidnn.variants", "[{name: g, im_loss: mean}]"],
            "config key `im_loss` of a `jeidnn.variants` item expects 'weighted' | 'uniform' | 'frozen', "
            "got mean",
        ),
        (["--jeidnn.variants", "[{name: g, imloss: x}]"], "unknown key `imloss` in a `jeidnn.variants` item"),
        (["--data", "{nope: 1}"], "unknown config key `data.nope`"),
    ],
)
def test_bad_overrides_get_one_line_naming_the_key(override, message):
    with pytest.raises(JeidnnError) as err:
        load_config(None, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--finetune.lr", "0"], "finetune.lr must be a finite number > 0, got 0.0"),
        (["--finetune.head_lr=-1e-3"], "finetune.head_lr must be a finite number > 0"),
        (["--warmup.lr", "0"], "warmup.lr must be a finite number > 0"),
        (["--jeidnn.lr", ".nan"], "jeidnn.lr must be a finite number > 0, got nan"),
        (["--finetune.lr", ".inf"], "finetune.lr must be a finite number > 0, got inf"),
        (["--jeidnn.max_positive_weight", "0"], "jeidnn.max_positive_weight must be a finite number > 0"),
        (["--jeidnn.target_max_cost", "0"], "jeidnn.target_max_cost must be a finite number > 0"),
        (["--jeidnn.max_cost_gap", "-0.1"], "jeidnn.max_cost_gap must be a finite number > 0"),
        (["--finetune.weight_decay", "-0.01"], "finetune.weight_decay must be a finite number >= 0"),
        (["--warmup.weight_decay", "-1"], "warmup.weight_decay must be a finite number >= 0"),
        (["--jeidnn.weight_decay", "-1"], "jeidnn.weight_decay must be a finite number >= 0"),
        (["--data.num_workers", "-1"], "data.num_workers must be a finite number >= 0, got -1"),
        (["--warmup.patience", "-1"], "warmup.patience must be a finite number >= 0, got -1"),
        (["--jeidnn.lambda_rounds", "-1"], "jeidnn.lambda_rounds must be a finite number >= 0"),
        (["--data.eval_batch_size", "0"], "data.eval_batch_size must be a positive integer, got 0"),
        (["--finetune.max_samples", "0"], "finetune.max_samples must be a positive integer, got 0"),
        (["--data.max_train_samples", "0"], "data.max_train_samples must be a positive integer or null"),
        (["--data.max_eval_samples", "-5"], "data.max_eval_samples must be a positive integer or null"),
        (["--eval.conformal_min_samples", "0"], "eval.conformal_min_samples must be a positive integer"),
        (["--finetune.warmup_fraction", "1"], "finetune.warmup_fraction must lie in [0, 1), got 1.0"),
        (["--finetune.warmup_fraction", "-0.1"], "finetune.warmup_fraction must lie in [0, 1)"),
        (["--jeidnn.momentum", "1"], "jeidnn.momentum must lie in [0, 1)"),
        (["--jeidnn.min_lr", "0.1"], "jeidnn.min_lr must lie in [0, jeidnn.lr = 0.01], got 0.1"),
        (["--eval.threshold_ps", "[0.5, 0]"], "eval.threshold_ps must be a non-empty list of values > 0"),
        (["--eval.threshold_ps", "[]"], "eval.threshold_ps must be a non-empty list"),
        (["--eval.global_thresholds", "[0.5, 1.5]"], "eval.global_thresholds must lie in [0, 1]"),
        (["--eval.patience_values", "[0, -1]"], "eval.patience_values must be null or a non-empty list"),
        (["--eval.patience_values", "[]"], "eval.patience_values must be null or a non-empty list"),
        (["--eval.alphas", "[0.1, 1]"], "eval.alphas must lie in (0, 1), got 1.0"),
        (["--eval.ece_bins", "0"], "eval.ece_bins must be a positive integer"),
        (["--eval.budgets", "[0.5, 0]"], "eval.budgets must be a non-empty list of costs in (0, 2]"),
        (["--data.val_fraction", "0.5", "--data.test_fraction", "0.4"], "must each lie in (0, 1) and sum"),
        (["--seed", "-1"], "seed must lie in [0, 2**32), got -1"),
        (["--export.guarantee.epsilon", "0"], "export.guarantee.epsilon must lie in (0, 1), got 0.0"),
        (["--export.guarantee.delta", "1"], "export.guarantee.delta must lie in (0, 1), got 1.0"),
        (
            ["--eval.guarantees", '[{"risk": "consistency", "epsilon": 1.5}]'],
            "eval.guarantees[0].epsilon must lie in (0, 1), got 1.5",
        ),
        (["--export.guarantee.risk", "accuracy"], "accuracy"),
        (["--export.selection", "best"], "best"),
        (
            ["--export.method", "patience"],
            "export.method is 'patience' but export.selection is 'budget'; set export.selection: method",
        ),
        (
            ["--export.method", "patience", "--export.selection", "guarantee"],
            "export.method is 'patience' but export.selection is 'guarantee'",
        ),
        (["--export.selection", "method"], "export.selection is 'method' but export.method is not set"),
        (["--output_dir", ""], "output_dir is empty"),
    ],
)
def test_values_that_cannot_work_are_refused_before_any_work(override, message):
    with pytest.raises(JeidnnError) as err:
        load_config(None, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_max_length_against_the_backbone():
    from transformers import BertConfig, RobertaConfig, ViTConfig

    cfg = load_config(None, ["--model.max_length", "64"])
    check_against_model(cfg, BertConfig(max_position_embeddings=64))
    check_against_model(cfg, ViTConfig())  # no token positions
    with pytest.raises(JeidnnError, match=r"model.max_length 64 exceeds the backbone's 63 token positions"):
        check_against_model(cfg, BertConfig(max_position_embeddings=63))
    # RoBERTa's positions start after padding_idx (1): 66 embeddings hold 64 tokens.
    check_against_model(cfg, RobertaConfig(max_position_embeddings=66))
    with pytest.raises(JeidnnError, match="at most 63"):
        check_against_model(cfg, RobertaConfig(max_position_embeddings=65))
