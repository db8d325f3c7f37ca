"""How late an event loop runs what it scheduled.

Every Redis call, heartbeat and deadline of a process waits on its event loop: a loop held
for seconds (blocking code, a starved CPU, a paused VM) makes healthy connections time out
and a live worker look departed. The watcher sleeps a fixed interval and records how much
longer than that it took, as a histogram and, past ``warn_s``, a warning; a timeout then
tells whether its process was stalled or the other end was slow.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger(__name__)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def lag_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "endofuse_event_loop_lag_seconds",
        "How much later than scheduled the process's event loop woke from a short sleep; "
        "seconds here mean the process stopped answering anything meanwhile.",
        buckets=LAG_BUCKETS,
        registry=registry,
    )


async def watch(histogram: Histogram, interval_s: float = 0.25, warn_s: float = 1.0) -> None:
    """Run until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        lag = max(0.0, loop.time() - start - interval_s)
        histogram.observe(lag)
        if lag >= warn_s:
            log.warning("event loop stalled", extra={"timing_ms": round(lag * 1e3, 1)})
