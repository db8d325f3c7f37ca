"""API keys, scopes and per-key rate limits: 401 / 403 / 429 as documented, probes open, and
no key material in the keys file, logs or metrics; budgets shared through Redis."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.api.auth import create_key
from service.registry import Registry
from tests.conftest import make_settings
from tests.images import jpeg
from tests.redis_harness import REPO, RedisServer
from tests.redis_scenarios import wait_for

FRAME = jpeg(np.full((32, 32, 3), 120, np.uint8))


@pytest.fixture()
def keyed(tmp_path: Path, tiny_models_dir: Path, tiny_registry: Registry):
    path = tmp_path / "keys.json"
    keys = {
        "clinic": create_key(path, "clinic", ["predict", "models:read"]),
        "monitor": create_key(path, "monitor", ["metrics"]),
        "small": create_key(path, "small", ["models:read"], rate="2/minute"),
    }
    settings = make_settings(tiny_models_dir, api_keys_file=path, auth_metrics=True)
    app = create_app(settings, tiny_registry)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, keys, path


def post(client: TestClient, headers: dict[str, str]):
    return client.post("/predict", files={"image": ("f.jpg", FRAME)}, headers=headers)


def test_keys_and_scopes(keyed) -> None:
    client, keys, _ = keyed
    r = post(client, {})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert post(client, {"X-API-Key": "efk_not-a-key"}).status_code == 401
    assert post(client, {"Authorization": f"Bearer {keys['clinic']}"}).status_code == 200
    assert post(client, {"X-API-Key": keys["clinic"]}).status_code == 200
    r = post(client, {"X-API-Key": keys["monitor"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.get("/metrics", headers={"X-API-Key": keys["clinic"]}).status_code == 403
    metrics = client.get("/metrics", headers={"X-API-Key": keys["monitor"]})
    assert metrics.status_code == 200
    assert 'endofuse_key_requests_total{key="clinic"} 2.0' in metrics.text
    assert keys["clinic"] not in metrics.text
    assert client.get("/models", headers={"X-API-Key": keys["clinic"]}).status_code == 200
    assert client.get("/models").status_code == 401
    # Probes need no key.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    r = client.post("/v2/models/endo/infer", json={"inputs": []})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)


def test_openapi_documents_the_keys(keyed) -> None:
    client, _, _ = keyed
    spec = client.get("/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    predict = spec["paths"]["/models/endo/predict"]["post"]
    assert {"401", "403", "429"} <= set(predict["responses"])
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_rate_limit_per_key_is_429_with_retry_after(keyed) -> None:
    client, keys, _ = keyed
    small = {"X-API-Key": keys["small"]}
    assert [client.get("/models", headers=small).status_code for _ in range(2)] == [200, 200]
    r = client.get("/models", headers=small)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # Another key keeps its own budget.
    assert client.get("/models", headers={"X-API-Key": keys["clinic"]}).status_code == 200


def test_no_key_material_in_file_or_logs(keyed, caplog: pytest.LogCaptureFixture) -> None:
    client, keys, path = keyed
    text = path.read_text()
    assert all(key not in text for key in keys.values())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with caplog.at_level(logging.DEBUG):
        post(client, {"X-API-Key": keys["clinic"]})
        post(client, {"X-API-Key": keys["clinic"] + "x"})
    assert all(key not in caplog.text for key in keys.values())
    assert any(getattr(r, "key", None) == "clinic" for r in caplog.records)


def test_cli_prints_a_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "keys",
        "create",
        "ward7",
        "--scopes",
        "predict,metrics",
        "--file",
        str(path),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    key = out.stdout.strip()
    assert key.startswith("efk_") and len(key) > 40
    entry = json.loads(path.read_text())["keys"][0]
    assert entry["name"] == "ward7" and entry["scopes"] == ["metrics", "predict"]
    assert key not in path.read_text()
    bad = subprocess.run([*cmd[:-4], "--scopes", "admin", "--file", str(path)], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0


def test_budget_is_shared_by_replicas_through_redis(
    tmp_path: Path, tiny_models_dir: Path, tiny_registry: Registry
) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "shared", ["models:read"], rate="3/minute")
    redis = RedisServer().start()
    try:
        settings = make_settings(tiny_models_dir, api_keys_file=path, queue_url=redis.url)
        apps = [create_app(settings, tiny_registry) for _ in range(2)]
        with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
            # The budget store's connections are opened at start (4 per replica), not when a
            # request first spends: a name lookup that stalls then holds no request.
            admin = redis.client()

            def budget_connections() -> int:
                return sum(c["name"].startswith("endofuse-limits:") for c in admin.client_list())

            wait_for(lambda: budget_connections() == 8, 5, "the budget store's connections")
            replicas = (a, b, a, b)
            codes = [c.get("/models", headers={"X-API-Key": key}).status_code for c in replicas]
            assert budget_connections() == 8
    finally:
        redis.kill()
    assert codes == [200, 200, 200, 429]


def test_metrics_stay_open_for_scrapers_unless_configured(
    tmp_path: Path, tiny_models_dir: Path, tiny_registry: Registry
) -> None:
    path = tmp_path / "keys.json"
    create_key(path, "clinic", ["predict"])
    app = create_app(make_settings(tiny_models_dir, api_keys_file=path), tiny_registry)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/models").status_code == 401


def test_off_without_a_keys_file(client: TestClient) -> None:
    assert os.environ.get("ENDOFUSE_API_KEYS_FILE") is None
    assert post(client, {}).status_code == 200


def test_unreachable_budget_store_is_503_not_500(
    tmp_path: Path, tiny_models_dir: Path, tiny_registry: Registry
) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "clinic", ["models:read"], rate="5/minute")
    redis = RedisServer().start()
    try:
        settings = make_settings(tiny_models_dir, api_keys_file=path, queue_url=redis.url)
        with TestClient(create_app(settings, tiny_registry), raise_server_exceptions=False) as c:
            assert c.get("/models", headers={"X-API-Key": key}).status_code == 200
            redis.kill()
            r = c.get("/models", headers={"X-API-Key": key})
            assert r.status_code == 503 and "retry-after" in r.headers
    finally:
        redis.kill()
