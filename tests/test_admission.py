"""Admission control: the limit follows the measured service interval, excess requests are
refused at once with Retry-After, and nothing admitted is lost."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.admission import AdmissionControl
from service.api import create_app
from service.errors import Overloaded
from service.registry import Registry
from tests.builders import write_slow_model_dir
from tests.conftest import make_settings
from tests.http_server import running
from tests.images import png


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limit_is_budget_over_interval_and_excess_is_refused() -> None:
    ac = AdmissionControl(budget_s=1.0, min_in_flight=2, initial_interval_s=0.25)
    assert ac.limit == 4
    with ExitStack() as held:
        for _ in range(4):
            held.enter_context(ac.admit())
        with pytest.raises(Overloaded) as refused, ac.admit():
            pass
        assert refused.value.retry_after >= 1
        assert ac.in_flight == 4
    assert ac.in_flight == 0
    with ac.admit():  # room again once answered
        pass


def test_interval_is_measured_from_completed_requests() -> None:
    clock = Clock()
    ac = AdmissionControl(budget_s=1.0, initial_interval_s=0.5, clock=clock)
    for _ in range(100):  # one at a time, 10 ms each
        with ac.admit():
            clock.now += 0.01
    assert ac.interval_s == pytest.approx(0.01, rel=0.05)
    assert ac.limit == pytest.approx(100, rel=0.06)
    # Ten at once, answered together after 50 ms: 5 ms per request at that load.
    with ExitStack() as held:
        for _ in range(10):
            held.enter_context(ac.admit())
        clock.now += 0.05
    assert ac.interval_s < 0.01  # moving towards 5 ms


def test_sustained_load_is_measured_in_windows() -> None:
    clock = Clock()
    ac = AdmissionControl(budget_s=1.0, initial_interval_s=0.5, clock=clock)
    with ac.admit():  # one request stays in flight throughout: the service never idles
        for _ in range(400):
            with ac.admit():
                clock.now += 0.004
    assert ac.interval_s == pytest.approx(0.004, rel=0.1)


def test_a_burst_is_shed_with_retry_after_and_nothing_is_lost(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    write_slow_model_dir(tmp_path, "slow")
    registry = Registry.load(tmp_path, providers=["CPUExecutionProvider"], warmup_runs=1)
    settings = make_settings(tmp_path, latency_budget_s=0.2, request_timeout_s=30)
    image = png(np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8))

    async def burst(base: str, n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            files = {"image": ("f.png", image, "image/png")}
            return await asyncio.gather(*(client.post("/predict", files=files) for _ in range(n)))

    with running(create_app(settings, registry), settings) as (host, port):
        base = f"http://{host}:{port}"
        answers = asyncio.run(burst(base, 48))
        after = httpx.post(f"{base}/predict", files={"image": ("f.png", image)}, timeout=30)
    statuses = [r.status_code for r in answers]
    assert len(statuses) == 48 and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1
    assert after.status_code == 200  # the first request after the burst is served
