"""An inference worker on the Redis request streams.

A reader and one lane per session of the largest instance group. The reader
``XREADGROUP``s (short block) whole batches into a local buffer, up to
``worker_read_ahead`` batches beyond those running; each lane takes the next batch, drops
entries past their deadline (acknowledged, never run), runs it on a free session (a failing
item fails alone) and hands it to a reply task: **reply, then XACK + XDEL**. A session that
finishes thus finds its next batch in hand, and the Redis round trips overlap inference.
A crash between reply and acknowledgement gives a duplicate reply (the API drops it), never
a lost one. An entry that cannot be handled is left pending; what was read but not run
when the worker stops is run before it exits.

Recovery of entries a dead or stuck consumer left pending (reclaim, dead letters) is in
``service.worker.recovery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from redis.exceptions import RedisError, ResponseError

from service import looplag
from service.config import Settings
from service.errors import ServiceError
from service.metrics import WorkerMetrics
from service.queue import connections
from service.queue.base import ItemResult, WorkItem
from service.queue.batcher import infer_isolated, spread
from service.queue.wire import (
    Streams,
    as_text,
    decode_request,
    encode_error,
    encode_result,
    entry_ms,
)
from service.registry import ModelVersion, Registry
from service.reload import ModelWatcher
from service.worker.recovery import Recovery

log = logging.getLogger("service.worker")
DRAIN_S = 30.0  # longest a removed version is served for what was queued before its removal
REPLY_RETRY_PAUSES_S = (0.1, 0.3, 0.6, 1.0)  # between tries of a refused reply/acknowledge
Entry = tuple[bytes, dict[bytes, bytes]]


class Worker(Recovery):
    def __init__(self, settings: Settings, registry: Registry, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.streams = Streams(settings.queue_prefix)
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.models: dict[str, ModelVersion] = {
            self.streams.requests(mv.key): mv for mv in registry.all()
        }
        metrics.serving.publish(registry)
        registry.listeners.append(lambda: metrics.serving.publish(registry))
        self._rates: dict[str, float] = {}
        self._replying: set[asyncio.Task[None]] = set()
        sessions = [mv.engine.size for mv in registry.all() if mv.engine is not None]
        self._executor = ThreadPoolExecutor(max(sessions, default=1), thread_name_prefix="infer")
        self._stopping = asyncio.Event()
        self.ready = False
        # The read, heartbeat and recovery loops, and one reply in flight per batch in hand.
        size = max(settings.queue_connections, self._lanes() + settings.worker_read_ahead + 4)
        self.redis = connections.open_client(
            settings.queue_url,
            size,
            f"endofuse-worker:{self.consumer}",
            socket_timeout=settings.worker_block_ms / 1e3 + 5,
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(connections.warm(self.redis), name="queue-connect"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(looplag.watch(self.metrics.loop_lag), name="loop-lag"),
        ]
        if self.settings.reload_s > 0:
            watcher = ModelWatcher(
                self.registry,
                self.settings.models_dir,
                self.metrics.model_events,
                self.add_model,
                self.remove_model,
                only=self.settings.models or None,
                on_changed=lambda: self.metrics.serving.publish(self.registry),
            )
            tasks.append(asyncio.create_task(watcher.run(self.settings.reload_s), name="reload"))
        try:
            await self._consume_loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.redis.delete(self.streams.worker(self.consumer))
            await self.redis.aclose()
            self._executor.shutdown(wait=True)

    def stop(self) -> None:
        """Finish the batch in hand, then exit (what is still queued stays for others)."""
        self._stopping.set()

    async def add_model(self, mv: ModelVersion) -> None:
        """Read a version's stream from now on, and say so in the next heartbeat at once."""
        stream = self.streams.requests(mv.key)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: another worker made it
            await self.redis.xgroup_create(stream, self.streams.group, id="0", mkstream=True)
        self.models = {**self.models, stream: mv}  # loops iterating the old dict are safe
        if self.ready:
            await self._beat()

    async def remove_model(self, mv: ModelVersion) -> None:
        """Keep serving a removed version until nothing is queued or unacknowledged for it
        (the API stopped routing to it first), then stop reading its stream."""
        stream = self.streams.requests(mv.key)
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            with contextlib.suppress(RedisError):
                queued = await self.redis.xlen(stream)
                pending = (await self.redis.xpending(stream, self.streams.group))["pending"]
                if queued == 0 and pending == 0:
                    break
            await asyncio.sleep(0.2)
        self.models = {s: m for s, m in self.models.items() if s != stream}
        if self.ready:
            await self._beat()

    async def ensure_groups(self) -> None:
        for stream in self.models:
            try:
                await self.redis.xgroup_create(stream, self.streams.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # --- the consume loop -----------------------------------------------------------------

    async def _consume_loop(self) -> None:
        lanes = self._lanes()
        batches: asyncio.Queue[tuple[str, list[Entry]] | None] = asyncio.Queue()
        # One slot per batch read and not yet run: what the reader may hold ahead.
        slots = asyncio.Semaphore(lanes + self.settings.worker_read_ahead)
        running = [
            asyncio.create_task(self._lane(batches, slots), name=f"lane-{i}") for i in range(lanes)
        ]
        try:
            await self._read_loop(batches, slots)
        finally:
            for _ in running:
                batches.put_nowait(None)  # after what was read: the lanes run it first
            ended = await asyncio.gather(*running, return_exceptions=True)
            await asyncio.gather(*self._replying, return_exceptions=True)
        for outcome in ended:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _read_loop(
        self, batches: asyncio.Queue[tuple[str, list[Entry]] | None], slots: asyncio.Semaphore
    ) -> None:
        s = self.settings
        need_groups = True
        lanes = self._lanes()
        while not self._stopping.is_set():
            await slots.acquire()
            taken = 1
            while taken < lanes + s.worker_read_ahead and not slots.locked():
                await slots.acquire()  # free now: read as many batches at once as there is room
                taken += 1
            if self._stopping.is_set():  # told to stop while waiting for room: read no more
                break
            try:
                if need_groups:
                    await self.ensure_groups()
                    need_groups = False
                got = await self.redis.xreadgroup(
                    self.streams.group,
                    self.consumer,
                    {stream: ">" for stream in self.models},
                    count=taken * self._read_count(),
                    block=s.worker_block_ms,
                )
                if not self.ready:
                    await self._beat()  # announce before /readyz says so
                self.ready = True
                self.metrics.queue_up.set(1)
            except ResponseError as exc:
                # NOGROUP: Redis restarted empty (no persistence); recreate and carry on.
                need_groups = "NOGROUP" in str(exc)
                if not need_groups:
                    raise
                got = None
            except RedisError:
                self.ready = False
                self.metrics.queue_up.set(0)
                need_groups = True
                got = None
                await asyncio.sleep(0.2)
            for stream, entries in got or []:
                stream = as_text(stream)
                for batch in spread(entries, self._batch_limit(self.models[stream]), lanes):
                    if taken == 0:
                        await slots.acquire()  # several streams answered: wait for room
                        taken = 1
                    batches.put_nowait((stream, batch))
                    taken -= 1
            for _ in range(taken):
                slots.release()

    async def _lane(
        self, batches: asyncio.Queue[tuple[str, list[Entry]] | None], slots: asyncio.Semaphore
    ) -> None:
        """Run batches as they come, one at a time; the reply goes on in the background."""
        try:
            while (batch := await batches.get()) is not None:
                stream, entries = batch
                try:
                    replies, ids = await self._run_entries(stream, entries)
                finally:
                    slots.release()
                task = asyncio.create_task(self._reply_and_ack(stream, replies, ids))
                self._replying.add(task)
                task.add_done_callback(self._replying.discard)
        except BaseException:
            self._stopping.set()  # a lane that cannot go on stops the worker, as a crash would
            raise

    def _lanes(self) -> int:
        """Batches run at once: one per session of the largest instance group."""
        sizes = [mv.engine.size for mv in self.models.values() if mv.engine is not None]
        return max(sizes, default=1)

    def _batch_limit(self, mv: ModelVersion) -> int:
        """The version's batch limit: measured at load, else the configured one."""
        assert mv.engine is not None
        return mv.engine.max_batch_size or self.settings.max_batch_size

    def _read_count(self) -> int:
        """Entries per batch slot: the largest batch limit of the versions served."""
        limits = [self._batch_limit(mv) for mv in self.models.values() if mv.engine is not None]
        return max(limits, default=self.settings.max_batch_size)

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        """Expire, run, reply, acknowledge entries read from ``stream`` (reclaimed ones)."""
        replies, ids = await self._run_entries(stream, entries)
        await self._reply_and_ack(stream, replies, ids)

    async def _run_entries(
        self, stream: str, entries: list[Entry]
    ) -> tuple[list[tuple[str, dict]], list[bytes]]:
        """-> (replies, the entry ids to acknowledge once they are sent)."""
        mv = self.models[stream]
        now = time.time()
        done: list[bytes] = []
        live: list[tuple[bytes, WorkItem, str]] = []
        for entry_id, fields in entries:
            if not fields:
                done.append(entry_id)  # deleted while pending: nothing left to do
                continue
            try:
                item, reply, deadline = decode_request(fields)
            except (KeyError, ValueError):
                self.metrics.items.labels(mv.name, "poison").inc()
                log.warning("unreadable queue entry left for redelivery", extra={"model": mv.key})
                continue
            if deadline <= now:
                self.metrics.items.labels(mv.name, "expired").inc()
                done.append(entry_id)
                continue
            live.append((entry_id, item, reply))
        replies: list[tuple[str, dict]] = []
        if live:
            replies = await self._infer(mv, live)
        return replies, done + [e for e, _, _ in live]

    async def _infer(
        self, mv: ModelVersion, live: list[tuple[bytes, WorkItem, str]]
    ) -> list[tuple[str, dict]]:
        """Run one batch on a free session of the version's group."""
        assert mv.engine is not None
        start = time.time()
        replies = await self._run_batch(mv, live)
        # Items per second of the whole group: each of its sessions runs such a batch at once.
        rate = len(live) / max(time.time() - start, 1e-6) * mv.engine.size
        self._rates[mv.key] = 0.8 * self._rates.get(mv.key, rate) + 0.2 * rate
        return replies

    async def _run_batch(
        self, mv: ModelVersion, live: list[tuple[bytes, WorkItem, str]]
    ) -> list[tuple[str, dict]]:
        start = time.time()
        loop = asyncio.get_running_loop()
        items = [item for _, item, _ in live]
        outcomes = await loop.run_in_executor(self._executor, infer_isolated, mv.engine, items)
        elapsed = time.time() - start
        self.metrics.batch_size.labels(mv.name).observe(len(items))
        self.metrics.stage.labels(mv.name, "inference").observe(elapsed)
        replies = []
        for (entry_id, item, reply), outcome in zip(live, outcomes, strict=True):
            queue_ms = max(0.0, start * 1e3 - entry_ms(entry_id))
            self.metrics.stage.labels(mv.name, "queue").observe(queue_ms / 1e3)
            if isinstance(outcome, ServiceError):
                self.metrics.items.labels(mv.name, "failed").inc()
                fields = encode_error(item.request_id, outcome.code, outcome.message, self.consumer)
            else:
                self.metrics.items.labels(mv.name, "ok").inc()
                probs, logits = outcome
                result = ItemResult(probs, queue_ms, elapsed * 1e3, len(items), logits=logits)
                fields = encode_result(item.request_id, result, self.consumer)
            replies.append((reply, fields))
        return replies

    async def _reply_and_ack(
        self, stream: str, replies: list[tuple[str, dict]], ids: list[bytes]
    ) -> None:
        """Replies first, acknowledgement second; a failure leaves the entries pending."""
        if not ids:
            return
        start = time.time()
        # A version removed by hot reload while its replies were in flight still gets them.
        name = self.models[stream].name if stream in self.models else stream
        # The answers are computed: a refused write is tried again for a moment before the
        # entries are left to redelivery, which waits for the reclaim bound and runs them
        # again, most often past their deadlines. A repeat whose first EXEC did land only
        # duplicates replies, which the API drops; XACK and XDEL are idempotent.
        for pause in (*REPLY_RETRY_PAUSES_S, None):
            try:
                # One round trip, and MULTI/EXEC: if any reply is refused (e.g. Redis at
                # maxmemory) nothing is acknowledged, so the entry is never let go unanswered.
                pipe = self.redis.pipeline(transaction=True)
                for reply, fields in replies:
                    pipe.xadd(reply, fields, maxlen=self.settings.stream_maxlen, approximate=True)
                    # Recreated by a late reply, a departed replica's stream still expires.
                    pipe.expire(reply, self.settings.reply_ttl_s)
                pipe.xack(stream, self.streams.group, *ids)
                pipe.xdel(stream, *ids)
                await pipe.execute()
                break
            except RedisError as error:
                # The class only: a pipeline's message quotes its commands, replies included.
                self.metrics.reply_failures.labels(name, type(error).__name__).inc()
                if pause is None:
                    log.warning(
                        "could not reply/acknowledge; entries stay pending for redelivery",
                        extra={"model": name, "entries": len(ids), "code": type(error).__name__},
                    )
                    return
                await asyncio.sleep(pause)
        self.metrics.stage.labels(name, "reply").observe(time.time() - start)

    async def _beat(self) -> None:
        """Announce this worker, its models and measured throughput (items/s) with a TTL."""
        ttl = max(2, int(3 * self.settings.heartbeat_s) + 1)
        beat = {
            "models": [mv.key for mv in self.models.values()],
            "rate": self._rates,
            "refused": sorted(self.registry.refused),  # API replicas answer these at once
        }
        await self.redis.set(self.streams.worker(self.consumer), json.dumps(beat), ex=ttl)

    async def _heartbeat(self) -> None:
        while True:
            if self.ready:
                with contextlib.suppress(RedisError):
                    await self._beat()
            await asyncio.sleep(self.settings.heartbeat_s)
