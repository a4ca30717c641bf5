"""The whole run: config -> data -> model -> stage 0..4 -> report.json -> exported model.

`train.py` is a thin recipe over these functions; every piece can be imported and tested.
"""

from __future__ import annotations

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
from jeidnn.config import RunConfig
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


def train_lambdas(
    p: Prepared, cache: dict[str, FeatureSplit], costs: ExitCosts, run_dir: Path, progress: bool
) -> list[dict]:
    """Stage 2 for every λ at once (one model per λ, trained side by side on the same batches);
    writes each λ's predictions and weights, returns per-λ summaries (val cost etc.)."""
    from jeidnn.gates import exit_decision
    from jeidnn.jeidnn_module import predict_exits
    from jeidnn.sweep import train_jeidnn_sweep

    cost_g = torch.tensor(costs.cost_with_gates)
    lambdas = list(p.cfg.jeidnn.lambdas)
    print(f"[jeidnn] training {len(lambdas)} JEI-DNN models side by side, λ = {lambdas}", flush=True)
    results = train_jeidnn_sweep(
        cache["train"].features,
        cache["train"].labels,
        cache["val"].features,
        cache["val"].labels,
        p.heads,
        cost_g,
        lambdas,
        p.cfg.jeidnn,
        default_root_dir=str(run_dir),
        enable_progress_bar=progress,
        seed=p.cfg.seed,
        logger=pl.loggers.CSVLogger(str(run_dir / "logs"), name="jeidnn"),
        accelerator="cpu" if p.cfg.accelerator == "auto" else p.cfg.accelerator,
    )
    out = []
    for i, (lam, result) in enumerate(zip(lambdas, results)):
        tensors = {}
        for split in ("val", "calib", "test"):
            logits, gates, _ = predict_exits(result.heads, result.gates, cache[split].features)
            tensors[f"{split}_logits"] = logits
            tensors[f"{split}_labels"] = cache[split].labels
            tensors[f"{split}_gates"] = gates
        save_predictions(run_dir / "predictions" / f"jeidnn_{i}.safetensors", tensors)
        weights = {f"heads.{k}": v for k, v in result.heads.state_dict().items()}
        weights.update({f"gates.{k}": v for k, v in result.gates.state_dict().items()})
        save_predictions(run_dir / "checkpoints" / f"jeidnn_{i}.safetensors", weights)
        val_exit = exit_decision(tensors["val_gates"])
        out.append(
            {
                "lambda": lam,
                "val_cost": cost_g[val_exit].mean().item(),
                "heads": result.heads,
                "gates": result.gates,
            }
        )
    return out


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
        save_predictions(
            run_dir / "predictions" / "warmup.safetensors",
            {
                **{f"{s}_logits": logits[s] for s in logits},
                **{f"{s}_labels": cache[s].labels for s in logits},
            },
        )
        report = base_report(p, costs, logits["test"], cache["test"].labels)
        lambdas: list[dict] = []
        if cfg.jeidnn.enabled and p.heads.num_exits > 1:
            with timer.stage("stage 2: JEI-DNN λ sweep"):
                lambdas = train_lambdas(p, cache, costs, run_dir, progress)
            report["jeidnn_lambdas"] = [x["lambda"] for x in lambdas]
            report["jeidnn_val_cost"] = [x["val_cost"] for x in lambdas]
        report["timings_s"] = dict(timer.timings)
        # report.json exists from here on; if anything below fails it is removed again.
        write_json_atomic(report_path, report)
        with timer.stage("stages 3-4: calibrate, baselines, evaluate"):
            from jeidnn.evaluation import evaluate_run

            report = evaluate_run(run_dir, write=True)
        if lambdas:
            with timer.stage("export model"):
                report["export"] = export_model(p, lambdas, costs, run_dir)
        report["timings_s"] = dict(timer.timings)
        write_json_atomic(report_path, report)
    except BaseException:
        report_path.unlink(missing_ok=True)
        (run_dir / "FAILED").write_text("this run did not finish; its outputs are incomplete\n")
        raise
    return report


def export_model(p: Prepared, lambdas: list[dict], costs: ExitCosts, run_dir: Path) -> dict:
    """Write the chosen λ's early-exit model to `runs/<name>/model/` with its conformal quantiles."""
    from safetensors.torch import load_file

    from jeidnn.conformal import fit_conformal
    from jeidnn.early_exit import EarlyExitModel
    from jeidnn.evaluation import choose_lambda
    from jeidnn.gates import exit_decision

    cfg = p.cfg
    index = choose_lambda(
        [x["lambda"] for x in lambdas],
        [x["val_cost"] for x in lambdas],
        cfg.export.lam,
        cfg.export.cost_budget,
    )
    if cfg.export.lam is not None:
        reason = f"export.lam = {cfg.export.lam}"
    else:
        reason = f"val cost closest to export.cost_budget = {cfg.export.cost_budget}"
    chosen = lambdas[index]
    calib = load_file(str(run_dir / "predictions" / f"jeidnn_{index}.safetensors"))
    exits = exit_decision(calib["calib_gates"])  # (N,)
    probs = calib["calib_logits"].softmax(-1)[torch.arange(len(exits)), exits]  # (N, C) at the exit taken
    quantiles, fallbacks = {}, {}
    for alpha in sorted(set(cfg.eval.alphas) | {cfg.export.alpha}):
        fitted = fit_conformal(
            probs, calib["calib_labels"], exits, p.heads.num_exits, alpha, cfg.eval.conformal_min_samples
        )
        quantiles[str(alpha)] = fitted.quantiles.tolist()
        fallbacks[str(alpha)] = fitted.fallback_exits
    model = EarlyExitModel(
        p.backbone,
        chosen["heads"],
        chosen["gates"],
        p.dm.preprocessor,
        labels=p.raw.label_names,
        costs=costs.cost_with_gates,
        conformal_quantiles=quantiles,
        max_length=cfg.model.max_length,
        metadata={
            "lambda": chosen["lambda"],
            "val_cost": chosen["val_cost"],
            "gflops_full": costs.gflops_full,
            "run": cfg.name,
            "default_alpha": cfg.export.alpha,
            "chosen_by": reason,
        },
    )
    model.save_pretrained(run_dir / "model")
    return {
        "path": "model",
        "lambda": chosen["lambda"],
        "lambda_index": index,
        "val_cost": chosen["val_cost"],
        "chosen_by": reason,
        "conformal_fallback_exits": fallbacks,
    }
