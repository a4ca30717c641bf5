"""The whole run: config -> data -> model -> stage 0..4 -> report.json -> exported model.

`train.py` is a thin recipe over these functions; every piece can be imported and tested. This module wires
the run context, the resume state and the ORDER of the stages; their bodies live in :mod:`jeidnn.train`
(and :mod:`jeidnn.evaluate`, :mod:`jeidnn.export`). A run records each finished stage and continues from there
with `--resume true` (:mod:`jeidnn.pipeline.resume`); with `devices` > 1, stage 0, the joint phase and the
feature cache run in several processes (:mod:`jeidnn.train.devices`). The `regime` decides what trains the
backbone before the cache: stage 0 (`disjoint`), the joint phase (`joint`), or both (`mixed`).
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager

from jeidnn.config.schema import RunConfig
from jeidnn.data.splits import SPLITS
from jeidnn.evaluate.evaluation import evaluate
from jeidnn.evaluate.methods import check_export_method
from jeidnn.evaluate.predictions import WARMUP_PREDICTIONS, RunPredictions
from jeidnn.evaluate.selection import Evaluation
from jeidnn.export.exporter import export_trained
from jeidnn.export.selection import check_selection
from jeidnn.io import write_json, write_safetensors
from jeidnn.log import pause_point
from jeidnn.pipeline.resume import RunState, mark_failed, open_run_dir, worker_state
from jeidnn.train import checkpoints, finetune
from jeidnn.train.context import RunContext
from jeidnn.train.costs import count_exit_costs
from jeidnn.train.devices import (
    check_logger,
    end_processes,
    global_rank,
    make_trainer,
    run_device,
    run_precision,
    trainer_device,
)
from jeidnn.train.features import FeatureSplit, extract_features
from jeidnn.train.inputs import RunInputs, load_inputs
from jeidnn.train.learned import train_stage2
from jeidnn.train.modules import freeze
from jeidnn.train.report import CROSSFIT_TIMING, STAGE2_TIMING, training_report
from jeidnn.train.results import FeatureCache, JointResult, Stage0Result, WarmupResult
from jeidnn.train.warmup import warm_up, warmup_result

logger = logging.getLogger(__name__)

STAGE0 = "stage 0: fine-tune backbone + final head"
JOINT = "joint phase: backbone + every exit"
WARMUP = "stage 1: IM warm-up"


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


def prepare(cfg: RunConfig, progress: bool = True) -> tuple[RunContext, RunInputs]:
    """The run context and the loaded, checked model and data; raises JeidnnError on any bad input, before
    the run folder exists."""
    check_export_method(cfg)  # a bad export.method would otherwise fail only at the end of the run
    check_selection(cfg)
    device = run_device(cfg.accelerator)
    trainer_device(cfg.accelerator, cfg.devices)  # refuses cuda:N with devices > 1
    precision = run_precision(cfg.precision, device)
    check_logger(cfg)
    return RunContext(cfg, cfg.run_dir, device, progress, precision), load_inputs(cfg)


def stage0(
    ctx: RunContext, inputs: RunInputs, state: RunState, timer: Timer, skipped: Stage0Result | None
) -> Stage0Result:
    """Stage 0 (`skipped` None) or its saved result, in `inputs.backbone` and `inputs.heads.final` (in place);
    writes `backbone/`."""
    if state.finished("stage0"):
        checkpoints.restore_saved_backbone(inputs.backbone, inputs.heads.final, ctx.run_dir)
        return Stage0Result(state.info["finetune"], bool(state.info["train_final_head"]))
    result = skipped
    if result is None:
        with timer.stage(STAGE0):
            result = finetune.stage0(ctx, inputs.backbone, inputs.heads, inputs.dm)
        pause_point("stage0:trained")
    if state.run_dir is not None:
        checkpoints.save_backbone(inputs.backbone, inputs.heads.final, inputs.dm.preprocessor, ctx.run_dir)
        times = {STAGE0: timer.timings[STAGE0]} if skipped is None else {}
        state.mark("stage0", times, finetune=result.finetune, train_final_head=result.train_final_head)
    return result


def joint_phase(ctx: RunContext, inputs: RunInputs, state: RunState, timer: Timer) -> JointResult:
    """The joint phase of `regime: joint | mixed` (or its saved result), in `inputs.backbone` and
    `inputs.heads` (in place), then `backbone/` and the final head rewritten with its weights.

    Its weights (backbone and every exit) are saved before the stage is recorded and `backbone/` is rewritten
    after: a mixed run killed in between still finds stage 0's backbone there to restart the phase from.
    """
    if state.finished("joint"):
        checkpoints.restore_joint_weights(inputs.backbone, inputs.heads, ctx.run_dir)
        result = JointResult(state.info["joint"])
    else:
        with timer.stage(JOINT):
            result = finetune.joint_phase(ctx, inputs.backbone, inputs.heads, inputs.dm)
        pause_point("joint:trained")
        if state.run_dir is None:
            return result
        checkpoints.save_joint_weights(inputs.backbone, inputs.heads, ctx.run_dir)
        state.mark("joint", {JOINT: timer.timings[JOINT]}, joint=result.summary)
    if state.run_dir is not None:
        checkpoints.save_backbone(inputs.backbone, inputs.heads.final, inputs.dm.preprocessor, ctx.run_dir)
    return result


def feature_cache(ctx: RunContext, inputs: RunInputs, state: RunState, timer: Timer) -> FeatureCache | None:
    """Each split's features, computed once (in `devices` processes) and kept in `cache/` until the run
    ends; None in processes other than the first, whose work ends here."""
    inputs.backbone.eval()
    trainer = None
    cache: dict[str, FeatureSplit] = {}
    with timer.stage("feature cache"):
        for split in SPLITS:
            path = ctx.run_dir / "cache" / f"{split}.safetensors"
            if state.finished(f"cache:{split}"):
                if path.is_file():
                    if state.run_dir is not None:
                        cache[split] = FeatureSplit.load(path)
                    continue
                # A finished run deletes its cache; reopened for later stages, it computes it again.
                logger.info("feature cache [%s]: gone from %s, computed again", split, path.parent)
            if trainer is None:
                # progress=False: the cache shows its own bar per split; Lightning's would be a second one.
                trainer = make_trainer(ctx.cfg, ctx.run_dir, "cache", False, distributed=True, logger=False)
            name = f"feature cache [{split}]"
            with timer.stage(name, quiet=True):
                features = extract_features(
                    inputs.backbone, inputs.dm, split, inputs.heads.layers, ctx.progress, trainer=trainer
                )
            if features is not None and state.run_dir is not None:
                features.save(path)
                state.mark(f"cache:{split}", {name: timer.timings[name]})
                cache[split] = features
                pause_point(f"cache:{split}")
    if state.run_dir is None:
        return None
    for phase in ("finetune", "joint"):  # every process is past stage 0 and the joint phase
        shutil.rmtree(ctx.run_dir / "checkpoints" / phase, ignore_errors=True)
    return FeatureCache(cache)


def warmup(
    ctx: RunContext, inputs: RunInputs, state: RunState, timer: Timer, cache: FeatureCache, train_final: bool
) -> WarmupResult:
    """Stage 1 (or its saved exits), in `inputs.heads` (in place), and the warmed-up exits' predictions."""
    best_epoch = None
    if state.finished("warmup"):
        checkpoints.restore_warmup_heads(inputs.heads, ctx.run_dir)
    else:
        with timer.stage(WARMUP):
            best_epoch = warm_up(ctx, inputs.heads, cache, train_final)
            checkpoints.save_warmup_heads(inputs.heads, ctx.run_dir)
        state.mark("warmup", {WARMUP: timer.timings[WARMUP]})
        pause_point("warmup")
    return warmup_result(inputs.heads, cache, best_epoch)


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Train and evaluate one run; returns the final report.json content.

    Every finished stage is recorded in `state.json`; with `cfg.resume` an interrupted run continues from
    there (:mod:`jeidnn.pipeline.resume`). A failure leaves a FAILED marker and every finished artifact;
    report.json is written once, at the end. With `devices` > 1 every process runs this function; the others
    stop after their share of the feature cache and return only their `rank` and `timings_s`.
    """
    rank = global_rank()
    if rank != 0:
        logging.getLogger("jeidnn").setLevel(logging.WARNING)  # progress is the first process's to report
    timer = Timer()
    with timer.stage("load model and data"):
        ctx, inputs = prepare(cfg, progress)
        skipped = None
        if cfg.regime == "disjoint" and not (cfg.finetune.enabled and cfg.finetune.epochs > 0):
            # Its errors come before any folder exists.
            skipped = finetune.final_head_without_finetune(
                cfg, inputs.raw.label_names, inputs.backbone.pooling, inputs.heads.final
            )
    state = open_run_dir(cfg) if rank == 0 else worker_state(cfg)
    run_dir = ctx.run_dir
    logger.info("run folder: %s", run_dir)
    stage = "stage 0" if cfg.regime != "joint" else "joint phase"
    try:
        s0 = stage0(ctx, inputs, state, timer, skipped) if cfg.regime != "joint" else None
        joint = None
        if cfg.regime != "disjoint":
            stage = "joint phase"
            joint = joint_phase(ctx, inputs, state, timer)
        freeze(inputs.backbone)
        freeze(inputs.heads.final)
        # Trained in float32; from here on the backbone serves in model.dtype (the exported model's).
        inputs.backbone.to(inputs.dtype)
        stage = "feature cache"
        cache = feature_cache(ctx, inputs, state, timer)
        end_processes()
        if cache is None:
            return {"rank": rank, "timings_s": dict(timer.timings)}
        stage = "stage 1"
        warm = warmup(ctx, inputs, state, timer, cache, s0 is not None and s0.train_final_head)
        stage = "cost counting"
        with timer.stage("cost counting"):
            costs = count_exit_costs(inputs.backbone, inputs.heads, inputs.dm, ctx.device)
        write_safetensors(run_dir / WARMUP_PREDICTIONS, warm.tensors())
        stage2 = None
        if cfg.jeidnn.enabled and inputs.heads.num_exits > 1:
            stage = "stage 2"
            with timer.stage(STAGE2_TIMING):
                stage2 = train_stage2(ctx, inputs.backbone, inputs.heads, inputs.dm, cache, costs)
            if stage2.crossfit_s is not None:
                timer.timings[CROSSFIT_TIMING] = stage2.crossfit_s
            state.mark("stage2", {k: v for k, v in timer.timings.items() if k.startswith("stage 2")})
        timings = {**state.timings, **timer.timings}
        report = training_report(cfg, inputs, costs, warm, s0, joint, stage2, timings, ctx.precision)
        # What `jeidnn evaluate` needs should the evaluation below fail.
        write_json(run_dir / "report.partial.json", report)
        trained = stage2.models if stage2 is not None else {}
        predictions = RunPredictions.from_training(warm, stage2, report)
        stage = "stages 3-4"
        with timer.stage("stages 3-4: calibrate, baselines, evaluate"):
            evaluation = evaluate(
                report, run_dir, cfg.eval, cfg.seed, predictions=predictions, progress=progress
            )
            report = evaluation.report
        # Baselines are exported too, so a run without stage 2 exports one.
        if inputs.heads.num_exits > 1:
            stage = "export"
            with timer.stage("export model"):
                report["export"] = export_model(ctx, inputs, evaluation, trained)
        report["timings_s"] = {**state.timings, **timer.timings}
        write_json(run_dir / "report.json", report)
        state.mark("report")
    except BaseException as exc:
        if rank == 0:
            mark_failed(run_dir, stage, exc, state)
        raise
    # Only needed to resume: the run is complete.
    for leftover in ("cache", "checkpoints/stage2"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    (run_dir / checkpoints.JOINT_WEIGHTS).unlink(missing_ok=True)
    (run_dir / "report.partial.json").unlink(missing_ok=True)
    return report


def export_model(
    ctx: RunContext, inputs: RunInputs, evaluation: Evaluation, trained: dict[str, list]
) -> dict:
    """Write the operating point `export.selection` picks (default: of every method's calib-A choice within
    `export.cost_budget`, the one most accurate on val) to `runs/<name>/model/` with its conformal quantiles
    and model card; see :mod:`jeidnn.export.exporter` and :mod:`jeidnn.export.selection`. `evaluation` is
    what the evaluation chose and `trained` stage 2's models, both in memory."""
    return export_trained(
        ctx.cfg,
        evaluation,
        ctx.run_dir,
        inputs.backbone,
        inputs.dm.preprocessor,
        trained=trained,
        warmup_heads=inputs.heads,
    )
