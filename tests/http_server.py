"""A real uvicorn server in a thread, configured exactly as ``endofuse serve`` configures it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from service.api.edge import uvicorn_options
from service.config import Settings
from tests.redis_harness import REPO, free_port


@contextmanager
def running(app: FastAPI, settings: Settings) -> Iterator[tuple[str, int]]:
    """Yield (host, port) of ``app`` served with the service's uvicorn options."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        assert thread.is_alive(), "server thread exited"
        time.sleep(0.02)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_process(
    models_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``endofuse serve`` as its own process (what users run); yields the base URL once ready."""
    port = free_port()
    full_env = {**os.environ, "ENDOFUSE_PROVIDERS": "cpu", **(env or {})}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [
        sys.executable, "-m", "service.cli", "serve", "--port", str(port),
        "--models-dir", str(models_dir), *args,
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
