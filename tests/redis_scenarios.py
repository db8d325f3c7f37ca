"""Requests and checks shared by the Redis fault tests (tests/test_redis_faults.py,
tests/test_redis_outages.py); their fixtures (``redis_server``, ``deploy``, the ``slow``
model) are in tests/conftest.py."""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient

from service.engine import Batch
from service.queue.wire import Streams
from service.registry import Registry
from tests.images import png
from tests.redis_harness import RedisServer, WorkerProcess

STREAM = Streams().requests("slow:1")
GROUP = Streams().group


def frame(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, (128, 128, 3)).astype(np.uint8)


def post(client: TestClient, i: int):
    return client.post("/v1/predict", json={"image": base64.b64encode(png(frame(i))).decode()})


def fire(client: TestClient, ids: range) -> Iterator:
    pool = ThreadPoolExecutor(len(ids))
    futures = [pool.submit(post, client, i) for i in ids]
    pool.shutdown(wait=False)
    return futures


def queue_while_stopped(
    client: TestClient, ids: range, workers: list[WorkerProcess], server: RedisServer
) -> list:
    """SIGSTOP ``workers``, then fire ``ids`` and return once all are queued (the workers
    left stopped), so that a worker's first read finds them all however fast they arrive.
    The pause before firing outlasts a blocking read already sent (200 ms), which Redis
    would otherwise answer into a stopped worker's socket."""
    for w in workers:
        w.signal(signal.SIGSTOP)
    time.sleep(0.5)
    futures = fire(client, ids)
    wait_for(lambda: server.client().xlen(STREAM) >= len(ids), 20, "the requests to queue")
    return futures


def check_all_answered(futures: list, ids: range, registry: Registry) -> None:
    engine = registry.get("slow").engine
    for i, f in zip(ids, futures, strict=True):
        r = f.result(timeout=60)
        assert r.status_code == 200, r.text
        want = engine.run(Batch(images=frame(i)[None]))[0]
        # Each client gets its own answer, once: a reply for another request would not match.
        np.testing.assert_allclose(list(r.json()["probabilities"].values()), want, atol=1e-5)


def consumer_pending(server: RedisServer, pid: int) -> int:
    info = server.client().xpending(STREAM, GROUP)
    return sum(c["pending"] for c in info["consumers"] if f":{pid}:" in c["name"].decode())


def stop_mid_batch(worker: WorkerProcess, server: RedisServer) -> None:
    """SIGSTOP ``worker`` while it holds unacknowledged entries (retrying if it acked first)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        wait_for(lambda: consumer_pending(server, worker.proc.pid) > 0, 20, "a batch on the worker")
        worker.signal(signal.SIGSTOP)
        if consumer_pending(server, worker.proc.pid) > 0:
            return
        worker.signal(signal.SIGCONT)  # it finished between the check and the signal
    raise AssertionError("could not stop the worker mid-batch")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def api_metric(client: TestClient, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total
