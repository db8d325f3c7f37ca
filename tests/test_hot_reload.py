"""Hot reload: versions added to or removed from the model repository while serving, in
process and behind Redis with a real worker."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import repository
from service.api import create_app
from tests.builders import write_model_dir
from tests.conftest import make_settings
from tests.images import png
from tests.redis_harness import RedisServer, WorkerProcess

REPO = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def frame(i: int) -> bytes:
    return png(np.random.default_rng(i).integers(0, 255, (32, 32, 3)).astype(np.uint8))


def predict(client: TestClient, i: int, url: str = "/models/endo/predict"):
    return client.post(url, json={"image": base64.b64encode(frame(i)).decode()})


def metric(client: TestClient, event: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("endofuse_model_events_total{") and f'event="{event}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def built_aside(root: Path, version: str, seed: int) -> tuple[Path, bytes]:
    """A complete version directory built aside, with the graph's digest in its manifest."""
    vdir = write_model_dir(root, "endo", version, seed=seed)
    graph = (vdir / "model.onnx").read_bytes()
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"] = {"model.onnx": {"sha256": hashlib.sha256(graph).hexdigest()}}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    return vdir, graph


def test_versions_come_and_go_in_process(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model_dir(models, "endo", "1", seed=1)
    staged, graph = built_aside(tmp_path / "staging", "2", seed=2)
    settings = make_settings(models, reload_s=0.1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert predict(client, 0).json()["model"]["version"] == "1"

        # Half-copied: the graph does not match its manifest's digest. Not served, counted.
        target = models / "endo" / "2"
        target.mkdir()
        shutil.copy(staged / "manifest.json", target / "manifest.json")
        (target / "model.onnx").write_bytes(graph[: len(graph) // 2])
        wait_for(lambda: metric(client, "failed") == 1, 10, "the failed load to be counted")
        time.sleep(0.3)  # several more scans: the unchanged directory is not retried
        assert metric(client, "failed") == 1
        assert predict(client, 1).json()["model"]["version"] == "1"

        # The copy completes: loaded, warmed, then the newest, without a restart.
        (target / "model.onnx").write_bytes(graph)
        wait_for(lambda: metric(client, "loaded") == 1, 10, "version 2 to load")
        assert predict(client, 2).json()["model"]["version"] == "2"
        assert client.get("/models/endo").json()["versions"] == ["1", "2"]
        assert "/models/endo/versions/2/predict" in client.get("/openapi.json").json()["paths"]

        # Removed under load: nothing fails; requests move back to version 1.
        pool = ThreadPoolExecutor(8)
        futures = [pool.submit(predict, client, i) for i in range(200)]
        shutil.rmtree(target)
        codes = [f.result(timeout=60).status_code for f in futures]
        pool.shutdown()
        assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        wait_for(lambda: metric(client, "removed") == 1, 10, "version 2 to be removed")
        assert predict(client, 3).json()["model"]["version"] == "1"
        assert predict(client, 4, "/models/endo/versions/2/predict").status_code == 404
        assert "/models/endo/versions/2/predict" not in client.get("/openapi.json").json()["paths"]


def test_a_version_built_in_the_repository_is_served_only_once_complete(tmp_path: Path) -> None:
    """``repository.staged_version``, through which export, quantize and recalibrate write:
    a version being built under the watched directory is not even tried, though its files
    already pass every check; a failed build leaves nothing; the finished one is served."""
    models = tmp_path / "models"
    write_model_dir(models, "endo", "1", seed=1)
    built, _ = built_aside(tmp_path / "aside", "2", seed=2)
    settings = make_settings(models, reload_s=0.1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        failing = pytest.raises(RuntimeError, match="fails")
        with failing, repository.staged_version(models / "endo" / "2") as tmp:
            shutil.copytree(built, tmp, dirs_exist_ok=True)
            time.sleep(0.5)
            raise RuntimeError("the build fails")
        assert shown(models / "endo") == ["1"] and not list((models / "endo").glob("*partial*"))

        with repository.staged_version(models / "endo" / "2") as tmp:
            shutil.copytree(built, tmp, dirs_exist_ok=True)
            time.sleep(0.5)  # several scans while the files are all there, the build unfinished
            assert metric(client, "failed") == 0 and metric(client, "loaded") == 0
            assert client.get("/models/endo").json()["versions"] == ["1"]
        wait_for(lambda: metric(client, "loaded") == 1, 10, "version 2 to load")
        assert predict(client, 0).json()["model"]["version"] == "2"
        assert metric(client, "failed") == 0

        taken = pytest.raises(FileExistsError, match="exists already")
        with taken, repository.staged_version(models / "endo" / "2"):
            pass
        assert shown(models / "endo") == ["1", "2"]


def shown(name_dir: Path) -> list[str]:
    return sorted(p.name for p in name_dir.iterdir() if not p.name.startswith("."))


def test_a_killed_build_is_cleared_and_a_build_in_progress_is_not_doubled(tmp_path: Path) -> None:
    """A builder killed mid-way (here a child process that exits inside ``staged_version``
    without unwinding, as SIGKILL or an out-of-memory kill would) leaves its hidden
    directory; the next build under that model removes it, and a directory a builder made but
    died before locking once it is stale. A second builder of a version
    being built is refused at once, and leaves the first one's files alone."""
    name_dir = tmp_path / "models" / "endo"
    child = (
        "import os, sys; from pathlib import Path; from service import repository\n"
        "with repository.staged_version(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'model.onnx').write_bytes(b'half')\n"
        "    os._exit(9)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", child, str(name_dir / "3")], cwd=REPO, check=False, timeout=60
    )
    assert killed.returncode == 9
    leftovers = list(name_dir.glob(".3.partial-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.onnx").is_file()
    # A builder that died between making its directory and locking it: swept once stale.
    stale, fresh = name_dir / ".5.starting-dead", name_dir / ".6.starting-new"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * repository.STALE_START_S
    os.utime(stale, (old, old))

    with repository.staged_version(name_dir / "2") as building:
        (building / "model.onnx").write_bytes(b"in progress")
        assert not leftovers[0].exists(), "the killed build's files are gone"
        assert not stale.exists() and fresh.exists(), "only a stale unlocked start is swept"
        refused = pytest.raises(FileExistsError, match="being built by another process")
        with refused, repository.staged_version(name_dir / "2"):
            pass
        assert repository.remove_abandoned(name_dir) == ([], [building.name])
        assert (building / "model.onnx").read_bytes() == b"in progress"
    assert shown(name_dir) == ["2"] and not list(name_dir.glob("*partial*"))


@pytest.mark.slow
def test_api_publishes_a_new_version_once_a_worker_serves_it(tmp_path: Path) -> None:
    """Behind Redis, the API routes to a new version only after a worker runs it: readiness
    never drops and no request waits for a worker while the version arrives."""
    models = tmp_path / "models"
    write_model_dir(models, "endo", "1", seed=1)
    staged, _ = built_aside(tmp_path / "staging", "2", seed=2)
    server = RedisServer().start()
    worker = WorkerProcess(server.url, models, reload_s=0.5, heartbeat_s=0.3)
    try:
        worker.wait_ready()
        settings = make_settings(
            models, queue_url=server.url, reload_s=0.1, heartbeat_s=0.3, latency_budget_s=0
        )
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
            shutil.copytree(staged, models / "endo" / "2")
            versions, ready = [], []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = predict(client, len(versions))
                assert r.status_code == 200, r.text
                versions.append(r.json()["model"]["version"])
                ready.append(client.get("/readyz").status_code)
                if versions[-1] == "2":
                    break
            assert versions[-1] == "2", "the new version was never published"
            assert set(ready) == {200}, ready
            body = client.get("/readyz").json()
            assert body["workers"] == {"endo:1": 1, "endo:2": 1}
    finally:
        worker.stop()
        server.kill()


def test_the_default_models_last_version_is_never_removed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model_dir(models, "endo", "1", seed=1)
    settings = make_settings(models, reload_s=0.05)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        shutil.rmtree(models / "endo" / "1")
        time.sleep(0.5)  # several scans
        assert predict(client, 0).status_code == 200  # still served from memory
        assert metric(client, "removed") == 0
