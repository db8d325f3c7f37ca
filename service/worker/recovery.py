"""A worker's recovery of entries left pending by a dead or stuck consumer.

Entries idle past ``reclaim_idle_ms`` are claimed (``XPENDING`` + ``XCLAIM``) and handled
one by one, so one bad entry cannot sink its neighbours again. After ``max_deliveries``
deliveries an entry is moved to the dead-letter stream (metadata only) and its requester
gets a 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError, ResponseError

from service.queue.wire import as_text, encode_error, request_metadata

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from service.config import Settings
    from service.metrics import WorkerMetrics
    from service.queue.wire import Streams
    from service.registry import ModelVersion

log = logging.getLogger("service.worker")


class Recovery:
    """Mixed into :class:`service.worker.consumer.Worker`, whose state it uses."""

    settings: Settings
    redis: aioredis.Redis
    streams: Streams
    consumer: str
    models: dict[str, ModelVersion]
    metrics: WorkerMetrics

    async def handle(self, stream: str, entries: list) -> None:
        raise NotImplementedError

    async def _reclaim_loop(self) -> None:
        interval = max(self.settings.reclaim_idle_ms / 2e3, 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                for stream in self.models:
                    await self.reclaim(stream)
            except asyncio.CancelledError:
                raise
            except RedisError:
                continue

    async def reclaim(self, stream: str) -> None:
        s = self.settings
        try:
            pending = await self.redis.xpending_range(
                stream, self.streams.group, "-", "+", 100, idle=s.reclaim_idle_ms
            )
        except ResponseError:
            return  # NOGROUP: the consume loop recreates it
        mv = self.models[stream]
        retry = []
        for p in pending:
            if p["times_delivered"] >= s.max_deliveries:
                await self._dead_letter(stream, p["message_id"], p["times_delivered"])
            else:
                retry.append(p["message_id"])
        if not retry:
            return
        # min_idle_time makes the claim atomic: of several workers racing, one gets each entry.
        claimed = await self.redis.xclaim(
            stream, self.streams.group, self.consumer, s.reclaim_idle_ms, retry
        )
        for entry in claimed:
            self.metrics.reclaimed.labels(mv.name).inc()
            await self.handle(stream, [entry])

    async def _dead_letter(self, stream: str, entry_id: bytes, deliveries: int) -> None:
        mv = self.models[stream]
        entries = await self.redis.xrange(stream, entry_id, entry_id)
        meta = request_metadata(entries[0][1]) if entries else {}
        record = {**meta, "stream": stream, "entry": as_text(entry_id), "deliveries": deliveries}
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.streams.dead_letters, record, maxlen=self.settings.stream_maxlen, approximate=True
        )
        if meta.get("reply") and meta.get("id"):
            message = f"request failed {deliveries} times and was dead-lettered"
            pipe.xadd(
                meta["reply"], encode_error(meta["id"], "dead_lettered", message, self.consumer)
            )
            pipe.expire(meta["reply"], self.settings.reply_ttl_s)
        pipe.xack(stream, self.streams.group, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()
        self.metrics.dead_letters.labels(mv.name).inc()
        log.error("entry dead-lettered", extra={"model": mv.key, "deliveries": deliveries})
