"""One contract, every queue backend: the same HTTP behaviour with ``memory://`` (embedded
batcher) and ``redis://`` (Redis Streams to a real ``endofuse worker`` process)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.engine import Batch
from service.registry import Registry
from tests.conftest import make_settings
from tests.images import png as png_bytes
from tests.redis_harness import RedisServer, WorkerProcess


@pytest.fixture(scope="module")
def redis_deployment(tiny_models_dir: Path) -> Iterator[str]:
    server = RedisServer().start()
    worker = WorkerProcess(server.url, tiny_models_dir).wait_ready()
    yield server.url
    worker.stop()
    server.kill()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, tiny_models_dir: Path) -> Iterator[TestClient]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_deployment")
    app = create_app(make_settings(tiny_models_dir, queue_url=url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def image(seed: int, size: int = 32, black: bool = False) -> np.ndarray:
    if black:
        return np.zeros((size, size, 3), np.uint8)
    return np.random.default_rng(seed).integers(1, 255, (size, size, 3)).astype(np.uint8)


def post(client: TestClient, pixels: np.ndarray, path: str = "/v1/predict", **json: object):
    body = {"image": base64.b64encode(png_bytes(pixels)).decode(), **json}
    return client.post(path, json=body)


def expected(registry: Registry, name: str, pixels: np.ndarray, **kw: np.ndarray) -> np.ndarray:
    engine = registry.get(name).engine
    return engine.run(Batch(images=pixels[None], **kw))[0]


def test_answer_equals_a_direct_engine_run(backend: TestClient, tiny_registry: Registry) -> None:
    r = post(backend, image(1))
    assert r.status_code == 200, r.text
    got = np.array(list(r.json()["probabilities"].values()))
    np.testing.assert_allclose(got, expected(tiny_registry, "endo", image(1)), atol=1e-6)


def test_concurrent_requests_each_get_their_own_answer(
    backend: TestClient, tiny_registry: Registry
) -> None:
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: post(backend, image(i)), range(48)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        got = np.array(list(r.json()["probabilities"].values()))
        np.testing.assert_allclose(got, expected(tiny_registry, "endo", image(i)), atol=1e-6)


def test_a_failing_request_fails_alone(backend: TestClient) -> None:
    # The test model produces NaN for an all-black frame: that request fails, not its batch.
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: post(backend, image(i, black=i % 4 == 0)), range(24)))
    for i, r in enumerate(responses):
        if i % 4 == 0:
            assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
        else:
            assert r.status_code == 200, r.text


def test_tabular_fields_and_missing_image_travel(backend: TestClient) -> None:
    fields = {"age": 61, "sex": "female"}
    r = post(backend, image(5), "/models/derm/predict", tabular=fields)
    assert r.status_code == 200, r.text
    assert r.json()["modalities"]["tabular"]["used"] == ["age", "sex"]
    r2 = backend.post("/models/derm/predict", json={"tabular": fields})
    assert r2.status_code == 200 and r2.json()["modalities"]["image"] is False
    assert r2.json()["probabilities"] != r.json()["probabilities"]


def test_version_routing(backend: TestClient, tiny_registry: Registry) -> None:
    r = post(backend, image(3), "/models/endo/versions/1/predict")
    assert r.status_code == 200 and r.json()["model"]["version"] == "1"
    engine = tiny_registry.get("endo", "1").engine
    want = engine.run(Batch(images=image(3)[None]))[0]
    np.testing.assert_allclose(list(r.json()["probabilities"].values()), want, atol=1e-6)


def test_logits_travel_for_the_out_of_distribution_score(
    backend: TestClient, tiny_registry: Registry
) -> None:
    """The served OOD score is the energy of this request's own logits, whichever backend
    (and, for redis://, whichever wire) carried them."""
    r = post(backend, image(4), "/models/endo/versions/1/predict")
    assert r.status_code == 200, r.text
    _, logits = tiny_registry.get("endo", "1").engine.run_with_logits(Batch(images=image(4)[None]))
    want = -float(np.log(np.exp(logits[0].astype(np.float64)).sum()))
    assert r.json()["ood"] == {"score": pytest.approx(want, abs=1e-3), "flagged": False}
    assert r.json()["label"] in r.json()["prediction_set"]


def test_queue_url_credentials_are_redacted_for_logs() -> None:
    from service.queue.factory import redacted

    assert redacted("redis://:s3cret@redis:6379/0") == "redis://redis:6379/0"
    assert redacted("redis://user:p@ss@host:1/2") == "redis://host:1/2"
    assert redacted("memory://") == "memory://"


def test_replies_are_deleted_once_read(redis_deployment: str, tiny_models_dir: Path) -> None:
    """An API process deletes the replies it has read (in its next read's round trip), so
    its reply stream does not grow with the traffic it has served."""
    import redis

    from service.queue.wire import Streams
    from tests.redis_scenarios import wait_for

    app = create_app(make_settings(tiny_models_dir, queue_url=redis_deployment))
    with TestClient(app) as client:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: post(client, image(i)), range(24)))
        assert all(r.status_code == 200 for r in responses)
        r = redis.Redis.from_url(redis_deployment)
        streams = list(r.scan_iter(Streams().reply("*"), _type="stream"))
        assert streams, "no reply stream"
        wait_for(lambda: sum(r.xlen(s) for s in streams) == 0, 5, "the replies to be deleted")
