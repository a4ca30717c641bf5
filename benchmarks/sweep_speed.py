"""Wall-clock time of a stage-2 λ sweep: ``train_jeidnn`` for one λ against ``train_jeidnn_sweep`` for all.

Random cached features of the default run's size (22.9k train and 3.8k val samples, 6 exits, hidden 384,
3 classes) and randomly initialised heads, with the default stage-2 settings (batch 64, 10 epochs, 7 λ).
Both sides run in this process, one after the other, after a short warm-up fit that pays Lightning's
one-time start-up. The per-λ speed-up is ``t(one λ) / (t(sweep) / K)``; a λ-by-λ sweep would take about
``K · t(one λ)``.

Usage:
    python benchmarks/sweep_speed.py --epochs 10 --im-head linear --out sweep_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from jeidnn.config import JeidnnConfig
from jeidnn.heads import ExitHeads
from jeidnn.jeidnn_module import train_jeidnn
from jeidnn.sweep import train_jeidnn_sweep


def cached_features(n: int, num_exits: int, hidden: int, num_classes: int, generator: torch.Generator):
    """Features ``(n, L, H)`` whose class signal grows with depth, and labels ``(n,)``."""
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    features = torch.randn(n, num_exits, hidden, generator=generator)  # (n, L, H)
    signal = torch.nn.functional.one_hot(labels, hidden).float()  # (n, H)
    depth = torch.linspace(0.2, 2.0, num_exits)  # (L,)
    return features + depth[None, :, None] * signal[:, None, :], labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--im-head", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--lambdas", type=float, nargs="+", default=JeidnnConfig().lambdas)
    parser.add_argument("--train-size", type=int, default=22900)
    parser.add_argument("--val-size", type=int, default=3800)
    parser.add_argument("--exits", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    shape = (args.exits, args.hidden, args.classes)
    train_x, train_y = cached_features(args.train_size, *shape, generator)
    val_x, val_y = cached_features(args.val_size, *shape, generator)
    torch.manual_seed(0)
    heads = ExitHeads(list(range(1, args.exits + 1)), args.hidden, args.classes, "tanh", im_head=args.im_head)
    costs = torch.arange(1, args.exits + 1, dtype=torch.float32) / args.exits
    cfg = JeidnnConfig(epochs=args.epochs, lambdas=list(args.lambdas))
    quiet = {"enable_progress_bar": False}
    lam = args.lambdas[len(args.lambdas) // 2]

    # Lightning's first fit imports and initialises more than later ones: pay that before timing.
    warmup = JeidnnConfig(epochs=1)
    train_jeidnn(train_x[:256], train_y[:256], val_x[:256], val_y[:256], heads, costs, lam, warmup, **quiet)
    train_jeidnn_sweep(
        train_x[:256], train_y[:256], val_x[:256], val_y[:256], heads, costs, [lam], warmup, **quiet
    )

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    train_jeidnn(train_x, train_y, val_x, val_y, heads, costs, lam, cfg, **quiet)
    one = time.perf_counter() - start
    start = time.perf_counter()
    train_jeidnn_sweep(train_x, train_y, val_x, val_y, heads, costs, cfg.lambdas, cfg, **quiet)
    sweep = time.perf_counter() - start

    num_lambdas = len(cfg.lambdas)
    steps = -(-args.train_size // cfg.batch_size) * args.epochs
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        # Other processes distort CPU timings: a load above the thread count is a warning sign.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "im_head": args.im_head,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "epochs": args.epochs,
        "optimizer_steps": steps,
        "lambdas": cfg.lambdas,
        "one_lambda_s": round(one, 2),
        "one_lambda_ms_per_step": round(1000 * one / max(1, steps), 2),
        "sweep_s": round(sweep, 2),
        "sweep_ms_per_step": round(1000 * sweep / max(1, steps), 2),
        "lambda_by_lambda_estimate_s": round(num_lambdas * one, 2),
        "speedup_per_lambda": round(num_lambdas * one / sweep, 2),
    }
    print(
        f"{result['machine']}, load {result['load_average']}; im_head={args.im_head}, {args.epochs} epochs "
        f"({steps} steps), {num_lambdas} λ\n"
        f"  train_jeidnn, one λ:          {one:8.2f} s  ({result['one_lambda_ms_per_step']} ms/step)\n"
        f"  train_jeidnn_sweep, all λ:    {sweep:8.2f} s  ({result['sweep_ms_per_step']} ms/step)\n"
        f"  λ by λ (estimate, {num_lambdas} × one): {num_lambdas * one:8.2f} s\n"
        f"  per-λ speed-up:               {result['speedup_per_lambda']:8.2f} ×"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
