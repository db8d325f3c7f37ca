from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir

from service.api import create_app
from service.config import Settings
from service.registry import Registry
from tests.builders import FIELDS, write_model_dir, write_slow_model_dir
from tests.data_paths import REPO, require_data  # noqa: F401 (REPO: re-exported to tests)
from tests.redis_harness import RedisServer, WorkerProcess

# Property-based tests keep no example database, and hypothesis's caches live in a temp
# directory: nothing is written into the repository.
hypothesis_settings.register_profile("endofuse", database=None)
hypothesis_settings.load_profile("endofuse")
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="endofuse-hypothesis-"))


@pytest.fixture(scope="session")
def fullres_frames() -> list[Path]:
    root = require_data("hyperkvasir-lgi-fullres")
    frames = sorted(root.glob("*/*.jpg"))
    assert len(frames) >= 10, f"expected real frames under {root}"
    return frames


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    endo1 = write_model_dir(root, "endo", "1", poison_black=True, seed=1)
    add_decision(endo1)
    write_model_dir(root, "endo", "2", poison_black=True, seed=2)
    write_model_dir(root, "derm", "1", fields=FIELDS, image_mask=True, seed=3)
    (root / "DEFAULT").write_text("endo\n")
    return root


def add_decision(vdir: Path) -> None:
    """Prediction sets (a class is in when p >= 0.5) and an out-of-distribution threshold so
    high that nothing is flagged: enough to see the fields served and the logits travel."""
    manifest = json.loads((vdir / "manifest.json").read_text())
    k = len(manifest["labels"])
    patterns = ("all", "image_only", "tabular_only", "partial")
    manifest["decision"] = {
        "score": "lac",
        "levels": [0.9],
        "thresholds": {p: {"0.9": [0.5] * k} for p in patterns},
        "ood": {"score": "energy", "thresholds": {p: 1e9 for p in patterns}},
    }
    (vdir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def tiny_registry(tiny_models_dir: Path) -> Registry:
    return Registry.load(tiny_models_dir, providers=["CPUExecutionProvider"], warmup_runs=1)


def make_settings(models_dir: Path, **overrides: object) -> Settings:
    base = dict(models_dir=models_dir, providers="cpu", warmup_runs=1, max_body_bytes=2_000_000)
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture()
def client(tiny_models_dir: Path, tiny_registry: Registry) -> Iterator[TestClient]:
    app = create_app(make_settings(tiny_models_dir), registry=tiny_registry)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# --- the Redis deployment on a model slow enough to be caught mid-batch (tests/test_redis_*.py)


@pytest.fixture(scope="session")
def slow_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow-models")
    write_slow_model_dir(root, "slow", size=128)
    return root


@pytest.fixture(scope="session")
def slow_registry(slow_models: Path) -> Registry:
    return Registry.load(slow_models, providers=["CPUExecutionProvider"], warmup_runs=0)


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture()
def deploy(redis_server: RedisServer, slow_models: Path) -> Iterator[Callable]:
    """deploy(workers=N, **settings) -> (TestClient, [WorkerProcess]) on a fresh Redis."""
    workers: list[WorkerProcess] = []
    clients: list[TestClient] = []

    def start(n_workers: int = 1, timeout_s: float = 20.0, **settings: object):
        env = {"reclaim_idle_ms": 1500, "heartbeat_s": 0.3, "max_batch_size": 8, **settings}
        for _ in range(n_workers):
            workers.append(WorkerProcess(redis_server.url, slow_models, **env))
        for w in workers:
            w.wait_ready()
        # Admission control off: these tests hold every accepted request to an answer
        # through faults, so nothing may be shed up front (tests/test_admission.py covers it).
        api = make_settings(
            slow_models,
            queue_url=redis_server.url,
            request_timeout_s=timeout_s,
            latency_budget_s=0,
            **settings,
        )
        client = TestClient(create_app(api), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        time.sleep(0.5)  # one monitor round: the API has seen the workers' heartbeats
        return client, workers

    yield start
    for c in clients:
        c.__exit__(None, None, None)
    for w in workers:
        w.stop()
