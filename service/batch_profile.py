"""Measured batch policy: how large a batch this model should run on this machine.

At load, every session of a version's instance group runs zero-filled batches of 1, 2, 4, ...
up to the configured bound, all sessions at once as under load, and the cost per image is
taken from the wall clock. The batch limit is the smallest size within 15 % of the cheapest
cost per image whose batch still finishes within the latency budget: a larger batch costs
every request in it latency, so it must be cheaper by more than a one-second measurement's
noise (on a shared 2-core host, ±10 % from one load to the next picked batch 1, 2 or 4 at
random under a 5 % margin). On a CPU the cheapest is
often batch 1 (larger batches run slower per image), on a GPU usually larger; nothing is
assumed. Sizes stop being tried once two in a row cost more per image than the best so far,
or the time allowance is spent: about a second per version on a CPU host.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.engine import Batch, EnginePool

TOLERANCE = 1.15  # a smaller batch within this factor of the cheapest wins (lower latency)


@dataclass(frozen=True)
class BatchPoint:
    batch_size: int
    ms_per_batch: float  # median time of one batch on one session, all sessions busy
    ms_per_image: float  # wall clock / images, over every session together


@dataclass(frozen=True)
class BatchProfile:
    points: tuple[BatchPoint, ...]
    chosen: int
    latency_budget_ms: float
    seconds: float

    def to_dict(self) -> dict:
        return {
            "chosen_max_batch_size": self.chosen,
            "latency_budget_ms": self.latency_budget_ms,
            "measured_in_s": round(self.seconds, 2),
            "points": [
                {
                    "batch_size": p.batch_size,
                    "ms_per_batch": round(p.ms_per_batch, 3),
                    "ms_per_image": round(p.ms_per_image, 3),
                }
                for p in self.points
            ],
        }


def candidate_sizes(upper: int) -> list[int]:
    sizes, b = [], 1
    while b < upper:
        sizes.append(b)
        b *= 2
    return [*sizes, upper]


def choose(points: list[BatchPoint], latency_budget_ms: float) -> int:
    """The smallest batch within TOLERANCE of the cheapest per image, inside the budget."""
    fitting = [p for p in points if p.ms_per_batch <= latency_budget_ms] or points[:1]
    best = min(p.ms_per_image for p in fitting)
    return min(p.batch_size for p in fitting if p.ms_per_image <= best * TOLERANCE)


def _time_size(pool: EnginePool, batch: Batch, rounds: int) -> BatchPoint:
    # The group's own sessions, one thread each, as under load (not the solo session).
    def one_session(i: int) -> list[float]:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            pool.engines[i].run(batch)
            times.append(time.perf_counter() - start)
        return times

    with ThreadPoolExecutor(pool.size) as threads:
        list(threads.map(lambda i: pool.engines[i].run(batch), range(pool.size)))  # warm
        start = time.perf_counter()
        per_session = list(threads.map(one_session, range(pool.size)))
        wall = time.perf_counter() - start
    n = len(batch)
    return BatchPoint(
        batch_size=n,
        ms_per_batch=float(np.median(np.concatenate(per_session))) * 1e3,
        ms_per_image=wall * 1e3 / (pool.size * rounds * n),
    )


def measure(
    pool: EnginePool,
    upper: int,
    latency_budget_ms: float = 100.0,
    allowance_s: float = 3.0,
    rounds: int = 3,
) -> BatchProfile:
    """Profile ``pool`` at batch sizes up to ``upper`` and choose its batch limit."""
    spec = pool.manifest.image
    start = time.perf_counter()
    points: list[BatchPoint] = []
    worse = 0
    for size in candidate_sizes(upper):
        batch = Batch(images=np.zeros((size, spec.height, spec.width, 3), np.uint8))
        point = _time_size(pool, batch, rounds)
        best = min((p.ms_per_image for p in points), default=point.ms_per_image)
        points.append(point)
        worse = worse + 1 if point.ms_per_image > best else 0
        if worse >= 2 or point.ms_per_batch > latency_budget_ms:
            break
        if time.perf_counter() - start > allowance_s:
            break
    chosen = choose(points, latency_budget_ms)
    return BatchProfile(tuple(points), chosen, latency_budget_ms, time.perf_counter() - start)
