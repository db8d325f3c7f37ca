"""Against a real uvicorn server on a loopback port: what only a socket can show."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.registry import Registry
from tests.conftest import make_settings
from tests.http_server import running


@pytest.fixture()
def server(tiny_models_dir: Path, tiny_registry: Registry) -> Iterator[str]:
    settings = make_settings(tiny_models_dir, max_body_bytes=1_000_000)
    with running(create_app(settings, tiny_registry), settings) as (host, port):
        yield f"http://{host}:{port}"


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
