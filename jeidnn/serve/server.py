"""Running an application with uvicorn: in the foreground (``jeidnn serve``) or in a background thread of this
process (:func:`running`, for tests, benchmarks and notebooks).

Example:
    >>> app = create_app(EarlyExitModel.from_pretrained("runs/default/model"))  # doctest: +SKIP
    >>> with running(app) as url:  # doctest: +SKIP
    ...     httpx.post(f"{url}/predict", json={"inputs": ["what a day"]}).json()
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from jeidnn.errors import JeidnnError

__all__ = ["bind", "running", "serve_socket"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); a one-line error if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say they are
    # TCP, and uvicorn writes a response's head and body apart: with Nagle on, the body waits for the
    # client's delayed ACK, ~40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise JeidnnError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --host or --port"
        ) from None
    return sock


def _server(app: Any, log_level: str) -> uvicorn.Server:
    # One worker process: the model is loaded once; concurrency comes from micro-batching.
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)


def serve_socket(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on a socket from :func:`bind` until interrupted (Ctrl-C / SIGTERM)."""
    _server(app, log_level).run(sockets=[sock])


@contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields its base URL and stops it on exit."""
    sock = bind(host, port)
    server = _server(app, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="jeidnn-serve")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.01)
    host_name = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{host_name}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
