"""IM-loss ablation (DESIGN.md §4): one λ trained with the weighted IM loss and with the plain sum.

Reuses a finished run: its fine-tuned backbone (runs/<name>/model/backbone), its warm-up heads
(checkpoints/warmup_heads.safetensors), its config and data splits. Recomputes the feature cache
(one backbone pass, timed), trains stage 2 for `--lam` with `im_loss: weighted` and `im_loss: sum`
from the same warm-up heads and seed, and prints test accuracy, mean cost, exit fractions and ECE.

    python benchmarks/im_loss_ablation.py runs/default --lam 0.2 [--out FILE]

Writes `im_loss_ablation.json` into the run folder by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jeidnn.calibration import ece
from jeidnn.cli import _quiet_libraries
from jeidnn.config import load_config
from jeidnn.features import FeatureSplit, extract_features
from jeidnn.jeidnn_module import predict_exits, train_jeidnn
from jeidnn.pipeline import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="save/reuse the feature cache in this file")
    args = parser.parse_args(argv)
    _quiet_libraries()
    run_dir = args.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    cfg = load_config(run_dir / "config.yaml")
    # The fine-tuned backbone as exported; pooling as the run used it.
    cfg.model = dataclasses.replace(
        cfg.model,
        name_or_path=str(run_dir / "model" / "backbone"),
        random_config=None,
        pooling=report["backbone"]["pooling"],
    )
    p = prepare(cfg)
    p.heads.load_state_dict(load_file(str(run_dir / "checkpoints" / "warmup_heads.safetensors")))
    p.backbone.eval()
    cache, seconds = {}, {}
    if args.cache is not None and args.cache.is_file():
        tensors = load_file(str(args.cache))
        cache = {
            s: FeatureSplit(tensors[f"{s}_features"], tensors[f"{s}_labels"])
            for s in ("train", "val", "test")
        }
    else:
        for split in ("train", "val", "test"):
            start = time.perf_counter()
            cache[split] = extract_features(p.backbone, p.dm, split, p.exit_layers, progress=True)
            seconds[split] = time.perf_counter() - start
        if args.cache is not None:
            tensors = {f"{s}_features": cache[s].features for s in cache}
            tensors.update({f"{s}_labels": cache[s].labels for s in cache})
            save_file(tensors, str(args.cache))
    costs = torch.tensor(report["exits"]["cost_with_gates"])
    rows = {}
    for mode in ("weighted", "sum"):
        jcfg = dataclasses.replace(cfg.jeidnn, im_loss=mode)
        start = time.perf_counter()
        result = train_jeidnn(
            cache["train"].features,
            cache["train"].labels,
            cache["val"].features,
            cache["val"].labels,
            p.heads,
            costs,
            args.lam,
            jcfg,
            enable_progress_bar=False,
            seed=cfg.seed,
        )
        train_s = time.perf_counter() - start
        logits, _, exits = predict_exits(result.heads, result.gates, cache["test"].features)
        probs = logits.softmax(-1)[torch.arange(len(exits)), exits]  # (N, C) at the exit taken
        labels = cache["test"].labels
        rows[mode] = {
            "accuracy": (probs.argmax(-1) == labels).float().mean().item(),
            "cost": costs[exits].mean().item(),
            "exit_fractions": torch.bincount(exits, minlength=len(costs)).div(len(exits)).tolist(),
            "ece": ece(probs, labels, cfg.eval.ece_bins),
            "train_s": train_s,
        }
    out = {"lambda": args.lam, "backbone_pass_s": seconds, "results": rows}
    if seconds:
        print(f"backbone pass over train: {seconds['train']:.1f} s")
    print(f"λ = {args.lam}")
    print(f"{'im_loss':<10}{'accuracy':>10}{'cost':>8}{'ECE':>8}  exit fractions")
    for mode, r in rows.items():
        fractions = " ".join(f"{f:.2f}" for f in r["exit_fractions"])
        print(f"{mode:<10}{100 * r['accuracy']:>9.1f}%{r['cost']:>8.3f}{100 * r['ece']:>7.1f}%  {fractions}")
    path = args.out or run_dir / "im_loss_ablation.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
