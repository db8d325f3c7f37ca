"""What the API side of the Redis deployment knows about its workers, refreshed from Redis.

Each worker publishes a heartbeat (the model versions it serves, its measured rate, the
versions its self-check refused) under a key that expires with it. ``Fleet.refresh`` reads
them with the request streams' depth, pending and lag, so that admission (capacity, depth)
and routing (refused versions) need no Redis round trip of their own per request.
"""

from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis

from service.metrics import Metrics
from service.queue.wire import Streams
from service.registry import Refused, Registry

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, registry: Registry, streams: Streams, metrics: Metrics) -> None:
        self._registry = registry
        self._streams = streams
        self._metrics = metrics
        self.capacity: dict[str, float] = {}  # model key -> items/s over live workers
        self.workers: dict[str, int] = {}  # model key -> live workers
        self.refused: set[str] = set()  # refused by a live worker's self-check, served by none
        self.depth: dict[str, int] = {}
        self.seen = False  # refreshed at least once: until then nothing is known to be absent

    async def refresh(self, redis: aioredis.Redis) -> None:
        """Live workers and their measured throughput; stream depth, pending and lag."""
        keys = [k async for k in redis.scan_iter(self._streams.worker_pattern, count=500)]
        capacity: dict[str, float] = {}
        workers: dict[str, int] = {}
        refused: set[str] = set()
        for raw in await redis.mget(keys) if keys else []:
            if raw is None:
                continue  # expired between SCAN and MGET
            beat = json.loads(raw)
            for key in beat["models"]:
                # A worker that has not measured itself yet still counts as alive.
                capacity[key] = capacity.get(key, 0.0) + float(beat["rate"].get(key, 0.0))
                workers[key] = workers.get(key, 0) + 1
            refused.update(beat.get("refused", ()))
        self.capacity = capacity
        self.workers = workers
        self.refused = refused - capacity.keys()
        self._mark_refused()
        for mv in self._registry.all():
            stream = self._streams.requests(mv.key)
            pipe = redis.pipeline(transaction=False)
            pipe.xlen(stream)
            pipe.exists(stream)
            depth, exists = await pipe.execute()
            self.depth[mv.key] = int(depth)
            pending = lag = 0
            if exists:
                for group in await redis.xinfo_groups(stream):
                    pending += int(group.get("pending") or 0)
                    lag += int(group.get("lag") or 0)
            self._metrics.queue_pending.labels(mv.name, mv.version).set(pending)
            self._metrics.queue_lag.labels(mv.name, mv.version).set(lag)
            self._metrics.workers.labels(mv.name, mv.version).set(workers.get(mv.key, 0))
        self.seen = True

    def _mark_refused(self) -> None:
        """Versions of a model this replica routes that every live worker refused at its
        self-check are refused here too (503 at once, never routed to), also one added while
        serving that the API has not published; lifted once a live worker serves them."""
        names = set(self._registry.names())
        for key in sorted(self.refused - set(self._registry.refused)):
            name, _, version = key.partition(":")
            if name in names:
                reason = "every live worker refused it at its self-check"
                self._registry.refuse(Refused(name, version, reason, None))
                log.warning(
                    "model version refused by the workers",
                    extra={"model": name, "version": version},
                )
        for key, record in list(self._registry.refused.items()):
            if record.check is None and key not in self.refused:
                self._registry.unrefuse(record.name, record.version)
