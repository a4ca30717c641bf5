"""Micro-batching: requests that arrive close together share one call of the model.

One queue per server. A worker takes the oldest request and adds the next ones while their inputs fit in
``max_batch_size`` rows, waiting at most ``max_wait_ms`` for them after the oldest arrived or the model
became free, whichever is later (a full batch does not wait). The model runs in one worker thread, so the
event loop keeps accepting requests meanwhile. Each request gets exactly its own rows back. If a call fails,
each request of the batch is run again on its own: the one that fails gets its error, the others their
answers.

A second, optional step (``finish``) runs on the event loop after the model: the device tier sends its payload
to the server tier there, while the worker already runs the next batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from jeidnn.errors import JeidnnError

log = logging.getLogger(__name__)

__all__ = ["Busy", "Job", "MicroBatcher"]


class Busy(JeidnnError):
    """The queue holds more rows than the server accepts; the client should retry later (HTTP 503)."""


@dataclass
class Job:
    """One request: its inputs (``rows`` of them) and what the compute step needs besides (``options``)."""

    items: Any
    rows: int
    options: Any = None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)


Compute = Callable[[list[Job]], list[Any]]
"""Runs the model on a batch of jobs in the worker thread; one result per job, in order (or raises)."""
Finish = Callable[[list[Job], list[Any]], Awaitable[list[Any]]]
"""Turns the compute step's results into each job's answer on the event loop (an item may be an exception)."""


class MicroBatcher:
    """Gathers jobs into batches of at most ``max_batch_size`` rows for ``compute``.

    Args:
        compute: the model step (runs in the worker thread).
        max_batch_size: rows per call; a request with more rows runs alone.
        max_wait_ms: how long the oldest request may wait for others.
        max_queue_rows: rows waiting at most; beyond, :meth:`submit` raises :class:`Busy`.
        finish: optional step on the event loop after ``compute``.
        observe_batch: called with the rows of each compute call (metrics).

    Example:
        >>> batcher = MicroBatcher(lambda jobs: [len(j.items) for j in jobs], 64, max_wait_ms=5)
        >>> await batcher.start(); await batcher.submit(["a", "b"], rows=2)  # doctest: +SKIP
        2
    """

    def __init__(
        self,
        compute: Compute,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_rows: int = 100_000,
        finish: Finish | None = None,
        observe_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.compute, self.finish, self.observe_batch = compute, finish, observe_batch
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_queue_rows = max_queue_rows
        self.queue: collections.deque[Job] = collections.deque()
        self.queued_rows = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jeidnn-model")
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._finishing: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, *self._finishing, return_exceptions=True)
        self.executor.shutdown(wait=True)

    def run_in_model_thread(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        """Run ``fn`` in the model's thread (one model call at a time)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def submit(self, items: Any, rows: int, options: Any = None) -> Any:
        """Queue a request and wait for its answer (its compute/finish result, or the exception it raised)."""
        assert self._arrived is not None, "call start() first"
        if self.queued_rows + rows > self.max_queue_rows and self.queue:
            raise Busy(f"the server has {self.queued_rows} inputs waiting; retry later")
        job = Job(items, rows, options)
        self.queue.append(job)
        self.queued_rows += rows
        self._arrived.set()
        return await job.future

    # ------------------------------------------------------------------ the worker
    def _take(self) -> Job:
        job = self.queue.popleft()
        self.queued_rows -= job.rows
        return job

    async def _gather(self) -> list[Job]:
        """The next batch: the oldest job and those that fit behind it, until the batch's deadline."""
        assert self._arrived is not None
        ready = time.monotonic()
        while not self.queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._take()]
        rows = batch[0].rows
        # A request waits at most max_wait for others once the model is free: the time it queued while the
        # model ran the batch before does not count (closed-loop clients whose answers just left would
        # otherwise never join the requests that queued meanwhile, and batches stay half full).
        deadline = max(batch[0].enqueued, ready) + self.max_wait
        while rows < self.max_batch_size:
            if self.queue:
                if rows + self.queue[0].rows > self.max_batch_size:
                    break
                batch.append(self._take())
                rows += batch[-1].rows
                continue
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                break
        return [
            job for job in batch if not job.future.done()
        ]  # a client that went away has its future cancelled

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            outcomes = await self.run_in_model_thread(lambda batch=batch: self._compute(batch))
            if self.finish is None:
                self._resolve(batch, outcomes)
            else:
                task = asyncio.create_task(self._finish(batch, outcomes))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)

    def _compute(self, batch: list[Job]) -> list[Any]:
        """``compute`` on the batch; on a failure, each job alone, so only the failing ones get the error."""
        try:
            return self._call(batch)
        except Exception as exc:  # noqa: BLE001 - answered per request below
            if len(batch) == 1:
                return [exc]
        outcomes: list[Any] = []
        for job in batch:
            try:
                outcomes += self._call([job])
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                outcomes.append(exc)
        return outcomes

    def _call(self, jobs: list[Job]) -> list[Any]:
        if self.observe_batch is not None:
            self.observe_batch(sum(job.rows for job in jobs))
        results = self.compute(jobs)
        assert len(results) == len(jobs), "compute must return one result per job"
        return results

    async def _finish(self, batch: list[Job], outcomes: list[Any]) -> None:
        assert self.finish is not None
        try:
            answers = await self.finish(batch, outcomes)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets it
            answers = [exc] * len(batch)
        self._resolve(batch, answers)

    @staticmethod
    def _resolve(batch: Sequence[Job], outcomes: Sequence[Any]) -> None:
        for job, outcome in zip(batch, outcomes):
            if job.future.done():  # cancelled by a client that went away
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
