"""The HTTP application of ``jeidnn serve`` (FastAPI): a whole model, a device tier or a server tier.

Endpoints (docs/serving.md has the protocol):

* ``POST /predict`` (a whole model or a device tier): ``{"inputs": [...], "alpha": 0.1}`` ->
  ``{"predictions": [...]}``, each what ``jeidnn predict`` prints (a device tier adds ``degraded``);
* ``POST /v1/continue`` (a server tier): a payload (:mod:`jeidnn.serve.payload`) -> each row's answer, exit
  and probabilities;
* ``GET /health``: what is served; ``GET /metrics``: Prometheus text (:mod:`jeidnn.serve.metrics`).

Every refusal is ``{"error": "<one line>"}`` with a 4xx status; a failure inside the model is a 500 for the
requests it touched (the others of the micro-batch are answered); a device tier whose server tier fails
answers from its deepest local exit (``degraded``) or, with ``on_upstream_failure="fail"``, with a 502.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from jeidnn.errors import JeidnnError, first_line
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.serve.batcher import Busy, MicroBatcher
from jeidnn.serve.inputs import HttpError, parse_predict, read_limited
from jeidnn.serve.metrics import Metrics
from jeidnn.serve.payload import PAYLOAD_DTYPES, decode
from jeidnn.serve.runners import (
    DeviceRunner,
    ModelRunner,
    ServerRunner,
    UpstreamError,
    encode_texts,
    resolve_quantiles,
)
from jeidnn.serve.tiers import Tier

log = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app"]


@dataclass
class ServeSettings:
    """How a server batches, what it accepts, and (device tier) where its server tier is."""

    max_batch_size: int = 64
    """Inputs per call of the model; a request with more runs alone."""
    max_wait_ms: float = 5.0
    """How long the oldest waiting request may wait for others to fill its batch."""
    max_inputs: int = 1024
    """Inputs per request."""
    max_request_bytes: int = 4 << 20
    """Size of a ``/predict`` body."""
    max_payload_bytes: int = 256 << 20
    """Size of a ``/v1/continue`` body (server tier)."""
    max_queue_rows: int = 100_000
    """Inputs waiting at most; beyond, requests get a 503."""
    upstream: str | None = None
    """Device tier: the server tier's base URL, e.g. ``http://10.0.0.2:8000``."""
    on_upstream_failure: Literal["degrade", "fail"] = "degrade"
    """Device tier, server tier down: answer from the deepest local exit, or fail the request (502)."""
    upstream_timeout_s: float = 30.0
    payload_dtype: str | None = None
    """Device tier: float32, float16 or int8 (None: what ``jeidnn split --payload-dtype`` chose)."""
    link_delay: Callable[[int], float] | None = None
    """Device tier: seconds to wait before sending a payload of that many bytes (a simulated slow link, for
    benchmarks on loopback); None sends at once."""

    def check(self) -> None:
        """One-line errors for values that cannot work, named as ``jeidnn serve`` spells them."""
        for name in (
            "max_batch_size",
            "max_inputs",
            "max_request_bytes",
            "max_payload_bytes",
            "max_queue_rows",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JeidnnError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.max_wait_ms >= 0:
            raise JeidnnError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms!r}")
        if self.on_upstream_failure not in ("degrade", "fail"):
            raise JeidnnError(
                f"--on-upstream-failure must be degrade or fail, got {self.on_upstream_failure!r}"
            )
        if self.payload_dtype is not None and self.payload_dtype not in PAYLOAD_DTYPES:
            raise JeidnnError(
                f"--payload-dtype {self.payload_dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}"
            )
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise JeidnnError(f"--upstream {self.upstream!r} must be an http:// or https:// URL")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Answer(BaseModel):
    label: str
    probability: float
    exit_layer: int
    cost: float
    prediction_set: list[str] | None
    degraded: bool | None = None


class PredictResponse(BaseModel):
    """The answer of ``POST /predict``: one entry per input, in input order."""

    predictions: list[_Answer]


def create_app(target: EarlyExitModel | Tier, settings: ServeSettings | None = None) -> FastAPI:
    """The application serving ``target``: a whole model, a device tier (needs ``settings.upstream``) or a
    server tier. Run it with uvicorn (``jeidnn serve`` does; :func:`jeidnn.serve.server.running` in a
    thread)."""
    settings = settings or ServeSettings()
    settings.check()
    tier = target if isinstance(target, Tier) else None
    model = tier.model if tier is not None else target
    role = tier.role if tier is not None else "model"
    if role == "device" and settings.upstream is None:
        raise JeidnnError("this is the device tier of a split model: give --upstream URL of its server tier")
    if role != "device" and settings.upstream is not None:
        raise JeidnnError(
            f"--upstream is for a device tier; this folder holds {f'a {role} tier' if tier else 'a model'}"
        )
    metrics = Metrics(model.heads.layers)
    client: Any = None

    async def post(data: bytes) -> list[dict[str, Any]]:
        import httpx

        if settings.link_delay is not None:
            await asyncio.sleep(settings.link_delay(len(data)))
        try:
            reply = await client.post(
                "/v1/continue", content=data, headers={"content-type": "application/octet-stream"}
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"cannot reach the server tier at {settings.upstream}: {first_line(exc)}"
            ) from None
        try:
            body = reply.json()
        except ValueError:
            body = {}
        if reply.status_code != 200:
            raise UpstreamError(
                f"the server tier at {settings.upstream} answered {reply.status_code}: {body.get('error')}"
            )
        return body.get("predictions", [])

    if tier is None:
        runner: Any = ModelRunner(model, settings.max_batch_size, metrics)
        finish = None
    elif role == "device":
        dtype = settings.payload_dtype or tier.payload_dtype
        degrade = settings.on_upstream_failure == "degrade"
        runner = DeviceRunner(tier, settings.max_batch_size, metrics, post, degrade, dtype)
        finish = runner.finish
    else:
        runner, finish = ServerRunner(tier, metrics), None
    batcher = MicroBatcher(
        runner.compute,
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.max_queue_rows,
        finish,
        metrics.batch_size.observe,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal client
        await batcher.start()
        if role == "device":
            import httpx

            client = httpx.AsyncClient(base_url=settings.upstream, timeout=settings.upstream_timeout_s)
        try:
            yield
        finally:
            await batcher.stop()
            if client is not None:
                await client.aclose()

    quantiles: dict[float | None, Any] = {}

    def quantiles_at(alpha: float | None) -> Any:
        """The conformal quantiles of a request at ``alpha``, built once per level (read only)."""
        if alpha not in quantiles:
            quantiles[alpha] = resolve_quantiles(model, alpha)  # raises for an uncalibrated alpha
        return quantiles[alpha]

    app = FastAPI(title=f"jeidnn ({role})", lifespan=lifespan)
    app.state.metrics, app.state.batcher = metrics, batcher

    async def answered(endpoint: str, work: Callable[[], Any]) -> Response:
        """Run a request's ``work``; map its failures to one-line errors; count it."""
        start, status = time.perf_counter(), 500
        try:
            response = await work()
            status = response.status_code
            return response
        except HttpError as exc:
            status = exc.status
            return _error(status, exc.message)
        except Busy as exc:
            status = 503
            return _error(status, str(exc))
        except UpstreamError as exc:
            status = 502
            return _error(status, str(exc))
        except JeidnnError as exc:  # a user error the model found (an uncalibrated alpha, a bad input)
            status = 422
            return _error(status, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed on this request: answer it, keep serving
            metrics.model_errors.inc()
            log.error("%s failed inside the model", endpoint, exc_info=exc)
            return _error(500, f"the model failed on this request: {first_line(exc)}")
        finally:
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown paths and methods
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info: dict[str, Any] = {
            "status": "ok",
            "role": role,
            "labels": model.labels,
            "exit_layers": model.heads.layers,
        }
        if tier is not None:
            info |= {"split_layer": tier.split_layer, "split_id": tier.split_id}
        if settings.upstream is not None:
            info["upstream"] = settings.upstream
        return info

    @app.get("/metrics")
    async def metrics_text() -> Response:
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: Request) -> Response:
        async def work() -> Response:
            if role == "server":
                raise HttpError(
                    404, "this is the server tier of a split model: it takes payloads at POST /v1/continue"
                )
            body = await read_limited(request, settings.max_request_bytes)
            items, alpha = parse_predict(body, model.config.modality, settings.max_inputs)
            quantiles = quantiles_at(alpha)
            if model.config.modality == "text":
                items = encode_texts(model, items)
            answer = await batcher.submit(items, len(items), quantiles)
            if role == "device":
                rows = [{**p.to_json(), "degraded": degraded} for p, degraded in answer]
            else:
                rows = [p.to_json() for p in answer]
            return JSONResponse({"predictions": rows})

        return await answered("/predict", work)

    @app.post("/v1/continue")
    async def continue_(request: Request) -> Response:
        async def work() -> Response:
            if role != "server":
                raise HttpError(404, f"this is {'a device tier' if tier else 'a whole model'}: POST /predict")
            assert tier is not None
            body = await read_limited(request, settings.max_payload_bytes, "payload")
            dtype = next(model.backbone.parameters()).dtype
            try:
                payload = decode(body, model.backbone.hidden_size, dtype)
            except JeidnnError as exc:
                raise HttpError(400, str(exc)) from None
            if payload.split_id != tier.split_id or payload.split_layer != tier.split_layer:
                raise HttpError(
                    409,
                    f"the payload comes from split {payload.split_id} at layer {payload.split_layer}; this "
                    f"server tier is split {tier.split_id} at layer {tier.split_layer}: deploy both halves "
                    "of one split",
                )
            rows = await batcher.submit(payload, payload.rows)
            return JSONResponse({"predictions": rows})

        return await answered("/v1/continue", work)

    return app
