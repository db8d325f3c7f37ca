"""``endofuse serve --workers 2``: whichever process answers a scrape, it reports the whole
replica (Prometheus multiprocess mode), not its own share."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.http_server import serve_process
from tests.images import png

pytestmark = pytest.mark.slow


def ok_count(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('endofuse_requests_total{model="endo",outcome="ok"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_add_up_across_uvicorn_workers(tiny_models_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    env = {"ENDOFUSE_WARMUP_RUNS": "0"}
    with serve_process(tiny_models_dir, log, "--workers", "2", env=env) as base:
        image = base64.b64encode(png(np.full((32, 32, 3), 90, np.uint8))).decode()
        for _ in range(30):
            # A fresh connection each time, so both processes take requests.
            r = httpx.post(f"{base}/predict", json={"image": image}, timeout=10)
            assert r.status_code == 200, r.text
        counts = {ok_count(httpx.get(f"{base}/metrics", timeout=5).text) for _ in range(10)}
        assert counts == {30.0}, counts
