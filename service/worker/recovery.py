"""A worker's recovery of entries left pending by a dead or stuck consumer.

Two ways an entry is taken over (``XPENDING`` + ``XCLAIM``), each looked at at least once per
heartbeat:

- **departed**: its consumer's heartbeat key has expired (the worker died or lost Redis),
  so its entries are claimed at once rather than after the idle bound; such a consumer is
  forgotten (``XGROUP DELCONSUMER``) once it holds nothing and has been silent for long;
- **idle**: an entry delivered more than ``reclaim_idle_ms`` ago to a consumer that still
  beats (a stuck batch, or a poison entry being retried).

Taken-over entries are handled one by one, so one bad entry cannot sink its neighbours
again. After ``max_deliveries`` deliveries an entry is moved to the dead-letter stream
(metadata only) and its requester gets a 500.
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
CLAIM_COUNT = 100  # entries looked at per consumer and stream in one round


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
        s = self.settings
        interval = max(min(s.reclaim_idle_ms / 2e3, s.heartbeat_s), 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.take_over_departed()
                for stream in self.models:
                    await self.reclaim(stream)
            except asyncio.CancelledError:
                raise
            except (RedisError, KeyError):  # KeyError: a version removed while looked at
                continue

    async def take_over_departed(self) -> None:
        """Claim what consumers without a live heartbeat still hold, on every stream. The
        same workers read every stream: their consumers are listed and their heartbeats
        looked up in one round trip each, whatever the number of streams."""
        streams = list(self.models)
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_consumers(stream, self.streams.group)
        listed = await pipe.execute(raise_on_error=False)
        held = []  # (stream, consumer info, consumer name), other consumers than this one
        for stream, consumers in zip(streams, listed, strict=True):
            if isinstance(consumers, ResponseError):
                continue  # NOGROUP: the consume loop recreates it
            named = [(c, as_text(c["name"])) for c in consumers]
            held += [(stream, c, name) for c, name in named if name != self.consumer]
        names = sorted({name for _, _, name in held})
        if not names:
            return
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.streams.worker(name))
        beating = await pipe.execute()
        alive = {name for name, found in zip(names, beating, strict=True) if found}
        s = self.settings
        # A worker writes its first heartbeat right after its first read, so an entry
        # delivered this recently may belong to one that has only just started; and once
        # claimed, an entry is this fresh again, so a second claimer racing for it loses.
        min_idle_ms = min(s.reclaim_idle_ms, int(s.heartbeat_s * 1e3))
        for stream, c, name in held:
            if name in alive:
                continue
            if c["pending"]:
                pending = await self.redis.xpending_range(
                    stream,
                    self.streams.group,
                    "-",
                    "+",
                    CLAIM_COUNT,
                    consumername=name,
                    idle=min_idle_ms,
                )
                await self._take(stream, pending, min_idle_ms, "departed", name)
            elif c["idle"] > s.forget_consumer_s * 1e3:
                # Silent long past any pause of a live worker's reads: deleting a consumer
                # drops what it holds, and this one held nothing when looked at.
                await self.redis.xgroup_delconsumer(stream, self.streams.group, name)

    async def reclaim(self, stream: str) -> None:
        """Claim entries idle past ``reclaim_idle_ms``, whoever holds them."""
        s = self.settings
        try:
            pending = await self.redis.xpending_range(
                stream, self.streams.group, "-", "+", CLAIM_COUNT, idle=s.reclaim_idle_ms
            )
        except ResponseError:
            return  # NOGROUP: the consume loop recreates it
        await self._take(stream, pending, s.reclaim_idle_ms, "idle")

    async def _take(
        self,
        stream: str,
        pending: list[dict],
        min_idle_ms: int,
        reason: str,
        departed: str | None = None,
    ) -> None:
        """Dead-letter what was delivered too often, claim and handle the rest.
        ``departed``: the consumer whose heartbeat expired, named in the log line."""
        s = self.settings
        mv = self.models[stream]
        retry = []
        for p in pending:
            if p["times_delivered"] >= s.max_deliveries:
                await self._dead_letter(stream, p["message_id"], p["times_delivered"])
            else:
                retry.append(p)
        if not retry:
            return
        # min_idle_time makes the claim atomic: of several workers racing, one gets each entry.
        claimed = await self.redis.xclaim(
            stream, self.streams.group, self.consumer, min_idle_ms, [p["message_id"] for p in retry]
        )
        if claimed and departed is not None:
            # Logged at the claim, before the entries run: with how long they had waited since
            # delivery, it tells a late take-over from a slow one.
            log.warning(
                "took over a departed worker's entries",
                extra={
                    "model": mv.key,
                    "consumer": departed,
                    "entries": len(claimed),
                    "waited_ms": max(int(p["time_since_delivered"]) for p in retry),
                },
            )
        for entry in claimed:
            self.metrics.reclaimed.labels(mv.name, reason).inc()
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
