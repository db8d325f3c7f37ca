"""Real processes for the Redis tests: a ``redis-server`` and ``endofuse worker`` subprocesses.

Nothing is mocked: the server is Debian's redis-server (installed by ``make install`` /
``.ci/run``) on a free loopback port, configured as in production (no persistence,
``maxmemory`` + ``noeviction``); workers are the real CLI in child processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).is_file():
        pytest.skip("redis-server is not installed (make install adds it from Debian's packages)")
    return path


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no",
            "--maxmemory", "256mb", "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class WorkerProcess:
    """``endofuse worker`` in a child process, with its health/metrics port."""

    def __init__(self, url: str, models_dir: Path, **env: str) -> None:
        self.port = free_port()
        environment = {**os.environ, "ENDOFUSE_PROVIDERS": "cpu", "ENDOFUSE_WARMUP_RUNS": "1"}
        environment.update({f"ENDOFUSE_{k.upper()}": str(v) for k, v in env.items()})
        cmd = [
            sys.executable, "-m", "service.cli", "worker", "--queue", url,
            "--models-dir", str(models_dir), "--port", str(self.port),
        ]  # fmt: skip
        # A file, not a pipe: a pipe nobody reads would block a chatty worker.
        self.log = tempfile.NamedTemporaryFile(prefix="endofuse-worker-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=self.log
        )

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("worker did not become ready")

    def metric(self, name: str) -> float:
        """Sum of every sample of ``name`` on the worker's /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith(name + "{")
                or line.startswith(name + " ")
                or ("{" in name and line.startswith(name))
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
