"""`jeidnn prune RUN --heads F --ffn F [--layers auto|N] [--recover-steps N] --out DIR`: the command line of
:mod:`jeidnn.compress.pruning`.
"""

from __future__ import annotations

from jeidnn.cli.common import CommandParser, guarded
from jeidnn.compress.pruning import PruneSettings, prune_run
from jeidnn.compress.settings import parse_layers
from jeidnn.log import setup_logging


def main(argv: list[str]) -> int:
    """``jeidnn prune RUN --heads F --ffn F [--layers auto|N] [--recover-steps N] --out DIR``."""
    parser = CommandParser(
        prog="jeidnn prune",
        description="Structurally prune a finished run's early-exit model (attention heads, FFN neurons, "
        "layers after the deepest exit used) and write it as a smaller model folder.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="a finished run folder, runs/<name>")
    parser.add_argument("--heads", type=float, default=0.0, help="fraction of all attention heads to remove")
    parser.add_argument("--ffn", type=float, default=0.0, help="fraction of all FFN neurons to remove")
    parser.add_argument(
        "--layers",
        help="auto: drop the layers after the deepest exit the operating point takes on calib; "
        "N: keep the first N layers (an exit layer); default: keep all",
    )
    parser.add_argument("--recover-steps", type=int, default=0, help="recovery fine-tune steps on train")
    parser.add_argument("--recover-lr", type=float, help="its learning rate (default: the run's finetune.lr)")
    parser.add_argument("--importance-samples", type=int, help="val samples scored (default: all of val)")
    parser.add_argument(
        "--method", help="a learned or baseline method of the run (default: train.py's choice)"
    )
    parser.add_argument(
        "--budget", type=float, help="calib cost budget (default: the run's export.cost_budget)"
    )
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bars; log only warnings and errors")
    args = parser.parse_args(argv)

    def go() -> int:
        setup_logging(args.quiet)
        settings = PruneSettings(
            heads=args.heads,
            ffn=args.ffn,
            layers=parse_layers(args.layers),
            recover_steps=args.recover_steps,
            recover_lr=args.recover_lr,
            importance_samples=args.importance_samples,
        )
        prune_run(
            args.run_dir,
            settings,
            method=args.method,
            budget=args.budget,
            out=args.out,
            overwrite=args.overwrite,
            device=args.device,
            progress=not args.quiet,
        )
        return 0

    return guarded(go)
