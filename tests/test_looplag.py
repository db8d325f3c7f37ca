"""The event-loop watcher: a loop held by blocking code shows as lag, an idle one does not."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from service import looplag
from service.metrics import Metrics, WorkerMetrics


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name.startswith("endofuse_event_loop_lag_seconds")
    }


async def _watch_while(block_s: float, caplog: pytest.LogCaptureFixture) -> dict[str, float]:
    registry = CollectorRegistry()
    histogram = looplag.lag_histogram(registry)
    task = asyncio.create_task(looplag.watch(histogram, interval_s=0.05, warn_s=0.5))
    await asyncio.sleep(0.2)
    time.sleep(block_s)  # blocks the loop, as synchronous code on it would
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return _samples(registry)


def test_a_blocked_loop_is_measured_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.looplag"):
        samples = asyncio.run(_watch_while(0.8, caplog))
    assert samples["endofuse_event_loop_lag_seconds_count"] >= 5
    # One wake-up came at least 0.5 s late: it is above the 0.5 bucket, below the 1.0 one.
    late = samples["endofuse_event_loop_lag_seconds_count"]
    assert late - samples["endofuse_event_loop_lag_seconds_bucket0.5"] >= 1
    assert samples["endofuse_event_loop_lag_seconds_sum"] >= 0.7
    stalls = [r for r in caplog.records if r.getMessage() == "event loop stalled"]
    assert len(stalls) == 1 and stalls[0].timing_ms >= 700


def test_an_idle_loop_shows_no_stall(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.looplag"):
        samples = asyncio.run(_watch_while(0.0, caplog))
    assert samples["endofuse_event_loop_lag_seconds_count"] >= 5
    assert (
        samples["endofuse_event_loop_lag_seconds_bucket0.5"]
        == (samples["endofuse_event_loop_lag_seconds_count"])
    )
    assert not [r for r in caplog.records if r.getMessage() == "event loop stalled"]


@pytest.mark.parametrize("metrics", [Metrics, WorkerMetrics])
def test_api_and_worker_expose_the_lag(metrics: type) -> None:
    assert b"endofuse_event_loop_lag_seconds_bucket" in metrics().render()
