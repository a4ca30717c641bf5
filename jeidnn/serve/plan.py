"""Choosing where to split (``jeidnn split --plan``): expected latency, bytes sent and server load of every
split layer ``K`` and operating point, from a run's cached exit decisions and per-layer times measured here.

The model of one request (one sample), with ``X`` the device's speed as a fraction of the server's (this
machine's), ``l`` the layer of the exit the sample takes and ``n`` its real tokens:

* it exits on the device (``l <= K``): latency = (embeddings + layers ``1..l`` + exits up to ``l``) / ``X``;
* it goes on: the device part up to ``K`` / ``X`` + ``bytes(n) / bandwidth + RTT`` + layers ``K+1..l`` and
  their exits on the server, where ``bytes(n)`` is the size of its payload (:mod:`jeidnn.serve.payload`).

``K = 0`` is the server alone (the input travels as a ``/predict`` request carries it: a text's UTF-8 bytes,
an image's base64 PNG, in a JSON envelope), ``K = L`` the device alone. The expectation is the mean over the
run's test split, whose exits come from the cached predictions (the same decisions the exported model takes);
an image is ``patches + 1`` tokens (ViT; DeiT adds a distillation token), all real. Server load = the server's
seconds per request over the whole model's. Queueing, batching and the device's other work are not modelled.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jeidnn.errors import JeidnnError
from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.hf.batches import make_batches
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.model.gates import Gates
from jeidnn.model.policies import score_exits
from jeidnn.serve.payload import Payload, encode

__all__ = [
    "LayerTimes",
    "Link",
    "OperatingPoint",
    "measure_layer_times",
    "operating_points",
    "plan",
    "write_plan",
]

JSON_ENVELOPE = 40
"""Bytes of ``{"inputs": [...]}`` around a text sent to a server alone (K = 0)."""


@dataclass
class LayerTimes:
    """Seconds per sample of each part of the model on this machine (the server's speed)."""

    embed: float
    layers: list[float]  # (L,) backbone layers
    exits: list[float]  # per exit: its head and gate
    batch_size: int
    num_inputs: int

    @property
    def full(self) -> float:
        """The whole model: embeddings, every layer and the final exit."""
        return self.embed + sum(self.layers) + self.exits[-1]


@dataclass
class Link:
    """The device's link to the server and the device's speed."""

    bandwidth_mbps: float
    rtt_ms: float
    device_speed: float  # the device's speed as a fraction of the server's

    def check(self) -> None:
        for name, value in (("--bandwidth-mbps", self.bandwidth_mbps), ("--device-speed", self.device_speed)):
            if not value > 0:
                raise JeidnnError(f"{name} must be a positive number, got {value!r}")
        if not self.rtt_ms >= 0:
            raise JeidnnError(f"--rtt-ms must be >= 0, got {self.rtt_ms!r}")

    def seconds(self, num_bytes: Tensor) -> Tensor:
        return num_bytes * 8 / (self.bandwidth_mbps * 1e6) + self.rtt_ms / 1000


@dataclass
class OperatingPoint:
    """Where each test sample exits under one configuration of the run's exported method."""

    name: str
    exits: Tensor  # (N,) 0-based exits
    accuracy: float
    cost: float


@torch.inference_mode()
def measure_layer_times(
    model: EarlyExitModel, inputs: list[Any], batch_size: int = 1, repeats: int = 3
) -> LayerTimes:
    """Time the embeddings, each layer and each exit head + gate on ``inputs`` (texts or PIL images; every
    layer, every exit), best of ``repeats`` per batch, in seconds per sample."""
    model.eval()
    backbone, heads, gates = model.backbone, model.heads, model.gates
    device = model.cost_per_exit.device
    batches = [{k: v.to(device) for k, v in b.items()} for _, b in make_batches(model, inputs, batch_size)]
    exit_at = {layer - 1: k for k, layer in enumerate(heads.layers)}
    best: dict[str, list[float]] = {}
    for r in range(repeats + 1):  # the first pass warms up
        for j, batch in enumerate(batches):
            marks = [("start", time.perf_counter())]  # (part, when it ended)
            hidden, state = backbone.embed(batch)
            gate_state = gates.init_state(hidden.shape[0], device) if gates is not None else None
            marks.append(("embed", time.perf_counter()))
            for i in range(backbone.num_layers):
                hidden = backbone.run_layer(i, hidden, state)
                marks.append((f"layer{i}", time.perf_counter()))
                k = exit_at.get(i)
                if k is None:
                    continue
                pooled = backbone.pool(hidden, state)
                logits = heads.heads[k](pooled)
                if k < heads.num_exits - 1 and gates is not None:
                    if isinstance(gates, Gates):
                        score, gate_state = gates.step(k, logits, pooled, gate_state)
                    else:
                        score, gate_state = gates.step(k, logits, gate_state)
                    bool(score.any())  # the exit's host sync
                marks.append((f"exit{k}", time.perf_counter()))
            for (_, begin), (name, end) in zip(marks, marks[1:]):
                if r:
                    times = best.setdefault(name, [float("inf")] * len(batches))
                    times[j] = min(times[j], end - begin)
    per_sample = {name: sum(times) / len(inputs) for name, times in best.items()}
    return LayerTimes(
        per_sample["embed"],
        [per_sample[f"layer{i}"] for i in range(backbone.num_layers)],
        [per_sample[f"exit{k}"] for k in range(heads.num_exits)],
        batch_size,
        len(inputs),
    )


def operating_points(
    run_dir: Path, model: EarlyExitModel, thresholds: list[float] | None = None
) -> list[OperatingPoint]:
    """The test exits of the run's exported model, and of its exit threshold moved to each of ``thresholds``
    (learned gates); read from the run's cached predictions (``predictions/``)."""
    report = json.loads((run_dir / "report.json").read_text())
    export = report.get("export") or {}
    predictions = RunPredictions.read(report, run_dir)
    costs = torch.tensor(model.costs, dtype=torch.float64)
    points = []

    def point(name: str, exits: Tensor, logits: Tensor, labels: Tensor) -> OperatingPoint:
        rows = torch.arange(len(exits))
        accuracy = float((logits[rows, exits].argmax(-1) == labels).double().mean())
        return OperatingPoint(name, exits, accuracy, float(costs[exits].mean()))

    if isinstance(model.gates, Gates):
        method, index = export.get("method"), export.get("model_index")
        if method is None or index is None:
            raise JeidnnError(
                f"{run_dir}/report.json names no exported learned model (export.method, model_index)"
            )
        source = predictions.learned_sources(report, method)[int(index)]
        logits, labels, scores = source.logits["test"], source.labels["test"], source.scores["test"]
        taus = [model.exit_threshold] + [t for t in thresholds or [] if t != model.exit_threshold]
        for tau in taus:
            tag = "exported" if tau == model.exit_threshold else "moved"
            points.append(point(f"{method} τ={tau:g} ({tag})", score_exits(scores, tau), logits, labels))
        return points
    source = predictions.warmup_source(model.num_exits)
    logits, labels = source.logits["test"], source.labels["test"]
    if model.gates is None:
        exits = torch.full((len(labels),), model.num_exits - 1, dtype=torch.long)
    else:
        exits = model.gates.exits(logits)
    return [point(f"{export.get('method', 'exported')} (exported)", exits, logits, labels)]


def payload_bytes(hidden_size: int, lengths: Tensor, dtype: str) -> Tensor:
    """Bytes of a one-sample payload of each length ``(N,)``, ``float64``: each distinct length encoded once
    (a learned gate's state adds a few dozen bytes, not counted)."""
    sizes = {}
    for n in lengths.unique().tolist():
        empty = Payload(torch.zeros(1, n, hidden_size), torch.tensor([n]), None, "x" * 16, 1)
        sizes[n] = len(encode(empty, dtype))  # type: ignore[arg-type]
    return torch.tensor([sizes[n] for n in lengths.tolist()], dtype=torch.float64)


def plan(
    times: LayerTimes,
    layers: list[int],
    points: list[OperatingPoint],
    lengths: Tensor,
    request_bytes: Tensor,
    hidden_size: int,
    link: Link,
    dtype: str = "float16",
) -> list[dict[str, Any]]:
    """One row per operating point and split layer ``K = 0 .. L``: expected latency, bytes, server load."""
    num_layers = len(times.layers)
    exit_times = torch.tensor(times.exits, dtype=torch.float64)  # (E,)
    layer_times = torch.tensor(times.layers, dtype=torch.float64)  # (L,)
    exit_layers = torch.tensor(layers)  # (E,)
    cum_layers = torch.cat(
        [torch.zeros(1, dtype=torch.float64), layer_times.cumsum(0)]
    )  # (L+1,): layers 1..l
    nbytes = payload_bytes(hidden_size, lengths, dtype)  # (N,)
    rows = []
    for p in points:
        depth = exit_layers[p.exits]  # (N,) layer of each sample's exit
        passed = exit_layers[None] <= depth[:, None]  # (N, E) exits each sample evaluates
        for k in range(num_layers + 1):
            local = depth <= k  # (N,)
            on_device = torch.where(local, depth, torch.full_like(depth, k))  # layers run on the device
            device_exits = (passed & (exit_layers[None] <= k)).double() @ exit_times  # (N,)
            device_s = (times.embed * (k > 0) + cum_layers[on_device] + device_exits) / link.device_speed
            server_s = (
                cum_layers[depth]
                - cum_layers[on_device]
                + (passed & (exit_layers[None] > k)).double() @ exit_times
            )
            if k == 0:
                server_s = server_s + times.embed
                sent = request_bytes + JSON_ENVELOPE
            else:
                sent = nbytes
            latency = device_s + torch.where(local, 0.0, link.seconds(sent) + server_s)
            rows.append(
                {
                    "operating_point": p.name,
                    "accuracy": p.accuracy,
                    "cost": p.cost,
                    "split_layer": k,
                    "offload_fraction": float((~local).double().mean()),
                    "bytes_per_request": float(torch.where(local, 0.0, sent).mean()),
                    "latency_ms": float(latency.mean()) * 1000,
                    "latency_p90_ms": float(latency.quantile(0.9)) * 1000,
                    "server_load": float(torch.where(local, 0.0, server_s).mean()) / times.full,
                    "device_ms": float(device_s.mean()) * 1000,
                }
            )
    return rows


def write_plan(
    out: Path, rows: list[dict[str, Any]], times: LayerTimes, link: Link, header: str, dtype: str
) -> None:
    """``out/plan.md``, ``plan.json`` and ``plan.png`` (latency and server load against K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jeidnn.io import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "plan.json",
        {"link": asdict(link), "payload_dtype": dtype, "times": asdict(times), "rows": rows},
    )
    write_text(out / "plan.md", header + "\n\n" + plan_table(rows) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(r["operating_point"] for r in rows):
        mine = [r for r in rows if r["operating_point"] == name]
        ks = [r["split_layer"] for r in mine]
        left.plot(ks, [r["latency_ms"] for r in mine], marker="o", label=name)
        right.plot(ks, [r["server_load"] for r in mine], marker="o", label=name)
    left.set(xlabel="split layer K (0 = server alone)", ylabel="expected latency (ms)")
    right.set(xlabel="split layer K (0 = server alone)", ylabel="server load (x whole model)")
    left.set_title(
        f"{link.bandwidth_mbps:g} Mbit/s, RTT {link.rtt_ms:g} ms, device {link.device_speed:g}x", fontsize=9
    )
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plan.png", dpi=120)
    plt.close(fig)


def plan_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, the best latency of each operating point in bold."""
    best = {}
    for r in rows:
        if r["latency_ms"] < best.get(r["operating_point"], float("inf")):
            best[r["operating_point"]] = r["latency_ms"]
    lines = [
        "| operating point | test acc. | cost | K | offloaded | bytes / request | latency (ms) | p90 (ms) "
        "| server load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        latency = f"{r['latency_ms']:.2f}"
        if r["latency_ms"] == best[r["operating_point"]]:
            latency = f"**{latency}**"
        lines.append(
            f"| {r['operating_point']} | {100 * r['accuracy']:.1f} | {r['cost']:.3f} | {r['split_layer']} | "
            f"{r['offload_fraction']:.3f} | {r['bytes_per_request']:,.0f} | {latency} | "
            f"{r['latency_p90_ms']:.2f} | {r['server_load']:.3f} |"
        )
    return "\n".join(lines)


def plan_run(
    run_dir: str | Path,
    link: Link,
    dtype: str = "float16",
    thresholds: list[float] | None = None,
    batch_size: int = 1,
    num_inputs: int = 64,
    times: LayerTimes | None = None,
) -> tuple[list[dict[str, Any]], LayerTimes, str]:
    """The plan of a finished run's exported model (``RUN/model``, text or image); returns its rows, the
    measured layer times and a header describing both. ``times``: reuse earlier measurements instead of timing
    again."""
    from jeidnn.serve.payload import PAYLOAD_DTYPES
    from jeidnn.serve.run_inputs import request_sizes, run_test_inputs

    run_dir = Path(run_dir).expanduser()
    link.check()
    if dtype not in PAYLOAD_DTYPES:
        raise JeidnnError(f"--payload-dtype {dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    for name in ("report.json", "config.yaml", "model/config.json"):
        if not (run_dir / name).is_file():
            raise JeidnnError(f"{run_dir / name} is missing; --plan takes a finished run folder, runs/<name>")
    model = EarlyExitModel.from_pretrained(run_dir / "model").eval()
    if model.preprocessor is None:
        raise JeidnnError(
            f"{run_dir}/model has no tokenizer or image processor; --plan reads the test inputs through it"
        )
    points = operating_points(run_dir, model, thresholds)
    inputs = run_test_inputs(run_dir, model.config.modality)
    if len(inputs) != len(points[0].exits):
        raise JeidnnError(
            f"the run's test split has {len(inputs)} inputs but its cached predictions "
            f"{len(points[0].exits)}; the data changed since training"
        )
    lengths, request_bytes = request_sizes(model, inputs)
    if times is None:
        times = measure_layer_times(model, inputs[:num_inputs], batch_size)
    rows = plan(
        times, model.heads.layers, points, lengths, request_bytes, model.backbone.hidden_size, link, dtype
    )
    kind = "texts" if model.config.modality == "text" else "images"
    header = (
        f"Split plan of `{run_dir}/model` on its {len(inputs)} test {kind} (mean "
        f"{float(lengths.double().mean()):.1f} real tokens, {float(request_bytes.mean()):,.0f} bytes as sent "
        f"to a server alone): link {link.bandwidth_mbps:g} Mbit/s, RTT {link.rtt_ms:g} ms, device speed "
        f"{link.device_speed:g} x this machine's, {dtype} payloads. Layer times: best of 3 at batch "
        f"{times.batch_size} over {times.num_inputs} test {kind} on this machine (embeddings "
        f"{1000 * times.embed:.2f} ms, layers {', '.join(f'{1000 * t:.2f}' for t in times.layers)} ms, exits "
        f"{', '.join(f'{1000 * t:.2f}' for t in times.exits)} ms per sample). K = 0: the server alone (the "
        f"input travels); K = {len(times.layers)}: the device alone."
    )
    return rows, times, header
