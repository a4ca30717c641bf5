"""`jeidnn serve MODEL`: an HTTP server for an exported model or one tier of a split model
(:mod:`jeidnn.serve.app`); needs the optional extra ``jeidnn[serve]``."""

from __future__ import annotations

import logging
from pathlib import Path

from jeidnn.cli.common import CommandParser, guarded
from jeidnn.errors import JeidnnError
from jeidnn.log import setup_logging

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Serve an exported early-exit model over HTTP: POST /predict (micro-batched into the layer-skipping "
    "forward), GET /health, GET /metrics (Prometheus). MODEL may also be the device or server folder written "
    "by jeidnn split; a device tier needs --upstream URL of its server tier."
)
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "httpx", "starlette")


def need_serve_extra(command: str) -> None:
    """A one-line error when the serving stack is not installed."""
    import importlib.util

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise JeidnnError(
            f"{command} needs {', '.join(missing)}: install the serving extra, pip install 'jeidnn[serve]'"
        )


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="jeidnn serve", description=DESCRIPTION)
    parser.add_argument(
        "model_dir", metavar="MODEL", help="a model folder, or DIR/device or DIR/server of jeidnn split"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="inputs per call of the model")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request may wait for others to fill a batch",
    )
    parser.add_argument("--max-inputs", type=int, default=1024, help="inputs per request")
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20, help="size of a request body")
    parser.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the backbone's dtype (default: the folder's; exit heads and gates stay float32)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--upstream", help="device tier: base URL of its server tier, e.g. http://10.0.0.2:8000"
    )
    parser.add_argument(
        "--on-upstream-failure",
        default="degrade",
        choices=["degrade", "fail"],
        help="device tier, server tier down: answer from the deepest local exit (degraded) or fail (502)",
    )
    parser.add_argument(
        "--payload-dtype",
        choices=["float32", "float16", "int8"],
        help="device tier: hidden states sent as (default: what jeidnn split chose)",
    )
    parser.add_argument("--upstream-timeout", type=float, default=30.0, help="device tier: seconds per call")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)

    def go() -> int:
        setup_logging(args.quiet)
        need_serve_extra("jeidnn serve")
        import torch

        from jeidnn.serve.app import ServeSettings, create_app
        from jeidnn.serve.server import bind, serve_socket
        from jeidnn.serve.tiers import load_tier, read_tier_info
        from jeidnn.train.devices import run_device, torch_dtype

        settings = ServeSettings(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_inputs=args.max_inputs,
            max_request_bytes=args.max_request_bytes,
            upstream=args.upstream,
            on_upstream_failure=args.on_upstream_failure,
            upstream_timeout_s=args.upstream_timeout,
            payload_dtype=args.payload_dtype,
        )
        settings.check()
        if args.threads is not None:
            if args.threads < 1:
                raise JeidnnError(f"--threads must be a positive integer, got {args.threads}")
            torch.set_num_threads(args.threads)
        device = run_device(args.device, key="--device")
        dtype = None if args.dtype == "auto" else torch_dtype(args.dtype, "--dtype")
        sock = bind(args.host, args.port)  # a taken port fails before the model loads
        try:
            folder = Path(args.model_dir).expanduser()
            if read_tier_info(folder) is not None:
                target = load_tier(folder, device, dtype)
                what = f"the {target.role} tier (split after layer {target.split_layer}) in {folder}"
            else:
                from jeidnn.hf.modeling import EarlyExitModel

                target = EarlyExitModel.from_pretrained(folder, dtype=dtype or "auto").to(device)
                what = str(folder)
            app = create_app(target, settings)
        except BaseException:
            sock.close()
            raise
        port = sock.getsockname()[1]
        log.info("serving %s on http://%s:%d (%s; Ctrl-C stops)", what, args.host, port, device)
        serve_socket(app, sock, "warning" if args.quiet else "info")
        return 0

    return guarded(go)
