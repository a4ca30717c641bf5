"""The whole run: config -> data -> model -> stage 0..4 -> report.json -> exported model.

`train.py` is a thin recipe over these functions; every piece can be imported and tested. A run records each
finished stage and continues from there with `--resume true` (:mod:`jeidnn.pipeline.resume`); with `devices` > 1,
stage 0, the joint phase and the feature cache run in several processes (:mod:`jeidnn.train.devices`). The
`regime` decides what trains the backbone before the cache: stage 0 (`disjoint`), the joint phase
(`joint`), or both (`mixed`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file

from jeidnn.config.schema import RunConfig
from jeidnn.data.datamodule import (
    SPLITS,
    JeidnnDataModule,
    RawData,
    Splits,
    load_raw,
    make_splits,
    model_inputs,
)
from jeidnn.errors import JeidnnError
from jeidnn.model.backbone import Backbone
from jeidnn.model.cost import ExitCosts, exit_costs, text_cost_samples
from jeidnn.model.heads import ExitHeads
from jeidnn.model.preprocess import build_preprocessor
from jeidnn.pipeline.resume import RunState, mark_failed, open_run_dir, pause_point, worker_state
from jeidnn.train.devices import check_logger, end_processes, global_rank, make_trainer, run_device
from jeidnn.train.features import FeatureSplit, extract_features
from jeidnn.train.finetune import exit_weights, final_head_without_finetune, finetune, regime_entry
from jeidnn.train.learned import save_predictions, train_stage2
from jeidnn.train.modules import WarmupModule, exit_logits, feature_loader, freeze

logger = logging.getLogger(__name__)


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
    device: torch.device
    """Where the backbone passes run (feature cache, cost counting): `cfg.accelerator` resolved."""


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
    from jeidnn.evaluate.methods import check_export_method

    check_export_method(cfg)  # before any work: a bad export.method would only fail at the end
    device = run_device(cfg.accelerator)
    check_logger(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    backbone = Backbone.load(cfg.model)
    raw = load_raw(cfg.data, backbone.modality)
    splits = make_splits(len(raw.labels), cfg.data, cfg.seed)
    train_inputs = [raw.inputs[i] for i in splits.indices["train"]]
    preprocessor = build_preprocessor(
        cfg.model, backbone, train_inputs if backbone.modality == "text" else None
    )
    dm = JeidnnDataModule(cfg.data, raw, splits, preprocessor, cfg.model.max_length, cfg.seed)
    dm.setup()
    layers = exit_layers_of(cfg, backbone.num_layers)
    if cfg.regime != "disjoint":
        exit_weights(cfg, len(layers))  # one weight per exit, refused before any folder exists
    heads = ExitHeads(
        layers,
        backbone.hidden_size,
        len(raw.label_names),
        backbone.spec.head_activation,
        dropout=backbone.classifier_dropout,
        im_head=cfg.model.im_head,
    )
    if backbone.pooling == "cls":
        _init_final_head_from_pooler(backbone, heads)
    return Prepared(cfg, backbone, raw, splits, dm, heads, layers, device)


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


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Timer:
    """Wall-clock seconds per stage, logged as each stage starts and ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, quiet: bool = False):
        start = time.perf_counter()
        if not quiet:
            logger.info("%s ...", name)
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        if not quiet:
            logger.info("%s done in %.1f s", name, self.timings[name])


def save_backbone(p: Prepared, run_dir: Path) -> None:
    """The frozen backbone as a Hugging Face folder (safetensors + tokenizer / image processor) in
    `backbone/`, and the final head in `checkpoints/final_head.safetensors`.

    `Backbone.load` of the folder pools as this run does: a mean-pooling run also writes the
    sentence-transformers pooling config that selects it.
    """
    folder = run_dir / "backbone"
    p.backbone.model.save_pretrained(folder)
    if hasattr(p.dm.preprocessor, "save_pretrained"):
        p.dm.preprocessor.save_pretrained(folder)
    if p.backbone.pooling == "mean":
        (folder / "1_Pooling").mkdir(exist_ok=True)
        modes = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    head = {k: v.contiguous() for k, v in p.heads.final.state_dict().items()}
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    save_file(head, str(run_dir / "checkpoints" / "final_head.safetensors"))


def load_backbone(p: Prepared, run_dir: Path) -> None:
    """The weights :func:`save_backbone` wrote, into the prepared backbone and final head."""
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(
        (run_dir / "backbone").glob("model*.safetensors")
    ):  # one file, or shards of a big one
        weights.update(load_file(str(shard)))
    p.backbone.model.load_state_dict(weights)
    p.heads.final.load_state_dict(load_file(str(run_dir / "checkpoints" / "final_head.safetensors")))


def stage0(
    p: Prepared, state: RunState, run_dir: Path, timer: Timer, progress: bool, skipped: dict | None
) -> bool:
    """Stage 0 (`skipped` None) or its saved result; writes `backbone/`. Returns whether stage 1 must train
    the final head (stage 0 off and no trained classifier in the checkpoint)."""
    if state.finished("stage0"):
        load_backbone(p, run_dir)
        return bool(state.info["train_final_head"])
    name = "stage 0: fine-tune backbone + final head"
    if skipped is None:
        with timer.stage(name):
            summary = finetune(p, run_dir, progress, resume=p.cfg.resume)
        pause_point("stage0:trained")
    train_final = skipped is not None and skipped["train_final_head"]
    if state.run_dir is not None:
        save_backbone(p, run_dir)
        times = {name: timer.timings[name]} if skipped is None else {}
        finetune_entry = summary if skipped is None else skipped["finetune"]
        state.mark("stage0", times, finetune=finetune_entry, train_final_head=train_final)
    return train_final


JOINT = "joint phase: backbone + every exit"
JOINT_WEIGHTS = "checkpoints/joint.safetensors"


def joint_phase(p: Prepared, state: RunState, run_dir: Path, timer: Timer, progress: bool) -> None:
    """The joint phase of `regime: joint | mixed` (or its saved result), then `backbone/` and the final head
    rewritten with its weights.

    Its weights (backbone and every exit) are saved before the stage is recorded and `backbone/` is rewritten
    after: a mixed run killed in between still finds stage 0's backbone there to restart the phase from.
    """
    path = run_dir / JOINT_WEIGHTS
    if state.finished("joint"):
        weights = load_file(str(path))
        p.backbone.model.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("backbone.")})
        p.heads.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("heads.")})
    else:
        with timer.stage(JOINT):
            summary = finetune(p, run_dir, progress, resume=p.cfg.resume, phase="joint")
        pause_point("joint:trained")
        if state.run_dir is None:
            return
        # Clones: safetensors refuses tensors that share memory (tied weights).
        weights = {f"backbone.{k}": v.clone() for k, v in p.backbone.model.state_dict().items()}
        weights.update({f"heads.{k}": v.clone() for k, v in p.heads.state_dict().items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        state.mark("joint", {JOINT: timer.timings[JOINT]}, joint=summary)
    if state.run_dir is not None:
        save_backbone(p, run_dir)


def feature_cache(
    p: Prepared, state: RunState, run_dir: Path, timer: Timer, progress: bool
) -> dict[str, FeatureSplit] | None:
    """Each split's features, computed once (in `devices` processes) and kept in `cache/` until the run
    ends; None in processes other than the first, whose work ends here."""
    p.backbone.eval()
    trainer = None
    cache: dict[str, FeatureSplit] = {}
    with timer.stage("feature cache"):
        for split in SPLITS:
            path = run_dir / "cache" / f"{split}.safetensors"
            if state.finished(f"cache:{split}"):
                if state.run_dir is not None:
                    cache[split] = FeatureSplit.load(path)
                continue
            if trainer is None:
                # progress=False: the cache shows its own bar per split; Lightning's would be a second one.
                trainer = make_trainer(p.cfg, run_dir, "cache", False, distributed=True, logger=False)
            name = f"feature cache [{split}]"
            with timer.stage(name, quiet=True):
                features = extract_features(p.backbone, p.dm, split, p.exit_layers, progress, trainer=trainer)
            if features is not None and state.run_dir is not None:
                features.save(path)
                state.mark(f"cache:{split}", {name: timer.timings[name]})
                cache[split] = features
                pause_point(f"cache:{split}")
    if state.run_dir is None:
        return None
    for phase in ("finetune", "joint"):  # every process is past stage 0 and the joint phase
        shutil.rmtree(run_dir / "checkpoints" / phase, ignore_errors=True)
    return cache


def warmup(
    p: Prepared, cache: dict[str, FeatureSplit], run_dir: Path, progress: bool, train_final: bool = False
) -> list[int]:
    """Stage 1: IMs (and the final head when `train_final`) on cached features; returns each trained head's
    best epoch (-1: the joint phase's weights were kept)."""
    cfg = p.cfg.warmup
    pl.seed_everything(p.cfg.seed, verbose=False)
    keep_start = p.cfg.regime != "disjoint"  # IMs trained in the joint phase: keep them unless beaten on val
    module = WarmupModule(p.heads, cache["val"], cfg, train_final=train_final, keep_start=keep_start)
    if module.trained and cfg.max_epochs > 0:
        trainer = make_trainer(
            p.cfg, run_dir, "warmup", progress, max_epochs=cfg.max_epochs, enable_checkpointing=False
        )
        trainer.fit(module, feature_loader(cache["train"], cfg.batch_size, True, p.cfg.seed))
        module.restore_best()
    p.heads.eval()
    save_file(
        {k: v.contiguous() for k, v in p.heads.state_dict().items()},
        str(run_dir / "checkpoints" / "warmup_heads.safetensors"),
    )
    return module.best_epoch


def count_costs(p: Prepared) -> ExitCosts:
    """FLOPs of every exit, counted on the configured device."""
    ds = p.dm.datasets["test"]
    if p.raw.modality == "text":
        samples = text_cost_samples(ds.encoded)
        counted = f"mean over the test split's real token lengths ({len(ds)} samples, unpadded)"
    else:
        batch = p.dm.collator([ds[i] for i in range(min(8, len(ds)))])
        samples = [(model_inputs(batch, p.backbone.input_names), 1.0)]
        counted = "test images (all the same size)"
    samples = [({k: v.to(p.device) for k, v in inputs.items()}, weight) for inputs, weight in samples]
    p.backbone.to(p.device)
    p.heads.to(p.device)
    try:
        return exit_costs(p.backbone, p.heads, samples, counted)
    finally:
        p.backbone.cpu()
        p.heads.cpu()


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


STAGE2 = "stage 2: learned gates, every variant and λ"


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Train and evaluate one run; returns the final report.json content.

    Every finished stage is recorded in `state.json`; with `cfg.resume` an interrupted run continues from
    there (:mod:`jeidnn.pipeline.resume`). A failure leaves a FAILED marker and every finished artifact; report.json
    is written once, at the end. With `devices` > 1 every process runs this function; the others stop after
    their share of the feature cache and return only their `rank` and `timings_s`.
    """
    rank = global_rank()
    if rank != 0:
        logging.getLogger("jeidnn").setLevel(logging.WARNING)  # progress is the first process's to report
    timer = Timer()
    with timer.stage("load model and data"):
        p = prepare(cfg)
        skipped = None
        if cfg.regime == "disjoint" and not (cfg.finetune.enabled and cfg.finetune.epochs > 0):
            entry, train_final = final_head_without_finetune(p)  # its errors come before any folder exists
            skipped = {"finetune": entry, "train_final_head": train_final}
    state = open_run_dir(cfg) if rank == 0 else worker_state(cfg)
    run_dir = cfg.run_dir
    logger.info("run folder: %s", run_dir)
    stage = "stage 0" if cfg.regime != "joint" else "joint phase"
    try:
        train_final = stage0(p, state, run_dir, timer, progress, skipped) if cfg.regime != "joint" else False
        if cfg.regime != "disjoint":
            stage = "joint phase"
            joint_phase(p, state, run_dir, timer, progress)
        freeze(p.backbone)
        freeze(p.heads.final)
        stage = "feature cache"
        cache = feature_cache(p, state, run_dir, timer, progress)
        end_processes()
        if cache is None:
            return {"rank": rank, "timings_s": dict(timer.timings)}
        stage = "stage 1"
        if state.finished("warmup"):
            p.heads.load_state_dict(load_file(str(run_dir / "checkpoints" / "warmup_heads.safetensors")))
        else:
            with timer.stage("stage 1: IM warm-up"):
                warmup(p, cache, run_dir, progress, train_final)
            state.mark("warmup", {"stage 1: IM warm-up": timer.timings["stage 1: IM warm-up"]})
            pause_point("warmup")
        p.heads.eval()
        stage = "cost counting"
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
        report["finetune"] = state.info.get(
            "finetune", {"skipped": "regime joint: the joint phase replaces it"}
        )
        trained: dict[str, list] = {}
        if cfg.jeidnn.enabled and p.heads.num_exits > 1:
            stage = "stage 2"
            with timer.stage(STAGE2):
                report["learned"], trained, learned_predictions = train_stage2(
                    p, cache, costs, run_dir, progress
                )
            state.mark("stage2", {STAGE2: timer.timings[STAGE2]})
            predictions.update(learned_predictions)
            timings = {**state.timings, **timer.timings}
            if "feature cache [train]" in timings:
                train_pass = timings["feature cache [train]"]
                report["stage2_time_vs_train_pass"] = {
                    "stage2_s": timings[STAGE2],
                    "train_pass_s": train_pass,
                    "ratio": timings[STAGE2] / max(train_pass, 1e-9),
                }
        report["regime"] = regime_entry(cfg, state.info, trained)
        # What `jeidnn evaluate` needs should the evaluation below fail.
        write_json_atomic(run_dir / "report.partial.json", report)
        stage = "stages 3-4"
        with timer.stage("stages 3-4: calibrate, baselines, evaluate"):
            from jeidnn.evaluate.evaluation import evaluate

            evaluation = evaluate(report, run_dir, cfg.eval, cfg.seed, tensors=predictions, progress=progress)
            report = evaluation.report
        # A baseline named in export.method is exported even without stage 2.
        if trained or (cfg.export.method and p.heads.num_exits > 1):
            stage = "export"
            with timer.stage("export model"):
                report["export"] = export_model(p, evaluation, trained, run_dir)
        report["timings_s"] = {**state.timings, **timer.timings}
        write_json_atomic(run_dir / "report.json", report)
        state.mark("report")
    except BaseException as exc:
        if rank == 0:
            mark_failed(run_dir, stage, exc, state)
        raise
    # Only needed to resume: the run is complete.
    for leftover in ("cache", "checkpoints/stage2"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    (run_dir / JOINT_WEIGHTS).unlink(missing_ok=True)
    (run_dir / "report.partial.json").unlink(missing_ok=True)
    return report


def export_model(p: Prepared, evaluation: Any, trained: dict[str, list], run_dir: Path) -> dict:
    """Write the default operating point (`export.method`, else the best learned one on calib half A within
    `export.cost_budget`) to `runs/<name>/model/` with its conformal quantiles; see :mod:`jeidnn.export.exporter`.
    `evaluation` is what the evaluation chose and `trained` stage 2's models, both in memory."""
    from jeidnn.export.exporter import export_trained

    return export_trained(
        p.cfg, evaluation, run_dir, p.backbone, p.dm.preprocessor, trained=trained, warmup_heads=p.heads
    )
