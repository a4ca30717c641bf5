"""The whole run: config -> data -> model -> stage 0..4 -> report.json -> exported model.

`train.py` is a thin recipe over these functions; every piece can be imported and tested.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file

from jeidnn.backbone import Backbone
from jeidnn.config import GateVariant, RunConfig
from jeidnn.cost import ExitCosts, exit_costs, text_cost_samples
from jeidnn.data import JeidnnDataModule, RawData, Splits, load_raw, make_splits, model_inputs
from jeidnn.errors import JeidnnError
from jeidnn.features import FeatureSplit, extract_features
from jeidnn.heads import ExitHeads
from jeidnn.preprocess import build_preprocessor
from jeidnn.training import FinetuneModule, WarmupModule, exit_logits, feature_loader, freeze


@dataclass
class Prepared:
    """Everything checked before a run folder is created."""

    cfg: RunConfig
    backbone: Backbone
    raw: RawData
    splits: Splits
    dm: JeidnnDataModule
    heads: ExitHeads
    exit_layers: list[int]


def exit_layers_of(cfg: RunConfig, num_layers: int) -> list[int]:
    layers = cfg.model.exit_layers
    if layers is None:
        return list(range(1, num_layers + 1))
    bad = [x for x in layers if x > num_layers]
    if bad:
        raise JeidnnError(f"model.exit_layers {bad} exceed the backbone's {num_layers} layers")
    return sorted(set(layers) | {num_layers})


def prepare(cfg: RunConfig) -> Prepared:
    """Load model and data and validate them; raises JeidnnError on any bad input."""
    pl.seed_everything(cfg.seed, verbose=False)
    backbone = Backbone.load(cfg.model)
    raw = load_raw(cfg.data, backbone.modality)
    splits = make_splits(len(raw.labels), cfg.data, cfg.seed)
    train_inputs = [raw.inputs[i] for i in splits.indices["train"]]
    preprocessor = build_preprocessor(
        cfg.model, backbone, train_inputs if backbone.modality == "text" else None
    )
    dm = JeidnnDataModule(cfg.data, raw, splits, preprocessor, cfg.model.max_length, cfg.seed)
    layers = exit_layers_of(cfg, backbone.num_layers)
    heads = ExitHeads(
        layers,
        backbone.hidden_size,
        len(raw.label_names),
        backbone.spec.head_activation,
        im_head=cfg.model.im_head,
    )
    if backbone.pooling == "cls":
        _init_final_head_from_pooler(backbone, heads)
    return Prepared(cfg, backbone, raw, splits, dm, heads, layers)


def _init_final_head_from_pooler(backbone: Backbone, heads: ExitHeads) -> None:
    # BERT-style checkpoints ship a trained pooler (dense + tanh): the HF classification head
    # starts from it, and so does our final head.
    pooler = getattr(backbone.model, "pooler", None)
    dense = getattr(pooler, "dense", None)
    first = heads.final.net[0]
    if (
        backbone.spec.head_activation == "tanh"
        and isinstance(dense, torch.nn.Linear)
        and dense.weight.shape == first.weight.shape
    ):
        first.load_state_dict(dense.state_dict())


def create_run_dir(cfg: RunConfig) -> Path:
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            state = "a finished run" if (run_dir / "report.json").exists() else "an unfinished run"
            raise JeidnnError(
                f"run folder {run_dir} already holds {state}; choose another --name or pass --overwrite true"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, quiet: bool = False):
        start = time.perf_counter()
        if not quiet:
            print(f"[jeidnn] {name} ...", flush=True)
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        if not quiet:
            print(f"[jeidnn] {name} done in {self.timings[name]:.1f} s", flush=True)


def make_trainer(
    cfg: RunConfig, run_dir: Path, stage: str, max_epochs: int, progress: bool, **kwargs
) -> pl.Trainer:
    if cfg.logger == "tensorboard":
        logger = pl.loggers.TensorBoardLogger(save_dir=str(run_dir / "logs"), name=stage)
    else:
        logger = pl.loggers.CSVLogger(save_dir=str(run_dir / "logs"), name=stage)
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator=cfg.accelerator,
        devices=1,
        logger=logger,
        default_root_dir=str(run_dir),
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        deterministic=False,
        **kwargs,
    )


def finetune(p: Prepared, run_dir: Path, progress: bool) -> None:
    """Stage 0: backbone + final head, best val accuracy checkpoint restored."""
    cfg = p.cfg.finetune
    train = p.dm.loader("train", cfg.batch_size, shuffle=True, limit=cfg.max_samples)
    module = FinetuneModule(p.backbone, p.heads.final, cfg, total_steps=len(train) * cfg.epochs)
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="finetune-best",
        monitor="finetune/val_acc",
        mode="max",
        save_top_k=1,
        save_weights_only=True,
    )
    trainer = make_trainer(p.cfg, run_dir, "finetune", cfg.epochs, progress, callbacks=[ckpt])
    # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as found:
    # without this the backbone would fine-tune with dropout off.
    module.train()
    trainer.fit(module, train, p.dm.val_dataloader())
    if ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)


def warmup(p: Prepared, cache: dict[str, FeatureSplit], run_dir: Path, progress: bool) -> list[int]:
    """Stage 1: IMs on cached features; returns each IM's best epoch."""
    cfg = p.cfg.warmup
    module = WarmupModule(p.heads, cache["val"], cfg)
    if p.heads.num_exits > 1 and cfg.max_epochs > 0:
        trainer = make_trainer(p.cfg, run_dir, "warmup", cfg.max_epochs, progress, enable_checkpointing=False)
        trainer.fit(module, feature_loader(cache["train"], cfg.batch_size, True, p.cfg.seed))
        module.restore_best()
    p.heads.eval()
    save_file(
        {k: v.contiguous() for k, v in p.heads.state_dict().items()},
        str(run_dir / "checkpoints" / "warmup_heads.safetensors"),
    )
    return module.best_epoch


def count_costs(p: Prepared) -> ExitCosts:
    ds = p.dm.datasets["test"]
    if p.raw.modality == "text":
        samples = text_cost_samples(ds.encoded)
        counted = f"mean over the test split's real token lengths ({len(ds)} samples, unpadded)"
    else:
        batch = p.dm.collator([ds[i] for i in range(min(8, len(ds)))])
        samples = [(model_inputs(batch, p.backbone.input_names), 1.0)]
        counted = "test images (all the same size)"
    return exit_costs(p.backbone, p.heads, samples, counted)


def save_predictions(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def base_report(p: Prepared, costs: ExitCosts, test_logits: torch.Tensor, test_labels: torch.Tensor) -> dict:
    acc = (test_logits.argmax(-1) == test_labels[:, None]).float().mean(0)  # (L,)
    return {
        "backbone": {
            "name": p.backbone.source,
            "architecture": p.backbone.arch,
            "num_layers": p.backbone.num_layers,
            "hidden_size": p.backbone.hidden_size,
            "pooling": p.backbone.pooling,
            "im_head": p.heads.im_head,
            "gflops_full": costs.gflops_full,
        },
        "dataset": {
            "name": p.raw.name,
            "num_classes": len(p.raw.label_names),
            "labels": p.raw.label_names,
            "splits": dict(p.splits.sizes),
            "duplicates_dropped": p.raw.duplicates_dropped,
        },
        "exits": {
            "layers": p.exit_layers,
            "cost": costs.cost,
            "cost_with_gates": costs.cost_with_gates,
            "gflops": costs.gflops,
            "test_accuracy": acc.tolist(),
            "cost_counted_on": costs.counted_on,
        },
    }


def gate_flops(variant: GateVariant, num_exits: int, hidden_size: int, num_classes: int) -> float:
    """FLOPs of one gate of ``variant`` on one sample, counted like every other component."""
    from jeidnn.cost import count_flops
    from jeidnn.gates import Gates
    from jeidnn.stage2 import gate_settings

    gates = Gates(num_exits, gate_settings(variant), hidden_size).eval()
    logits, hidden = torch.zeros(1, num_exits, num_classes), torch.zeros(1, num_exits - 1, hidden_size)
    with torch.no_grad():
        return count_flops(lambda: gates(logits, hidden)) / (num_exits - 1)


LEARNED_LABELS = {
    "jeidnn_paper": "JEI-DNN, paper preset",
}


def _learned_entries(variant: GateVariant, costs: list[float], models: list[dict]) -> dict[str, dict]:
    """report.json `learned` entries of one variant: as configured, and for a `native` variant also with
    the exit threshold chosen on calib (an extension sharing the same models)."""
    label = LEARNED_LABELS.get(variant.name, variant.name.replace("_", " "))
    settings = dataclasses.asdict(variant)
    entry = {
        "label": label + (" (extension)" if variant.extension else ""),
        "extension": variant.extension,
        "operating_point": variant.operating_point,
        "costs": costs,
        "settings": settings,
        "models": models,
    }
    entries = {variant.name: entry}
    if variant.operating_point == "native":
        entries[f"{variant.name}_tau"] = {
            **entry,
            "label": f"{label} + exit threshold on calib (extension)",
            "extension": True,
            "operating_point": "calib_threshold",
        }
    return entries


def train_stage2(
    p: Prepared, cache: dict[str, FeatureSplit], costs: ExitCosts, run_dir: Path, progress: bool
) -> tuple[dict[str, dict], dict[str, list], dict[str, dict]]:
    """Stage 2 for every variant and λ; writes each model's predictions and weights.

    Returns:
        report.json's `learned` entries, the trained models per variant (for the export), and every
        predictions file's tensors keyed by its path in the run folder.
    """
    from jeidnn.stage2 import fit_stage2

    cfg = p.cfg
    num_exits, hidden = p.heads.num_exits, p.backbone.hidden_size
    variant_costs = {
        v.name: costs.with_gates(gate_flops(v, num_exits, hidden, p.heads.num_classes))
        for v in cfg.jeidnn.variants
    }
    if cfg.logger == "tensorboard":
        logger = pl.loggers.TensorBoardLogger(save_dir=str(run_dir / "logs"), name="stage2")
    else:
        logger = pl.loggers.CSVLogger(save_dir=str(run_dir / "logs"), name="stage2")
    trained = fit_stage2(
        cache["train"].features,
        cache["train"].labels,
        cache["val"].features,
        cache["val"].labels,
        p.heads,
        {name: torch.tensor(c) for name, c in variant_costs.items()},
        cfg.jeidnn,
        seed=cfg.seed,
        trainer_kwargs={
            "accelerator": "cpu" if cfg.accelerator == "auto" else cfg.accelerator,
            "logger": logger,
            "enable_progress_bar": progress,
            "default_root_dir": str(run_dir),
        },
    )
    learned: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    for variant in cfg.jeidnn.variants:
        models = []
        for k, model in enumerate(trained[variant.name]):
            tensors = {}
            for split in ("val", "calib", "test"):
                features = cache[split].features
                with torch.no_grad():
                    logits = model.heads(features)  # (N, L, C)
                    tensors[f"{split}_scores"] = model.gates.scores(logits, features[:, :-1])  # (N, L-1)
                tensors[f"{split}_logits"] = logits
                tensors[f"{split}_labels"] = cache[split].labels
            rel = f"predictions/learned/{variant.name}/{k}.safetensors"
            save_predictions(run_dir / rel, tensors)
            predictions[rel] = tensors
            weights = {f"heads.{n}": v for n, v in model.heads.state_dict().items()}
            weights.update({f"gates.{n}": v for n, v in model.gates.state_dict().items()})
            save_predictions(run_dir / "checkpoints" / "learned" / variant.name / f"{k}.safetensors", weights)
            models.append(
                {
                    "lambda": model.lam,
                    "file": rel,
                    "val_cost": model.val_cost,
                    "val_accuracy": model.val_accuracy,
                }
            )
        learned.update(_learned_entries(variant, variant_costs[variant.name], models))
    return learned, trained, predictions


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Train and evaluate one run; returns the final report.json content."""
    timer = Timer()
    with timer.stage("load model and data"):
        p = prepare(cfg)
    run_dir = create_run_dir(cfg)
    print(f"[jeidnn] run folder: {run_dir}", flush=True)
    report_path = run_dir / "report.json"
    try:
        if cfg.finetune.enabled and cfg.finetune.epochs > 0:
            with timer.stage("stage 0: fine-tune backbone + final head"):
                finetune(p, run_dir, progress)
        freeze(p.backbone)
        freeze(p.heads.final)
        p.backbone.eval()
        cache: dict[str, FeatureSplit] = {}
        with timer.stage("feature cache"):
            for split in ("train", "val", "calib", "test"):
                with timer.stage(f"feature cache [{split}]", quiet=True):
                    cache[split] = extract_features(p.backbone, p.dm, split, p.exit_layers, progress)
        with timer.stage("stage 1: IM warm-up"):
            warmup(p, cache, run_dir, progress)
        with timer.stage("cost counting"):
            costs = count_costs(p)
        logits = {s: exit_logits(p.heads, cache[s]) for s in ("val", "calib", "test")}
        warm = {
            f"{s}_{k}": v for s in logits for k, v in (("logits", logits[s]), ("labels", cache[s].labels))
        }
        save_predictions(run_dir / "predictions" / "warmup.safetensors", warm)
        # Every prediction file also stays in memory for the evaluation (keyed by its path in the run).
        predictions = {"predictions/warmup.safetensors": warm}
        report = base_report(p, costs, logits["test"], cache["test"].labels)
        trained: dict[str, list] = {}
        if cfg.jeidnn.enabled and p.heads.num_exits > 1:
            with timer.stage("stage 2: learned gates, every variant and λ"):
                report["learned"], trained, learned_predictions = train_stage2(
                    p, cache, costs, run_dir, progress
                )
            predictions.update(learned_predictions)
            train_pass = timer.timings["feature cache [train]"]
            report["stage2_time_vs_train_pass"] = {
                "stage2_s": timer.timings["stage 2: learned gates, every variant and λ"],
                "train_pass_s": train_pass,
                "ratio": timer.timings["stage 2: learned gates, every variant and λ"] / max(train_pass, 1e-9),
            }
        with timer.stage("stages 3-4: calibrate, baselines, evaluate"):
            from jeidnn.evaluation import evaluate

            report = evaluate(report, run_dir, cfg.eval, cfg.seed, tensors=predictions)
        if trained:
            with timer.stage("export model"):
                report["export"] = export_model(p, report, trained, run_dir, predictions)
        report["timings_s"] = dict(timer.timings)
        write_json_atomic(report_path, report)
    except BaseException:
        report_path.unlink(missing_ok=True)
        (run_dir / "FAILED").write_text("this run did not finish; its outputs are incomplete\n")
        raise
    return report


def export_model(
    p: Prepared, report: dict, trained: dict[str, list], run_dir: Path, predictions: dict[str, dict]
) -> dict:
    """Write the default operating point (`export.method`, else the best learned one on calib half A within
    `export.cost_budget`) to `runs/<name>/model/` with its conformal quantiles; see :mod:`jeidnn.export`.
    `trained` and `predictions` are stage 2's models and every predictions file, already in memory."""
    from jeidnn.export import export_trained

    return export_trained(
        p.cfg,
        report,
        run_dir,
        p.backbone,
        p.dm.preprocessor,
        trained=trained,
        warmup_heads=p.heads,
        tensors=predictions,
    )
