"""Dynamic batcher in front of one engine (or an instance group of several sessions).

Policy: an idle session with nothing queued runs a lone request at once (no batching window
at low load). Requests that arrive while every session is busy pile up; when a session frees,
the backlog is shared among the free sessions (each takes at most ``max_batch_size``), and
only when such a backlog exists does the batcher wait up to ``max_wait_s`` to fill a batch.
Each session runs on its own thread, so batches form and run while others work. A request
that arrives while nothing runs or waits may instead hold a session (``idle_session``) and be
decoded and run on that session's thread: one hand-over between threads instead of two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service.engine import Batch, Engine, EnginePool
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded, ServiceError
from service.queue.base import IdleSession, ItemResult, WorkItem

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    item: WorkItem
    future: asyncio.Future[ItemResult]
    enqueued: float
    deadline: float
    started: float = field(default=0.0)


class DynamicBatcher:
    def __init__(
        self,
        engine: Engine | EnginePool,
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.002,
        max_queue_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self.instances = getattr(engine, "size", 1)
        self._items: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.instances, thread_name_prefix="infer")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._free = asyncio.Event()  # set whenever a session may take a batch
        self._free.set()
        self._accepting = False
        self._in_flight = 0  # batches taken and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        # Seconds per batch, smoothed; used for Retry-After and admission control.
        self._batch_seconds = 0.01

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, answer everything accepted, then stop the worker thread."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._drained(), drain_timeout_s)
        except TimeoutError:
            log.warning("batcher stopped with work still queued", extra={"depth": self.depth})
            for pending in self._items:
                _fail(pending, NotReady("service is shutting down"))
            self._items.clear()
        tasks = [t for t in (self._task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        self._executor.shutdown(wait=True)

    def expected_wait_s(self) -> float:
        batches_ahead = math.ceil((self.depth + 1) / self.max_batch_size) + self._in_flight
        return math.ceil(batches_ahead / self.instances) * self._batch_seconds

    async def submit(self, item: WorkItem, timeout_s: float) -> ItemResult:
        if not self._accepting:
            raise NotReady("service is not accepting requests")
        if self.depth >= self.max_queue_size:
            raise Overloaded("inference queue is full", retry_after=self._retry_after())
        if self.expected_wait_s() > timeout_s:
            raise Overloaded(
                "expected queue wait exceeds the request deadline",
                retry_after=self._retry_after(),
            )
        now = time.monotonic()
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(item=item, future=future, enqueued=now, deadline=now + timeout_s)
        self._items.append(pending)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            future.cancel()  # the worker skips it if it has not started yet
            raise DeadlineExceeded(f"no result within {timeout_s:.1f} s") from None
        except asyncio.CancelledError:
            future.cancel()  # client went away: do not spend inference on it
            raise

    def idle_session(self) -> IdleSession | None:
        """Hold a session for one request if nothing runs or waits (on the event loop, so no
        batch can take it meanwhile); released when its thread is done. Only then: under
        load, a session held while its request decodes stands idle beside decode threads
        that would have kept it busy (measured: 10 % fewer req/s at concurrency 8 when any
        idle session could be held)."""
        if not self._accepting or self._items or self._in_flight:
            return None
        self._in_flight += 1
        return _HeldSession(self)

    def _release(self) -> None:
        self._in_flight -= 1
        self._free.set()
        if not self._items and not self._in_flight:
            self._idle.set()

    def _observe(self, seconds: float, size: int) -> None:
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(size)

    def _retry_after(self) -> float:
        return max(1.0, math.ceil(self.expected_wait_s()))

    async def _drained(self) -> None:
        while self._items or self._in_flight:
            self._idle.clear()
            await self._idle.wait()

    async def _loop(self) -> None:
        while True:
            while not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
            while self._in_flight >= self.instances:
                self._free.clear()
                await self._free.wait()
            batch = self._take(self._share())
            # Busy from the moment items leave the deque: stop() must not see "drained" while
            # a batch is being filled or run, or those requests would never be answered.
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._serve_guarded(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _share(self) -> int:
        """This batch's part of the backlog: spread over the sessions that are free now."""
        free = self.instances - self._in_flight
        return min(self.max_batch_size, max(1, math.ceil(len(self._items) / free)))

    async def _serve_guarded(self, batch: list[_Pending]) -> None:
        try:
            await self._serve(batch)
        except Exception:
            # Never let a failure escape: that would strand the requests it holds.
            log.exception("batch failed unexpectedly", extra={"batch_size": len(batch)})
            for p in batch:
                _fail(p, InferenceFailed("inference failed"))
        finally:
            self._release()

    async def _serve(self, batch: list[_Pending]) -> None:
        # One session: a batch taken from a backlog waits briefly to fill. Several: the next
        # free session takes its share of later arrivals itself.
        if 1 < len(batch) < self.max_batch_size and self.max_wait_s > 0 and self.instances == 1:
            await self._fill(batch)
        now = time.monotonic()
        live = []
        for p in batch:
            if p.future.done():
                continue  # cancelled by a client that went away or timed out
            if p.deadline <= now:
                _fail(p, DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(p)
        if live:
            await self._run(live)

    def _take(self, limit: int) -> list[_Pending]:
        batch = []
        while self._items and len(batch) < limit:
            batch.append(self._items.popleft())
        return batch

    async def _fill(self, batch: list[_Pending]) -> None:
        end = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._items:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    return
            while self._items and len(batch) < self.max_batch_size:
                batch.append(self._items.popleft())

    async def _run(self, batch: list[_Pending]) -> None:
        start = time.monotonic()
        for p in batch:
            p.started = start
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self._executor, self._infer, [p.item for p in batch])
        elapsed = time.monotonic() - start
        self._observe(elapsed, len(batch))
        for p, outcome in zip(batch, outcomes, strict=True):
            if p.future.done():
                continue
            if isinstance(outcome, BaseException):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(
                    ItemResult(
                        probabilities=outcome[0],
                        queue_ms=(p.started - p.enqueued) * 1e3,
                        inference_ms=elapsed * 1e3,
                        batch_size=len(batch),
                        logits=outcome[1],
                    )
                )

    def _infer(self, items: list[WorkItem]) -> list[Outcome]:
        return infer_isolated(self.engine, items)


class _HeldSession(IdleSession):
    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher

    async def run(
        self, prepare: Callable[[], T], item: Callable[[T], WorkItem], timeout_s: float
    ) -> tuple[T, float, ItemResult]:
        batcher, loop = self._batcher, asyncio.get_running_loop()

        def work() -> tuple[Any, float, Outcome, float]:
            try:
                prepared = prepare()
                ready = time.perf_counter()
                outcome = infer_isolated(batcher.engine, [item(prepared)])[0]
                return prepared, ready, outcome, time.perf_counter() - ready
            finally:
                # From the thread, not the awaiting request: a client that goes away must not
                # free a session that is still running.
                loop.call_soon_threadsafe(batcher._release)

        try:
            future = loop.run_in_executor(batcher._executor, work)
        except RuntimeError:  # executor shut down: work() never runs to release
            batcher._release()
            raise NotReady("service is shutting down") from None
        try:
            prepared, ready, outcome, seconds = await asyncio.wait_for(
                asyncio.shield(future), timeout_s
            )
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {timeout_s:.1f} s") from None
        batcher._observe(seconds, 1)
        if isinstance(outcome, BaseException):
            raise outcome
        result = ItemResult(
            probabilities=outcome[0],
            queue_ms=0.0,
            inference_ms=seconds * 1e3,
            batch_size=1,
            logits=outcome[1],
        )
        return prepared, ready, result


# Per item: (probabilities [K], logits [K] or None), or the error that item alone met.
Outcome = tuple[np.ndarray, np.ndarray | None] | ServiceError


def infer_isolated(engine: Engine, items: list[WorkItem]) -> list[Outcome]:
    """Run a batch; if it fails, rerun items one by one so only the culprit fails."""
    try:
        probs, logits = engine.run_with_logits(stack(items))
    except Exception as exc:  # isolate: any failure must not take the neighbours down
        if len(items) == 1:
            return [_as_service_error(exc)]
        return [infer_isolated(engine, [item])[0] for item in items]
    rows = logits if logits is not None else [None] * len(probs)
    return [_checked_row(p, lg) for p, lg in zip(probs, rows, strict=True)]


def stack(items: list[WorkItem]) -> Batch:
    """Stack per-request arrays into engine inputs (raises ValueError on a shape mismatch)."""
    images = np.stack([i.image for i in items])
    if all(i.tabular is None for i in items):
        tabular = mask = None
    else:
        width = next(i.tabular.shape[0] for i in items if i.tabular is not None)
        zeros = np.zeros(width, np.float32)
        tabular = np.stack([i.tabular if i.tabular is not None else zeros for i in items])
        mask = np.stack([i.tabular_mask if i.tabular_mask is not None else zeros for i in items])
    image_mask = np.array([[1.0 if i.image_present else 0.0] for i in items], np.float32)
    return Batch(images=images, tabular=tabular, tabular_mask=mask, image_mask=image_mask)


def _checked_row(row: np.ndarray, logits: np.ndarray | None) -> Outcome:
    if not np.all(np.isfinite(row)) or abs(float(row.sum()) - 1.0) > 1e-3:
        return InferenceFailed("model produced invalid probabilities for this input")
    return row, logits


def _as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    return InferenceFailed(f"inference failed: {type(exc).__name__}")


def _fail(pending: _Pending, error: ServiceError) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


def spread(entries: list[T], limit: int, lanes: int) -> list[list[T]]:
    """Entries in batches of at most ``limit``, over as many of ``lanes`` as there are
    entries: two entries read while two sessions are free run at once, not as a batch of 2."""
    n = max(-(-len(entries) // limit), min(len(entries), lanes))
    size = -(-len(entries) // n) if n else 0
    return [entries[i : i + size] for i in range(0, len(entries), size)] if n else []
