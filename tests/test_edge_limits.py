"""Connection-level limits, driven with raw sockets against a real uvicorn server: request
head size and time, header count, body time, and that ordinary keep-alive traffic still flows."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.loadgen import multipart_request
from service.api import create_app
from service.registry import Registry
from tests.conftest import make_settings
from tests.http_server import running
from tests.images import jpeg, pattern

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def addr(tiny_models_dir: Path, tiny_registry: Registry) -> Iterator[tuple[str, int]]:
    settings = make_settings(
        tiny_models_dir,
        max_header_bytes=8192,
        max_header_count=50,
        header_timeout_s=HEAD_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    with running(create_app(settings, tiny_registry), settings) as a:
        yield a


def read_response(sock: socket.socket, limit_s: float = 10.0) -> tuple[int, dict, bytes]:
    """Status, headers and body of one response (read until the body is complete or EOF)."""
    sock.settimeout(limit_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data[:80]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def is_closed(sock: socket.socket, limit_s: float = 5.0) -> bool:
    sock.settimeout(limit_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=10)


def test_oversized_head_is_431_and_closed(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        assert status == 431
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "header_too_large"
        assert is_closed(sock)


@pytest.mark.parametrize(
    ("fields", "code"),
    [(100_000, "header_too_large"), (60, "too_many_headers")],  # ~1 MB; ~600 bytes
)
def test_header_flood_is_431(addr: tuple[str, int], fields: int, code: str) -> None:
    flood = b"".join(b"X-%d: v\r\n" % i for i in range(fields))
    with connect(addr) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + flood + b"\r\n")
        status, _, body = read_response(sock)
    assert status == 431
    assert json.loads(body)["error"]["code"] == code


def test_head_just_under_the_cap_is_served(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 7000 + b"\r\n\r\n")
        status, _, _ = read_response(sock)
    assert status == 200


def test_slow_head_is_408_after_the_timeout(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        status, _, body = read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert is_closed(sock)
    assert elapsed >= HEAD_TIMEOUT_S * 0.9


def test_silent_connection_is_closed(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        assert is_closed(sock, limit_s=HEAD_TIMEOUT_S + 5)


def test_slow_body_is_408_and_the_connection_closed(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"image": '
        )
        start = time.monotonic()
        status, headers, body = read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 408
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert is_closed(sock)
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 5


def test_keep_alive_requests_still_flow(addr: tuple[str, int]) -> None:
    request = multipart_request(*addr, "/predict", jpeg(pattern()))
    with connect(addr) as sock:
        for _ in range(3):  # one connection, one request after another
            status, _, answer = read_response_after(sock, request)
            assert status == 200, answer
            assert "probabilities" in json.loads(answer)


def read_response_after(sock: socket.socket, request: bytes) -> tuple[int, dict, bytes]:
    sock.sendall(request)
    return read_response(sock)


def test_head_split_across_many_writes_is_served(addr: tuple[str, int]) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 3000 + b"\r\n\r\n"
    with connect(addr) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(request), 97):
            sock.sendall(request[i : i + 97])
        status, _, _ = read_response(sock)
    assert status == 200


def test_connections_beyond_the_cap_get_503(tiny_models_dir: Path, tiny_registry: Registry) -> None:
    settings = make_settings(tiny_models_dir, max_connections=3, header_timeout_s=30)
    with running(create_app(settings, tiny_registry), settings) as addr:
        held = [connect(addr) for _ in range(3)]  # open, silent
        try:
            with connect(addr) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, _ = read_response(sock)
            assert status == 503
        finally:
            for sock in held:
                sock.close()
        with connect(addr) as sock:  # room again once they are gone
            time.sleep(0.2)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
