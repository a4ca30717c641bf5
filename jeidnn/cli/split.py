"""`jeidnn split MODEL --at K --out DIR` (a model cut into a device tier and a server tier,
:mod:`jeidnn.serve.tiers`) and `jeidnn split --plan RUN ...` (where to cut, :mod:`jeidnn.serve.plan`)."""

from __future__ import annotations

import logging
from pathlib import Path

from jeidnn.cli.common import CommandParser, guarded
from jeidnn.errors import JeidnnError
from jeidnn.log import setup_logging

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Split an exported early-exit model after layer K into DIR/device (embeddings, layers 1..K, their exits, "
    "the tokenizer) and DIR/server (layers K+1..L and their exits), each served by jeidnn serve; or, with "
    "--plan RUN, estimate the latency, bytes sent and server load of every split of a finished run's model."
)


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="jeidnn split", description=DESCRIPTION)
    parser.add_argument(
        "model_dir", metavar="MODEL", nargs="?", help="an exported model folder, runs/<name>/model"
    )
    parser.add_argument("--at", type=int, help="K: the device runs layers 1..K, the server the rest")
    parser.add_argument("--out", help="output folder (split: DIR with device/ and server/; plan: RUN/plan)")
    parser.add_argument(
        "--payload-dtype",
        default="float16",
        choices=["float32", "float16", "int8"],
        help="hidden states sent as (float32 reproduces the whole model's answers exactly)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    plan = parser.add_argument_group("--plan")
    plan.add_argument("--plan", metavar="RUN", help="a finished run folder: plan its exported model's split")
    plan.add_argument(
        "--device-speed", type=float, default=0.25, help="the device's speed as a fraction of this machine's"
    )
    plan.add_argument("--bandwidth-mbps", type=float, default=20.0, help="the link's bandwidth, Mbit/s")
    plan.add_argument("--rtt-ms", type=float, default=30.0, help="the link's round-trip time, ms")
    plan.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        help="learned gates: other exit thresholds to plan besides the exported one",
    )
    plan.add_argument("--batch-size", type=int, default=1, help="batch size at which layers are timed")
    plan.add_argument("--num-inputs", type=int, default=64, help="test inputs (texts or images) timed")
    plan.add_argument(
        "--threads", type=int, help="torch CPU threads while timing (default: torch's; 1 on a busy machine)"
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)

    def go() -> int:
        setup_logging(args.quiet)
        if args.plan is not None:
            return _plan(args)
        if args.model_dir is None or args.at is None or args.out is None:
            raise JeidnnError("give MODEL --at K --out DIR (or --plan RUN to choose K)")
        from jeidnn.hf.modeling import EarlyExitModel
        from jeidnn.serve.tiers import split_model

        model = EarlyExitModel.from_pretrained(Path(args.model_dir).expanduser())
        device, server = split_model(model, args.at, args.out, args.payload_dtype, args.overwrite)
        log.info(
            "wrote %s and %s; serve them with jeidnn serve %s and jeidnn serve %s --upstream URL",
            device,
            server,
            server,
            device,
        )
        return 0

    return guarded(go)


def _plan(args) -> int:
    if args.model_dir is not None or args.at is not None:
        raise JeidnnError("--plan RUN plans every split K of RUN/model; leave out MODEL and --at")
    for name in ("batch_size", "num_inputs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise JeidnnError(
                f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
            )
    import torch

    from jeidnn.serve.plan import Link, plan_run, write_plan

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    link = Link(args.bandwidth_mbps, args.rtt_ms, args.device_speed)
    rows, times, header = plan_run(
        args.plan, link, args.payload_dtype, args.thresholds, args.batch_size, args.num_inputs
    )
    out = Path(args.out).expanduser() if args.out else Path(args.plan).expanduser() / "plan"
    write_plan(out, rows, times, link, "# Split plan\n\n" + header, args.payload_dtype)
    best = min(rows, key=lambda r: (r["operating_point"] != rows[0]["operating_point"], r["latency_ms"]))
    log.info(
        "exported operating point: lowest expected latency %.2f ms at K = %d (%.0f%% offloaded, "
        "%.0f bytes/request); wrote %s",
        best["latency_ms"],
        best["split_layer"],
        100 * best["offload_fraction"],
        best["bytes_per_request"],
        out / "plan.md",
    )
    return 0
