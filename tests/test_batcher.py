"""Batcher properties, on real ONNX Runtime engines (tiny graphs built in tests/builders.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine import Batch, Engine
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from service.manifest import parse_manifest
from service.queue import WorkItem
from service.queue.batcher import DynamicBatcher
from service.registry import Registry
from tests.builders import write_slow_model_dir


@pytest.fixture(scope="module")
def engine(tiny_registry: Registry) -> Engine:
    return tiny_registry.get("endo", "1").engine


def item_for(seed: int, poison: bool = False) -> WorkItem:
    rng = np.random.default_rng(seed)
    image = np.zeros((32, 32, 3), np.uint8) if poison else rng.integers(1, 255, (32, 32, 3))
    return WorkItem(model_key="endo:1", image=image.astype(np.uint8), request_id=str(seed))


def alone(engine: Engine, item: WorkItem) -> np.ndarray:
    return engine.run(Batch(images=item.image[None]))[0]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    arrivals=st.lists(
        st.tuples(st.floats(0, 0.003), st.sampled_from([False, False, False, True])),
        min_size=1,
        max_size=40,
    ),
    max_batch=st.integers(1, 8),
    max_wait=st.sampled_from([0.0, 0.001, 0.005]),
)
def test_every_request_gets_its_own_answer(
    engine: Engine, arrivals: list[tuple[float, bool]], max_batch: int, max_wait: float
) -> None:
    """Any arrival pattern: one answer per request, to its caller; poison fails alone."""

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(
            engine, max_batch_size=max_batch, max_wait_s=max_wait, max_queue_size=1000
        )
        batcher.start()

        async def client(i: int, delay: float, poison: bool) -> object:
            await asyncio.sleep(delay * i)
            try:
                return await batcher.submit(item_for(i, poison), timeout_s=10)
            except InferenceFailed as exc:
                return exc

        results = await asyncio.gather(*(client(i, d, p) for i, (d, p) in enumerate(arrivals)))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert len(results) == len(arrivals)
    for i, ((_, poison), result) in enumerate(zip(arrivals, results, strict=True)):
        if poison:
            assert isinstance(result, InferenceFailed)
        else:
            assert not isinstance(result, Exception), result
            np.testing.assert_allclose(result.probabilities, alone(engine, item_for(i)), atol=1e-6)
            assert 1 <= result.batch_size <= max_batch


def test_lone_request_on_idle_batcher_does_not_wait(engine: Engine) -> None:
    async def scenario() -> list:
        # A large wait that a lone request must never pay.
        batcher = DynamicBatcher(engine, max_batch_size=16, max_wait_s=0.5)
        batcher.start()
        out = []
        for i in range(5):
            start = time.perf_counter()
            result = await batcher.submit(item_for(i), timeout_s=5)
            out.append((result, time.perf_counter() - start))
            await asyncio.sleep(0.01)
        await batcher.stop()
        return out

    for result, elapsed in asyncio.run(scenario()):
        assert result.batch_size == 1
        assert result.queue_ms < 100 and elapsed < 0.25, "no batching window at low load"


def test_concurrent_requests_coalesce(engine: Engine) -> None:
    sizes: list[int] = []

    async def scenario() -> None:
        batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_s=0.002, on_batch=sizes.append)
        batcher.start()
        await asyncio.gather(*(batcher.submit(item_for(i), 5) for i in range(64)))
        await batcher.stop()

    asyncio.run(scenario())
    assert sum(sizes) == 64
    assert max(sizes) > 1 and max(sizes) <= 8


def slow_engine(tmp_path: Path) -> Engine:
    """A real graph slow enough (convolutions on 256x256) to build a backlog."""
    vdir = write_slow_model_dir(tmp_path, "slow")
    manifest = parse_manifest(json.loads((vdir / "manifest.json").read_text()))
    return Engine(vdir / "model.onnx", manifest, ["CPUExecutionProvider"], intra_op_threads=1)


def big_item(i: int) -> WorkItem:
    image = np.random.default_rng(i).integers(0, 255, (256, 256, 3)).astype(np.uint8)
    return WorkItem(model_key="slow:1", image=image)


def test_full_queue_answers_overloaded_with_retry_after(tmp_path: Path) -> None:
    engine = slow_engine(tmp_path)

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(engine, max_batch_size=2, max_queue_size=4)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(big_item(i), 30) for i in range(20)), return_exceptions=True
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert overloaded and answered and len(overloaded) + len(answered) == 20
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in overloaded)


def test_deadline_gives_504_and_expired_work_is_never_run(tmp_path: Path) -> None:
    engine = slow_engine(tmp_path)
    ran: list[int] = []

    async def scenario() -> tuple[list[object], object]:
        batcher = DynamicBatcher(engine, max_batch_size=16, on_batch=ran.append)
        batcher.start()
        # One runs at once; the other 15 form one long batch behind it.
        backlog = [asyncio.ensure_future(batcher.submit(big_item(i), 60)) for i in range(16)]
        await asyncio.sleep(0.005)
        # Now a request whose deadline falls inside that long batch.
        late = await asyncio.gather(batcher.submit(big_item(99), 0.05), return_exceptions=True)
        done = await asyncio.gather(*backlog, return_exceptions=True)
        await batcher.stop()
        return done, late[0]

    done, late = asyncio.run(scenario())
    assert all(not isinstance(r, Exception) for r in done)
    assert isinstance(late, DeadlineExceeded), late
    assert sum(ran) == 16, "the expired request was dropped, not run"


def test_stop_answers_everything_already_accepted(engine: Engine) -> None:
    """Graceful shutdown: no accepted request is lost, new ones are refused."""

    async def scenario() -> tuple[list[object], object]:
        # 23 queued < 32: the batch waits to fill when stop() arrives.
        batcher = DynamicBatcher(engine, max_batch_size=32, max_wait_s=0.2)
        batcher.start()
        accepted = [asyncio.ensure_future(batcher.submit(item_for(i), 3)) for i in range(23)]
        await asyncio.sleep(0.02)
        await batcher.stop()
        late = await asyncio.gather(batcher.submit(item_for(99), 1), return_exceptions=True)
        return await asyncio.gather(*accepted, return_exceptions=True), late[0]

    results, late = asyncio.run(scenario())
    assert all(not isinstance(r, Exception) for r in results), results
    assert isinstance(late, NotReady)
