"""``redis://``: the API side of the Redis Streams deployment.

submit: admission check + ``XADD`` in one atomic script -> wait on a future keyed by a fresh
correlation id -> resolved by this process's reply reader. One reply stream per API process
(host + pid + random); it carries a TTL so it disappears with its replica. A monitor task reads
worker heartbeats (who serves which model, how fast) and stream statistics every
``heartbeat_s`` (``service/queue/fleet.py``); admission uses them without an extra round
trip per request. A request for a model no live worker serves (start-up, a rolling restart)
waits for one, up to its deadline, with the monitor looking every ``WORKER_POLL_S`` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import socket
import time
import uuid
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelUnavailable,
    NotReady,
    Overloaded,
    QueueUnavailable,
    ServiceError,
)
from service.metrics import Metrics
from service.queue import connections
from service.queue.base import InferenceQueue, ItemResult, WorkItem
from service.queue.fleet import Fleet
from service.queue.wire import Reply, Streams, decode_reply, encode_request
from service.registry import Registry

# Refuse when the stream already holds ARGV[1] entries; otherwise append (approximate MAXLEN
# as a memory guard). Atomic, so concurrent replicas cannot overshoot the bound together.
ADD_IF_ROOM = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
READ_BLOCK_MS = 1000
RECENT = 4096
WORKER_POLL_S = 0.1
ENQUEUE_PAUSES_S = (0.05, 0.1, 0.2, 0.4)  # then 0.5 s, up to the request's deadline


class RedisQueue(InferenceQueue):
    def __init__(
        self,
        registry: Registry,
        url: str,
        *,
        max_queue_size: int = 256,
        prefix: str = "endofuse",
        stream_maxlen: int = 10_000,
        reply_ttl_s: int = 60,
        heartbeat_s: float = 1.0,
        connections: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self._url = url
        self._connections = connections
        self._max_queue_size = max_queue_size
        self._streams = Streams(prefix)
        self._maxlen = stream_maxlen
        self._reply_ttl_s = reply_ttl_s
        self._heartbeat_s = heartbeat_s
        self._metrics = metrics or Metrics()
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.reply_stream = self._streams.reply(owner)
        # Set beside the reply stream; found missing, it says the server lost its data.
        self._marker = f"{self.reply_stream}:up"
        self._waiting: dict[str, asyncio.Future[ItemResult]] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()  # id -> "answered" | "expired"
        self._fleet = Fleet(registry, self._streams, self._metrics)
        self._look_now = asyncio.Event()  # someone waits for a worker: refresh sooner
        self._reachable = True  # until a Redis call fails
        self._reading = True  # the reply reader's own connection works (the server is up)
        self._accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: aioredis.Redis | None = None
        self._replies: aioredis.Redis | None = None  # the reply reader's own connection

    async def start(self) -> None:
        # Start even if Redis is down: requests get 503 until it is reachable.
        name = f"endofuse-api:{socket.gethostname()}:{os.getpid()}"

        def client(size: int, label: str) -> aioredis.Redis:
            return connections.open_client(
                self._url, size, label, socket_timeout=READ_BLOCK_MS / 1e3 + 4, connect_timeout=2
            )

        self._redis = client(self._connections - 1, name)
        # The reply reader has a connection of its own: its blocking reads hold no slot of
        # the requests' pool, and that it works tells that the server is up (_enqueue).
        self._replies = client(1, name + ":replies")
        self._add = self._redis.register_script(ADD_IF_ROOM)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(connections.warm(self._redis), name="queue-connect"),
            loop.create_task(connections.warm(self._replies), name="replies-connect"),
            loop.create_task(self._read_replies(), name="reply-reader"),
            loop.create_task(self._monitor(), name="queue-monitor"),
        ]
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False
        end = time.monotonic() + 30
        while self._waiting and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        # Each step bounded: a Redis that stopped answering must not hold the process open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        if self._redis is not None:
            with contextlib.suppress(RedisError, TimeoutError):
                await asyncio.wait_for(self._redis.delete(self.reply_stream, self._marker), 5)
            for client in (self._redis, self._replies):
                with contextlib.suppress(RedisError, TimeoutError):
                    await asyncio.wait_for(client.aclose(), 5)

    def depth(self, model_key: str) -> int:
        return self._fleet.depth.get(model_key, 0)

    def reachable(self) -> bool:
        return self._reachable

    def workers(self) -> dict[str, int]:
        return dict(self._fleet.workers)

    def _retry_after(self, model_key: str) -> float:
        rate = self._fleet.capacity.get(model_key) or 0.0
        return max(1.0, math.ceil(self.depth(model_key) / rate)) if rate else 1.0

    async def submit(self, item: WorkItem, timeout_s: float) -> ItemResult:
        if not self._accepting or self._redis is None:
            raise NotReady("service is not accepting requests")
        key = item.model_key
        deadline = time.monotonic() + timeout_s
        await self._await_worker(key, deadline)
        timeout_s = max(deadline - time.monotonic(), 1e-3)
        limit = self._max_queue_size
        if rate := self._fleet.capacity.get(key):
            # Admit only what the live workers can finish before the deadline.
            limit = max(1, min(limit, int(timeout_s * rate)))
        corr = uuid.uuid4().hex
        fields = encode_request(item, self.reply_stream, time.time() + timeout_s)
        fields["id"] = corr
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        self._waiting[corr] = future
        try:
            args: list[bytes | str | int] = [limit, self._maxlen]
            for name, value in fields.items():
                args += [name, value]
            added = await self._enqueue(key, args, deadline)
            if added is None:
                raise Overloaded("inference queue is full", retry_after=self._retry_after(key))
            left = max(deadline - time.monotonic(), 1e-3)
            return await asyncio.wait_for(asyncio.shield(future), left)
        except TimeoutError:
            self._remember(corr, "expired")
            raise DeadlineExceeded(f"no result within {timeout_s:.1f} s") from None
        finally:
            self._waiting.pop(corr, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                # An outage can fail this future while XADD is still in flight; the caller
                # got its own 503, so mark the future's copy seen (no "never retrieved" noise).
                future.exception()

    async def _enqueue(self, key: str, args: list[bytes | str | int], deadline: float) -> Any:
        """XADD if there is room: the entry id, or None when the stream is full.

        A connection the client could not make or use (after its own retries, ~2 s) is tried
        again up to the deadline while this process's reply reader still reaches the server:
        then Redis is up and only this connection failed (cut by the server, and its
        reconnection refused or stalled on a name lookup; service/queue/connections.py).
        Should the failed attempt have been written after all, the request runs twice and
        its second reply is dropped as a duplicate. Without the reader (an outage), or past
        the deadline, 503."""
        pauses = iter(ENQUEUE_PAUSES_S)
        while True:
            try:
                # Bounded by the deadline: the answer is due by then anyway.
                return await asyncio.wait_for(
                    self._add(keys=[self._streams.requests(key)], args=args),
                    max(deadline - time.monotonic(), 1e-3),
                )
            except (RedisConnectionError, RedisTimeoutError) as error:
                pause = next(pauses, 0.5)
                if not self._reading or time.monotonic() + pause >= deadline:
                    raise QueueUnavailable(
                        "the request queue is unreachable", retry_after=1.0
                    ) from None
                self._metrics.enqueue_retries.labels(type(error).__name__).inc()
                await asyncio.sleep(pause)
            except RedisError:  # refused by the server (e.g. out of memory): no retry helps
                raise QueueUnavailable(
                    "the request queue is unreachable", retry_after=1.0
                ) from None

    async def _await_worker(self, key: str, deadline: float) -> None:
        """Return once a live worker serves ``key``; past ``deadline``, 503. Queuing without
        one would only hold the request in Redis, unseen by admission control."""
        fleet = self._fleet
        while not (fleet.seen and key in fleet.capacity):
            if fleet.seen and key in fleet.refused:
                # Waiting would not help: the workers up now have left it out for good.
                raise ModelUnavailable(
                    f"model version '{key}' is not served: the live workers refused it at "
                    "their self-check (their answers differ from those its decision "
                    "thresholds were fitted on)"
                )
            if not self._reachable:
                raise QueueUnavailable("the request queue is unreachable", retry_after=1.0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Overloaded(f"no worker is serving model '{key}'", retry_after=1.0)
            self._look_now.set()
            await asyncio.sleep(min(WORKER_POLL_S, left))
            if not self._accepting:
                raise NotReady("service is not accepting requests")

    def _remember(self, corr: str, outcome: str) -> None:
        self._recent[corr] = outcome
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def resolve(self, reply: Reply) -> None:
        future = self._waiting.get(reply.request_id)
        if future is None or future.done():
            reason = {"answered": "duplicate", "expired": "late"}.get(
                self._recent.get(reply.request_id, ""), "unknown"
            )
            self._metrics.replies_dropped.labels(reason).inc()
            return
        self._remember(reply.request_id, "answered")
        if reply.result is not None:
            future.set_result(reply.result)
        else:
            future.set_exception(_remote_error(reply))

    def _fail_waiting(self, error: ServiceError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)

    async def _read_replies(self) -> None:
        redis = self._replies
        assert redis is not None
        last, refreshed = "0-0", 0.0
        marked = False  # the marker is set (and so its absence would mean lost data)
        read: list[Any] = []  # entries already resolved, deleted in the next read's round trip
        while True:
            try:
                if not marked:
                    # SET is refused at maxmemory (EXPIRE is not): then try again next round.
                    with contextlib.suppress(ResponseError):
                        await redis.set(self._marker, 1, ex=self._reply_ttl_s)
                        marked = True
                if time.monotonic() - refreshed > self._reply_ttl_s / 3:
                    pipe = redis.pipeline(transaction=False)
                    pipe.expire(self.reply_stream, self._reply_ttl_s)
                    pipe.expire(self._marker, self._reply_ttl_s)
                    await pipe.execute()
                    refreshed = time.monotonic()
                pipe = redis.pipeline(transaction=False)
                if read:
                    # Dropped if this round trip fails: a few stale replies are harmless.
                    pipe.xdel(self.reply_stream, *read)
                    read = []
                pipe.exists(self._marker)
                pipe.xread({self.reply_stream: last}, 256, READ_BLOCK_MS)
                *_, up, got = await pipe.execute()
                self._metrics.queue_up.set(1)
                self._reachable = self._reading = True
            except asyncio.CancelledError:
                raise
            except RedisError:
                # Unreachable is not lost: the same server coming back still holds the
                # queued entries and their replies, so the waiting requests keep waiting
                # (up to their deadlines) and reading resumes where it stopped.
                self._metrics.queue_up.set(0)
                self._reachable = self._reading = False
                await asyncio.sleep(0.2)
                continue
            ids = []
            for _, entries in got or []:
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    last = entry_id
                    try:
                        self.resolve(decode_reply(fields))
                    except (KeyError, ValueError):
                        self._metrics.replies_dropped.labels("malformed").inc()
            # Deleted with the next read rather than now: no round trip of its own, and the
            # next reply does not wait for one. Reading resumes after `last` either way.
            read = ids
            if marked and not up:
                # The marker set beside the reply stream is gone: the server lost its data
                # (restarted; Redis keeps no copy on disk), so whatever was queued is gone.
                # Fail fast (503) rather than let every client wait out its deadline.
                self._fail_waiting(QueueUnavailable("lost the request queue", retry_after=1.0))
                marked, refreshed = False, 0.0
                last = last if ids else "0-0"

    async def _monitor(self) -> None:
        while True:
            try:
                assert self._redis is not None
                await self._fleet.refresh(self._redis)
            except asyncio.CancelledError:
                raise
            except RedisError:
                self._metrics.queue_up.set(0)
                self._reachable = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look_now.wait(), self._heartbeat_s)
            if self._look_now.is_set():
                self._look_now.clear()
                await asyncio.sleep(WORKER_POLL_S)  # at most this often while requests wait


def _remote_error(reply: Reply) -> ServiceError:
    error = InferenceFailed(reply.message or "inference failed")
    error.code = reply.code or error.code
    return error
