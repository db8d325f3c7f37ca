"""``endofuse serve --workers 2``: whichever process answers a scrape, it reports the whole
replica (Prometheus multiprocess mode), not its own share."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.images import png
from tests.redis_harness import REPO, free_port

pytestmark = pytest.mark.slow


def ok_count(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('endofuse_requests_total{model="endo",outcome="ok"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_add_up_across_uvicorn_workers(tiny_models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "ENDOFUSE_PROVIDERS": "cpu", "ENDOFUSE_WARMUP_RUNS": "0"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [
        sys.executable, "-m", "service.cli", "serve", "--workers", "2", "--port", str(port),
        "--models-dir", str(tiny_models_dir),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        image = base64.b64encode(png(np.full((32, 32, 3), 90, np.uint8))).decode()
        for _ in range(30):
            # A fresh connection each time, so both processes take requests.
            r = httpx.post(f"{base}/predict", json={"image": image}, timeout=10)
            assert r.status_code == 200, r.text
        counts = {ok_count(httpx.get(f"{base}/metrics", timeout=5).text) for _ in range(10)}
        assert counts == {30.0}, counts
    finally:
        proc.terminate()
        proc.wait(20)
