"""What ``GET /metrics`` reports, in the Prometheus text format (one registry per application).

Counters end in ``_total`` as Prometheus names them; ``jeidnn_cost_total / jeidnn_inputs_total`` is the mean
cost of the exits taken (1 = the whole model), the gauge ``jeidnn_cost_saved`` the whole-model passes saved.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from jeidnn.hf.batches import Prediction

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The counters and histograms of one server; ``exit_layers``: the layers its exits sit after."""

    def __init__(self, exit_layers: Iterable[int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jeidnn_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "jeidnn_request_latency_seconds",
            "Time from a request's arrival to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_errors = Counter(
            "jeidnn_model_errors", "Requests that failed inside the model (answered 500)", registry=r
        )
        self.batch_size = Histogram(
            "jeidnn_batch_size",
            "Inputs per call of the model (micro-batch rows)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.exits = Counter(
            "jeidnn_exits", "Answered inputs by the layer of the exit taken", ["layer"], registry=r
        )
        self.inputs = Counter("jeidnn_inputs", "Answered inputs", registry=r)
        self.cost = Counter(
            "jeidnn_cost",
            "Sum over answered inputs of the exit's normalised cost (1 = the whole model)",
            registry=r,
        )
        # A gauge: the last exit of an early-exit model may cost a little more than the plain model.
        self.cost_saved = Gauge(
            "jeidnn_cost_saved", "Sum over answered inputs of 1 - cost: whole-model passes saved", registry=r
        )
        self.forwarded = Counter(
            "jeidnn_forwarded", "Device tier: inputs handed on to the server tier", registry=r
        )
        self.payload_bytes = Counter(
            "jeidnn_payload_bytes", "Device tier: payload bytes sent to the server tier", registry=r
        )
        self.upstream_failures = Counter(
            "jeidnn_upstream_failures", "Device tier: calls to the server tier that failed", registry=r
        )
        self.degraded = Counter(
            "jeidnn_degraded",
            "Device tier: inputs answered from the deepest local exit because the server tier failed",
            registry=r,
        )
        for layer in exit_layers:  # every exit shows, taken or not
            self.exits.labels(layer=str(layer))

    def answered(self, predictions: Iterable[Prediction]) -> None:
        """Count answered inputs, their exits and costs."""
        for p in predictions:
            self.inputs.inc()
            self.exits.labels(layer=str(p.exit_layer)).inc()
            self.cost.inc(p.cost)
            self.cost_saved.inc(1.0 - p.cost)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
