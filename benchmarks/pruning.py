"""Structured pruning, early exit, and both: test accuracy against FLOPs and against wall-clock.

For each pruning level ``p`` (the fraction of heads *and* of FFN neurons removed, ``jeidnn prune --heads p
--ffn p``) two models of one finished run:

* ``static``: every sample runs every layer and leaves at the last exit (no early exit);
* ``early exit``: the run's default operating point (what ``runs/<name>/model/`` plays), with the layers
  after its deepest exit on calib dropped (``--layers auto``; ``--layers none`` keeps them).

So ``p = 0`` static is the unpruned model, ``p = 0`` early exit is early exit alone, ``p > 0`` static is
pruning alone and ``p > 0`` early exit is both. Each model is built by
:func:`jeidnn.compress.pruning.prune_model` (importance on val, optional ``--recover-steps``); its test
accuracy and cost (FLOPs relative to the unpruned model, :mod:`jeidnn.model.cost`) are over the whole test
split. Wall-clock: the layer-skipping forward of every
model on the first ``--num-inputs`` test texts, timed with ``benchmarks/speed.py``'s functions, the models
interleaved batch by batch (rotating order) so that a busy spell of the machine hits all alike, each batch
counted at its best time over ``--repeats``.

Writes ``pruning.md`` (the command that made it at the top), ``pruning.json`` and ``pruning.png`` to
``--out`` (default ``benchmarks/results``).

Usage:
    python benchmarks/pruning.py runs/default
    python benchmarks/pruning.py runs/smoke --levels 0 0.5 --num-inputs 32 --out /tmp/pruning
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from speed import describe_device, run_test_texts, time_call, tokenised_batches  # noqa: E402

from jeidnn.errors import JeidnnError  # noqa: E402

REGIMES = ("static", "early exit")


def build_models(args: argparse.Namespace) -> tuple[list[dict], list]:
    """Every (level, regime) model with its row of results (accuracy, cost, sizes) but the timing."""
    from jeidnn.compress.pruning import PruneSettings, prune_model, run_data
    from jeidnn.export.exporter import build_model, load_backbone
    from jeidnn.export.operating_point import Run
    from jeidnn.export.selection import default_choice
    from jeidnn.hf.modeling import EarlyExitModel

    run = Run.open(args.run)
    point = default_choice(run)
    backbone, preprocessor = load_backbone(run)
    early, summary = build_model(run, point, backbone, preprocessor)
    static = EarlyExitModel.from_parts(
        backbone,
        early.heads,
        None,  # every sample to the last exit
        preprocessor,
        labels=early.labels,
        costs=run.costs,
        max_length=early.max_length,
        metadata={"run": run.cfg.name},
    ).eval()
    data = run_data(run, backbone, preprocessor)
    rows, models = [], []
    for level in args.levels:
        for regime, base in zip(REGIMES, (static, early), strict=True):
            settings = PruneSettings(
                heads=level,
                ffn=level,
                layers=(None if args.layers == "none" else "auto") if regime == "early exit" else None,
                recover_steps=args.recover_steps if level else 0,
                importance_samples=args.importance_samples,
            )
            calib_exits = point.candidate.calib_exits if regime == "early exit" else None
            model, info = prune_model(
                run, base, settings, data, calib_exits=calib_exits, device=args.device, progress=False
            )
            rows.append(
                {
                    "level": level,
                    "regime": regime,
                    "parameters": info["parameters_after"],
                    "layers_kept": info["layers_kept"],
                    "heads_per_layer": info["heads_per_layer"]["after"],
                    "ffn_per_layer": info["ffn_per_layer"]["after"],
                    "test_accuracy": info["test_accuracy"],
                    "test_cost": info["test_cost"],
                    "test_exit_fractions": info["test_exit_fractions"],
                }
            )
            models.append(model)
            accuracy, cost = info["test_accuracy"], info["test_cost"]
            print(f"built p={level:g} {regime}: test accuracy {accuracy:.4f}, cost {cost:.3f}")
    point_info = {
        "method": point.method,
        "label": point.label,
        "budget": point.budget,
        "param": summary["param"],
    }
    return rows, models, point_info


@torch.inference_mode()
def time_models(models: list, texts: list[str], batch_size: int, repeats: int, device: str) -> list[float]:
    """Milliseconds per sample of each model's layer-skipping forward on ``texts``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for model in models:
        model.eval().to(device)
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in tokenised_batches(models[0], texts, batch_size, sort=False)  # one tokenizer for all
    ]
    for model in models:  # warm-up: allocator, thread pool, kernels for these shapes
        for batch in batches[:3]:
            model.forward_dynamic(batch)
    times = [[[] for _ in batches] for _ in models]  # times[model][batch]: seconds per repeat
    for r in range(repeats):
        for j, batch in enumerate(batches):
            shift = (r + j) % len(models)
            for m in list(range(len(models)))[shift:] + list(range(len(models)))[:shift]:
                times[m][j].append(time_call(models[m].forward_dynamic, batch, sync))
    return [1000 * sum(min(t) for t in per_batch) / len(texts) for per_batch in times]


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for regime, marker in zip(REGIMES, ("o", "s"), strict=True):
        mine = [r for r in rows if r["regime"] == regime]
        acc = [100 * r["test_accuracy"] for r in mine]
        for ax, key in zip(axes, ("test_cost", "ms_per_sample"), strict=True):
            xs = [r[key] for r in mine]
            ax.plot(xs, acc, marker=marker, label=regime)
            for r, x, y in zip(mine, xs, acc, strict=True):
                ax.annotate(
                    f"p={r['level']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    axes[0].set_xlabel("cost (FLOPs relative to the unpruned model)")
    axes[1].set_xlabel("wall-clock (ms per sample)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("pruning (p = fraction of heads and of FFN neurons removed) x early exit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    base = next(r for r in result["rows"] if r["level"] == 0 and r["regime"] == "static")
    recover = f" --recover-steps {result['recover_steps']}" if result["recover_steps"] else ""
    lines = [
        "# Structured pruning x early exit",
        "",
        f"Generated by `{result['command']}` at commit {result['commit']}; do not edit by hand.",
        "",
        f"Run `{result['run']}`; early exit = its default operating point {result['operating_point']}. "
        "Pruning level p = the fraction of attention heads and of FFN neurons removed (`jeidnn prune "
        f"--heads p --ffn p{recover}`), "
        "by gradient importance on val. Accuracy and cost (FLOPs relative to the unpruned model) over the "
        f"whole test split; wall-clock: the layer-skipping forward on {result['timed_on']}, batch "
        f"{result['batch_size']}, best of {result['repeats']} per batch, on {result['device']}.",
        "",
        "| p | regime | layers | parameters | test accuracy (%) | cost | ms / sample | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['level']:g} | {r['regime']} | {r['layers_kept']} | {r['parameters']:,} | "
            f"{100 * r['test_accuracy']:.1f} | {r['test_cost']:.3f} | {r['ms_per_sample']:.3f} | "
            f"{base['ms_per_sample'] / r['ms_per_sample']:.2f}x |"
        )
    lines += [
        "",
        "Speed-up: against the unpruned static model (p = 0, static). ![plot](pruning.png)",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/default", help="a finished run folder")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--layers", choices=["auto", "none"], default="auto", help="early exit: drop layers?")
    parser.add_argument("--recover-steps", type=int, default=0, help="recovery steps of each pruned model")
    parser.add_argument("--importance-samples", type=int, default=1024, help="val samples scored")
    parser.add_argument("--num-inputs", type=int, default=512, help="test texts timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results", help="folder of pruning.md / .json / .png")
    args = parser.parse_args(argv)
    if 0.0 not in args.levels:
        args.levels = [0.0, *args.levels]  # the unpruned models are the reference
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows, models, point = build_models(args)
        texts, source = run_test_texts(Path(args.run), args.num_inputs)
    except JeidnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for row, ms in zip(
        rows, time_models(models, texts, args.batch_size, args.repeats, args.device), strict=True
    ):
        row["ms_per_sample"] = ms
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "command": " ".join(["python benchmarks/pruning.py", *argv]),
        "commit": commit or "unknown",
        "run": args.run,
        "operating_point": point,
        "recover_steps": args.recover_steps,
        "timed_on": source,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": describe_device(args.device),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pruning.md").write_text(markdown(result))
    plot(rows, out / "pruning.png")
    print(markdown(result))
    print(f"wrote {out / 'pruning.md'}, pruning.json, pruning.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
