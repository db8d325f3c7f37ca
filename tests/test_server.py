"""Against a real uvicorn server on a loopback port: what only a socket can show."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.api import create_app
from service.registry import Registry
from tests.conftest import make_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tiny_models_dir: Path, tiny_registry: Registry) -> Iterator[str]:
    port = free_port()
    app = create_app(make_settings(tiny_models_dir, max_body_bytes=1_000_000), tiny_registry)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_chunked_body_over_limit_is_413_while_streaming(server: str) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(200):  # up to 12.8 MB, no Content-Length
            sent += 64 * 1024
            yield b"\0" * (64 * 1024)

    with httpx.Client(timeout=10) as client:
        try:
            r = client.post(
                f"{server}/predict", content=body(), headers={"content-type": "application/json"}
            )
        except httpx.HTTPError:
            pytest.fail("server must answer 413, not drop the connection")
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_real_frame_over_http(server: str, fullres_frames: list[Path]) -> None:
    with httpx.Client(timeout=10) as client:
        r = client.post(
            f"{server}/predict", files={"image": ("f.jpg", fullres_frames[0].read_bytes())}
        )
        assert r.status_code == 200
        assert client.get(f"{server}/readyz").status_code == 200
