"""What each kind of server does with a micro-batch (:class:`~jeidnn.serve.batcher.MicroBatcher`'s compute and
finish steps): a whole model (:class:`ModelRunner`), a device tier (:class:`DeviceRunner`) and a server tier
(:class:`ServerRunner`).

Answers are :class:`~jeidnn.hf.batches.Prediction` objects built as :meth:`EarlyExitModel.predict` builds
them; conformal sets are added per request, at its own ``alpha``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jeidnn.data.images import pixel_values
from jeidnn.data.tables import pad_token_lists
from jeidnn.evaluate.conformal import prediction_sets
from jeidnn.hf.batches import TEXT_KEYS, Prediction, predict_inputs, to_predictions
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.model.early_exit import EarlyExitOutput
from jeidnn.serve.batcher import Job
from jeidnn.serve.metrics import Metrics
from jeidnn.serve.payload import Payload, concat, encode, state_to
from jeidnn.serve.tiers import Tier, run_device, run_server

log = logging.getLogger(__name__)

__all__ = [
    "DeviceRunner",
    "ModelRunner",
    "ServerRunner",
    "UpstreamError",
    "encode_texts",
    "resolve_quantiles",
]


class UpstreamError(Exception):
    """The server tier could not be reached or did not answer (HTTP 502 where the device tier fails)."""


def resolve_quantiles(model: EarlyExitModel, alpha: float | None) -> Tensor | None:
    """The per-exit conformal quantiles ``(L,)`` a request at ``alpha`` gets, as ``predict`` resolves them:
    None = the model's default level (no sets when it has none)."""
    if alpha is None:
        if model.conformal_quantiles and model.default_alpha is not None:
            return model.quantiles_for(model.default_alpha)
        return None
    return model.quantiles_for(alpha)


def predictions_from_logits(model: EarlyExitModel, logits: Tensor, exits: Tensor | int) -> list[Prediction]:
    """Predictions of rows that took exits ``exits`` with ``logits`` ``(b, C)``, as the model's forward and
    ``predict`` turn them into answers (no sets)."""
    if isinstance(exits, int):
        exits = torch.full((logits.shape[0],), exits, dtype=torch.long)
    out = EarlyExitOutput(logits=logits, probs=logits.softmax(dim=-1), exit_index=exits)
    return to_predictions(model, out, None)


def add_sets(model: EarlyExitModel, predictions: Sequence[Prediction], quantiles: Tensor | None) -> None:
    """Fill in each prediction's conformal set at the exit it took (None without ``quantiles``)."""
    if quantiles is None or not predictions:
        for p in predictions:
            p.prediction_set = None
        return
    labels = model.labels
    probs = torch.tensor([[p.probabilities[y] for y in labels] for p in predictions], dtype=torch.float32)
    exits = torch.tensor([model.heads.layers.index(p.exit_layer) for p in predictions])
    members = prediction_sets(probs, exits, quantiles).tolist()  # (B, C)
    for p, row in zip(predictions, members):
        p.prediction_set = [y for y, m in zip(labels, row) if m]


GROUP_OVERHEAD_TOKENS = 96
"""What one more padded batch costs, in tokens: a group of texts costs its rows times its longest text plus
this. Measured on a CPU with the default model: per-call costs (tokenising, one host sync per exit, small
matrices) against padding."""


def encode_texts(model: EarlyExitModel, texts: Sequence[str]) -> list[dict[str, list[int]]]:
    """Each text's token lists as ``predict`` tokenises it (truncated at the model's ``max_length``, not
    padded). The server calls it once per request, on the event loop: the model's thread, which every
    request waits for, then only pads and runs (tokenising there cost ~4 % of its time, twice per text)."""
    encoded = model.preprocessor(list(texts), truncation=True, max_length=model.max_length)
    keys = [k for k in TEXT_KEYS if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]


def padding_groups(model: EarlyExitModel, items: Sequence[Any], max_rows: int) -> list[list[int]]:
    """Positions of a batch's inputs in groups that each run as one padded batch.

    Requests arrive in any order, and one batch of texts of every length would pad most of them to the
    longest (on a CPU, padding costs as much as real tokens). Texts (:func:`encode_texts`' token lists) go
    longest first (as ``predict`` batches them), cut into consecutive groups of at most ``max_rows`` that
    minimise the padded tokens plus :data:`GROUP_OVERHEAD_TOKENS` per group (a shortest path over the cut
    points). Images, all one size, split at ``max_rows``.
    """
    n = len(items)
    if model.config.modality != "text":
        return [list(range(start, min(start + max_rows, n))) for start in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: -len(items[i]["input_ids"]))
    longest = [len(items[i]["input_ids"]) for i in order]  # descending: a group starting at i pads to it
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + (end - start) * longest[start] + GROUP_OVERHEAD_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def group_batch(model: EarlyExitModel, items: Sequence[Any], group: list[int]) -> dict[str, Tensor]:
    """The model-ready batch of the inputs at ``group`` (from :func:`padding_groups`: texts longest first),
    the tensors ``predict`` builds for them: token lists right-padded with the pad id, or pixels."""
    if model.config.modality != "text":
        return {"pixel_values": pixel_values(model.preprocessor, [items[i] for i in group])}
    pad_id = model.preprocessor.pad_token_id
    rows = [items[i] for i in group]
    return pad_token_lists({k: [row[k] for row in rows] for k in rows[0]}, 0 if pad_id is None else pad_id)


def _spans(jobs: Sequence[Job]) -> list[slice]:
    """Each job's positions among the batch's concatenated inputs."""
    spans, start = [], 0
    for job in jobs:
        spans.append(slice(start, start + job.rows))
        start += job.rows
    return spans


class ModelRunner:
    """A whole model: ``predict``'s layer-skipping path on the batch's inputs, answers split per request."""

    def __init__(self, model: EarlyExitModel, max_batch_size: int, metrics: Metrics) -> None:
        self.model, self.max_batch_size, self.metrics = model, max_batch_size, metrics

    def compute(self, jobs: list[Job]) -> list[list[Prediction]]:
        items = [x for job in jobs for x in job.items]
        predictions: list[Any] = [None] * len(items)
        for group in padding_groups(self.model, items, self.max_batch_size):
            batch = group_batch(self.model, items, group)  # one batch: predict_inputs keeps its row order
            for i, p in zip(group, predict_inputs(self.model, batch, None, len(group))):
                predictions[i] = p
        answers = [predictions[span] for span in _spans(jobs)]
        for job, answer in zip(jobs, answers):
            add_sets(self.model, answer, job.options)
            self.metrics.answered(answer)
        return answers


@dataclass
class Forward:
    """The samples of one device batch that go on to the server tier."""

    data: bytes  # the encoded payload
    positions: list[int]  # their positions among the batch's concatenated inputs, in payload row order
    fallback: list[Prediction]  # their answers at the deepest local exit, if the server tier fails


@dataclass
class DevicePart:
    """One request's share of a device batch."""

    local: dict[
        int, tuple[Prediction, bool]
    ]  # position -> (answer, False) of a sample that exited on the device
    span: slice  # the request's positions in the batch
    forward: Forward | None  # shared by the requests of the batch


Post = Callable[[bytes], Awaitable[list[dict[str, Any]]]]
"""Sends a payload to the server tier and returns its answers (or raises :class:`UpstreamError`)."""


class DeviceRunner:
    """A device tier: answers the samples that exit on the device and hands the rest to the server tier.

    Args:
        post: sends a payload upstream.
        degrade: when the server tier fails, answer from the deepest local exit (marked ``degraded``);
            False fails the requests that needed it (HTTP 502).
        payload_dtype: float32, float16 or int8.
    """

    def __init__(
        self, tier: Tier, max_batch_size: int, metrics: Metrics, post: Post, degrade: bool, payload_dtype: str
    ) -> None:
        self.tier, self.model = tier, tier.model
        self.max_batch_size, self.metrics, self.post = max_batch_size, metrics, post
        self.degrade, self.payload_dtype = degrade, payload_dtype

    def compute(self, jobs: list[Job]) -> list[DevicePart]:
        model = self.model
        items = [x for job in jobs for x in job.items]
        device = model.cost_per_exit.device
        local: dict[int, tuple[Prediction, bool]] = {}
        going: list[tuple[list[int], Payload, Tensor]] = []
        for positions in padding_groups(model, items, self.max_batch_size):
            batch = group_batch(model, items, positions)
            out = run_device(self.tier, {k: v.to(device) for k, v in batch.items()})
            for rows, logits, k in out.left:
                for r, p in zip(rows.tolist(), predictions_from_logits(model, logits.cpu(), k)):
                    local[positions[r]] = (p, False)
            if len(out.rows):
                payload = Payload(
                    out.hidden, out.lengths, out.gate_state, self.tier.split_id, self.tier.split_layer
                )
                going.append(([positions[r] for r in out.rows.tolist()], payload, out.fallback))
        forward = None
        if going:
            payload = concat([p for _, p, _ in going])
            fallback = torch.cat([f for _, _, f in going]).cpu()  # (r, C)
            forward = Forward(
                encode(payload, self.payload_dtype),  # type: ignore[arg-type]
                [pos for positions, _, _ in going for pos in positions],
                predictions_from_logits(model, fallback, self.tier.local_exits[-1]),
            )
        return [DevicePart(local, span, forward) for span in _spans(jobs)]

    async def finish(self, jobs: list[Job], parts: list[Any]) -> list[Any]:
        """Send each compute call's payload upstream once; assemble every request's answers in input order."""
        forwards = {id(p.forward): p.forward for p in parts if isinstance(p, DevicePart) and p.forward}
        remote = dict(zip(forwards, await asyncio.gather(*(self._forward(f) for f in forwards.values()))))
        answers: list[Any] = []
        for job, part in zip(jobs, parts):
            if isinstance(part, BaseException):
                answers.append(part)
                continue
            got: list[tuple[Prediction, bool]] = []
            for position in range(part.span.start, part.span.stop):
                got.append(
                    part.local[position] if position in part.local else remote[id(part.forward)][position]
                )
            failure = next((g for g in got if isinstance(g, BaseException)), None)
            if failure is not None:
                answers.append(failure)
                continue
            add_sets(self.model, [p for p, _ in got], job.options)
            self.metrics.answered(p for p, _ in got)
            answers.append(got)
        return answers

    async def _forward(self, forward: Forward) -> dict[int, Any]:
        """Each forwarded position's (answer, degraded) from the server tier, its fallback, or the failure."""
        n = len(forward.positions)
        self.metrics.forwarded.inc(n)
        self.metrics.payload_bytes.inc(len(forward.data))
        try:
            rows = await self.post(forward.data)
            if len(rows) != n:
                raise UpstreamError(f"the server tier answered {len(rows)} rows for {n}")
            answers = [(self._from_server(row), False) for row in rows]
        except UpstreamError as exc:
            self.metrics.upstream_failures.inc()
            if not self.degrade:
                return dict.fromkeys(forward.positions, exc)
            log.warning("server tier failed (%s): %d inputs answered from the deepest local exit", exc, n)
            self.metrics.degraded.inc(n)
            answers = [(p, True) for p in forward.fallback]
        return dict(zip(forward.positions, answers))

    def _from_server(self, row: dict[str, Any]) -> Prediction:
        model = self.model
        try:
            k, probs = int(row["exit_index"]), [float(x) for x in row["probabilities"]]
            top = max(range(len(probs)), key=probs.__getitem__)
            return Prediction(
                label=model.labels[top],
                probability=probs[top],
                exit_layer=model.heads.layers[k],
                cost=model.costs[k],
                prediction_set=None,
                probabilities=dict(zip(model.labels, probs)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UpstreamError(f"the server tier's answer is malformed ({exc!r})") from None


class ServerRunner:
    """A server tier: runs payloads through layers ``K+1 .. L``; answers carry each row's exit and
    probabilities, from which the device tier builds its answers and sets."""

    def __init__(self, tier: Tier, metrics: Metrics) -> None:
        self.tier, self.model, self.metrics = tier, tier.model, metrics

    def compute(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        payload = concat([job.items for job in jobs])
        device = self.model.cost_per_exit.device
        logits, exits = run_server(
            self.tier,
            payload.hidden.to(device),
            payload.lengths.to(device),
            state_to(payload.gate_state, device),
        )
        predictions = predictions_from_logits(self.model, logits.cpu(), exits.cpu())
        self.metrics.answered(predictions)
        rows = [
            {**p.to_json(), "exit_index": int(k), "probabilities": list(p.probabilities.values())}
            for p, k in zip(predictions, exits.tolist())
        ]
        return [rows[span] for span in _spans(jobs)]
