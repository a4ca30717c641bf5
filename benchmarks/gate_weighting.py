"""Gate class-weight ablation: the λ sweep with DESIGN.md §4's balanced weights vs. an unweighted BCE.

Needs a finished run and its feature cache file (written by `benchmarks/im_loss_ablation.py --cache`):

    python benchmarks/im_loss_ablation.py runs/default --lam 0.2 --cache runs/default/features.safetensors
    python benchmarks/gate_weighting.py runs/default runs/default/features.safetensors

Prints, for every λ of the run's config, test accuracy / mean cost / exit fractions of both variants,
and writes `gate_weighting.json` into the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from jeidnn.backbone import ARCHITECTURES
from jeidnn.cli import _quiet_libraries
from jeidnn.config import load_config
from jeidnn.heads import ExitHeads
from jeidnn.jeidnn_module import predict_exits
from jeidnn.sweep import train_jeidnn_sweep

VARIANTS = {"design (balanced, clip 5)": (5.0, 0.0), "unweighted BCE": (1.0, 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("cache", type=Path)
    args = parser.parse_args(argv)
    _quiet_libraries()
    report = json.loads((args.run_dir / "report.json").read_text())
    cfg = load_config(args.run_dir / "config.yaml")
    t = load_file(str(args.cache))
    costs = torch.tensor(report["exits"]["cost_with_gates"])
    layers, hidden = report["exits"]["layers"], report["backbone"]["hidden_size"]
    activation = ARCHITECTURES[report["backbone"]["architecture"]].head_activation
    heads = ExitHeads(
        layers, hidden, report["dataset"]["num_classes"], activation, im_head=report["backbone"]["im_head"]
    )
    heads.load_state_dict(load_file(str(args.run_dir / "checkpoints" / "warmup_heads.safetensors")))
    out = {}
    for name, (max_w, min_w) in VARIANTS.items():
        jcfg = dataclasses.replace(cfg.jeidnn, max_positive_weight=max_w, min_positive_weight=min_w)
        results = train_jeidnn_sweep(
            t["train_features"],
            t["train_labels"],
            t["val_features"],
            t["val_labels"],
            heads,
            costs,
            jcfg.lambdas,
            jcfg,
            enable_progress_bar=False,
            seed=cfg.seed,
        )
        rows = []
        for lam, result in zip(jcfg.lambdas, results):
            logits, _, exits = predict_exits(result.heads, result.gates, t["test_features"])
            pred = logits[torch.arange(len(exits)), exits].argmax(-1)
            rows.append(
                {
                    "lambda": lam,
                    "accuracy": (pred == t["test_labels"]).float().mean().item(),
                    "cost": costs[exits].mean().item(),
                    "exit_fractions": torch.bincount(exits, minlength=len(costs)).div(len(exits)).tolist(),
                }
            )
        out[name] = rows
        print(f"\n{name}\n{'λ':>6}{'acc %':>8}{'cost':>7}  exit fractions")
        for r in rows:
            fr = " ".join(f"{f:.2f}" for f in r["exit_fractions"])
            print(f"{r['lambda']:>6}{100 * r['accuracy']:>8.1f}{r['cost']:>7.3f}  {fr}")
    (args.run_dir / "gate_weighting.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
