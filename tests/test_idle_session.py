"""A request that finds a session idle holds it and is decoded and run on one thread
(``DynamicBatcher.idle_session``): the batcher's accounting must see it as a running batch,
so that batches never run beside it on a held session, stop() waits for it, and a request
that fails, times out or is abandoned frees it only once its thread is done. Real ONNX
Runtime sessions of the graphs in tests/builders.py."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.engine import Batch, EnginePool
from service.errors import DeadlineExceeded, InferenceFailed, UndecodableImage
from service.queue import WorkItem
from service.queue.batcher import DynamicBatcher
from service.registry import Registry
from tests.conftest import make_settings
from tests.images import png
from tests.test_batcher import item_for as item
from tests.test_engine_pool import Concurrency, big_item, slow_pool


def same(x: WorkItem) -> WorkItem:
    return x


def started(registry: Registry) -> DynamicBatcher:
    """A running batcher on the tiny 'endo' graph (inside the event loop)."""
    batcher = DynamicBatcher(registry.get("endo", "1").engine)
    batcher.start()
    return batcher


def test_a_held_session_answers_as_a_batch_of_one_and_is_given_back(
    tiny_registry: Registry,
) -> None:
    async def scenario() -> None:
        batcher = started(tiny_registry)
        held = batcher.idle_session()
        assert held is not None
        assert batcher.idle_session() is None  # one session: held until the request is done
        thread = {}

        def prepare() -> WorkItem:
            thread["name"] = threading.current_thread().name
            return item(1)

        prepared, ready, result = await held.run(prepare, same, 5)
        assert thread["name"].startswith("infer")  # off the event loop, on a session's thread
        assert prepared.request_id == "1" and result.batch_size == 1 and result.queue_ms == 0.0
        expected = batcher.engine.run(Batch(images=item(1).image[None]))[0]
        assert np.allclose(result.probabilities, expected)
        assert ready <= time.perf_counter()
        await asyncio.sleep(0.01)  # the release travels from the thread to the loop
        again = batcher.idle_session()
        assert again is not None
        await again.run(lambda: item(2), same, 5)
        await asyncio.wait_for(batcher.stop(), 5)  # nothing left held

    asyncio.run(scenario())


def test_a_request_that_fails_frees_its_session_and_only_itself(
    tiny_registry: Registry,
) -> None:
    async def scenario() -> None:
        batcher = started(tiny_registry)

        def bad_input() -> WorkItem:
            raise UndecodableImage("not an image")

        with pytest.raises(UndecodableImage):
            await batcher.idle_session().run(bad_input, same, 5)  # type: ignore[union-attr]
        await asyncio.sleep(0.01)
        with pytest.raises(InferenceFailed):  # the poison graph's black frame
            await batcher.idle_session().run(lambda: item(2, poison=True), same, 5)  # type: ignore[union-attr]
        await asyncio.sleep(0.01)
        # Freed both times; the next request is answered.
        _, _, result = await batcher.idle_session().run(lambda: item(3), same, 5)  # type: ignore[union-attr]
        assert result.probabilities.shape == (len(batcher.engine.manifest.labels),)
        await asyncio.wait_for(batcher.stop(), 5)

    asyncio.run(scenario())


def test_batches_wait_for_a_held_session_and_stop_waits_for_it(tmp_path: Path) -> None:
    pool: EnginePool = slow_pool(tmp_path, instances=1)
    running = Concurrency(pool)

    async def scenario() -> None:
        batcher = DynamicBatcher(pool, max_batch_size=4)
        batcher.start()
        held = batcher.idle_session()
        assert held is not None
        lone = asyncio.ensure_future(held.run(lambda: big_item(0), same, 30))
        await asyncio.sleep(0)
        queued = [asyncio.ensure_future(batcher.submit(big_item(i), 30)) for i in range(1, 5)]
        await asyncio.sleep(0.005)
        assert batcher.idle_session() is None  # something is queued now
        stopping = asyncio.ensure_future(batcher.stop())
        results = await asyncio.gather(lone, *queued)
        await stopping
        assert len(results) == 5

    asyncio.run(scenario())
    assert running.peak == 1, "a batch ran beside the held session"


def test_abandoned_or_late_requests_free_the_session_when_its_run_ends(
    tmp_path: Path,
) -> None:
    pool = slow_pool(tmp_path, instances=1)

    async def scenario() -> None:
        batcher = DynamicBatcher(pool)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.idle_session().run(lambda: big_item(0), same, 0.001)  # type: ignore[union-attr]
        # The run goes on after the deadline: the session is not handed out meanwhile.
        assert batcher.idle_session() is None
        task = asyncio.ensure_future(batcher.submit(big_item(1), 30))
        assert (await task).batch_size == 1  # ran once the held session was given back
        abandoned = asyncio.ensure_future(
            batcher.idle_session().run(lambda: big_item(2), same, 30)  # type: ignore[union-attr]
        )
        await asyncio.sleep(0.002)
        abandoned.cancel()  # the client went away
        assert batcher.idle_session() is None
        deadline = time.monotonic() + 10
        while (held := batcher.idle_session()) is None:
            assert time.monotonic() < deadline, "the session was never given back"
            await asyncio.sleep(0.005)
        await held.run(lambda: big_item(3), same, 30)
        await asyncio.wait_for(batcher.stop(), 5)

    asyncio.run(scenario())


def test_a_lone_http_request_is_not_queued_and_a_burst_is_answered_alike(
    tiny_models_dir: Path, tiny_registry: Registry
) -> None:
    app = create_app(make_settings(tiny_models_dir), registry=tiny_registry)
    body = {"image": base64.b64encode(png(np.full((32, 32, 3), 90, np.uint8))).decode()}
    with TestClient(app) as client:
        lone = client.post("/models/endo/versions/1/predict", json=body).json()
        assert lone["timing_ms"]["queue"] == 0.0 and lone["batch_size"] == 1
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(
                    lambda _: client.post("/models/endo/versions/1/predict", json=body), range(64)
                )
            )
    assert {a.status_code for a in answers} == {200}
    assert all(a.json()["probabilities"] == lone["probabilities"] for a in answers)
