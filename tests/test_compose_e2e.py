"""The compose deployment built and run for real: images from Debian packages and wheels
(``service/deploy/build-images.sh``), ``podman-compose up`` with 2 API replicas and 2 CPU
workers behind the gateway, real frames through the gateway port, Prometheus scraping every
replica, a worker killed mid-load (nothing lost), one more worker taking work, ``down``.

Skipped where podman, podman-compose or mmdebstrap is missing (``make test`` installs
them). Images are kept between runs; the first build takes a few minutes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.api.auth import create_key
from tests.redis_harness import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COMPOSE_BIN = Path(sys.executable).parent / "podman-compose"
# A worker's metrics of taking over entries and of failing to answer them.
RECOVERY = ("endofuse_reclaimed_total{", "endofuse_worker_reply_failures_total{")
SERVICES = ["redis", "api", "worker", "gateway", "prometheus"]  # Grafana: no Debian package


def missing_tools() -> str | None:
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make test installs it from Debian's packages)"
    if not COMPOSE_BIN.is_file():
        return "podman-compose is not installed (the dev extra has it)"
    return None


class Deployment:
    def __init__(self, workdir: Path) -> None:
        self.project = f"endofuse-e2e-{os.getpid()}"
        self.port, self.prom_port = free_port(), free_port()
        self.started = 0.0
        keys = workdir / "keys.json"
        self.key = create_key(keys, "e2e-client", ["predict", "models:read"])
        prom_key = workdir / "prometheus.key"
        prom_key.write_text(create_key(keys, "prometheus", ["metrics"]) + "\n")
        # Read by the API (uid 10001) and Prometheus inside their containers; hashes and a
        # scrape-only key in a directory only this user can enter.
        workdir.chmod(0o755)
        keys.chmod(0o644)
        prom_key.chmod(0o644)
        # podman-compose takes one --scale per command: the replica counts go in a file,
        # which `down` reads too (it removes the replicas the files name).
        self.scale_file = workdir / "scale.yml"
        self.scale(api=2, worker=2)
        self.env = {
            **os.environ,
            "REDIS_PASSWORD": secrets.token_hex(16),
            "GRAFANA_PASSWORD": secrets.token_hex(16),
            "ENDOFUSE_KEYS_FILE": str(keys),
            "PROMETHEUS_KEY_FILE": str(prom_key),
            "ENDOFUSE_PORT": str(self.port),
            "ENDOFUSE_PROMETHEUS_PORT": str(self.prom_port),
        }

    def scale(self, **replicas: int) -> None:
        self.scale_file.write_text(
            "services:\n" + "".join(f"  {name}: {{scale: {n}}}\n" for name, n in replicas.items())
        )

    def all_containers(self) -> list[str]:
        """The project's containers, stopped and killed ones included."""
        out = subprocess.run(
            ["podman", "ps", "-a", "--format", "{{.Names}}",
             "--filter", f"label=io.podman.compose.project={self.project}"],
            env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.split()

    def logs(self) -> list[str]:
        """Every container's log lines (the killed worker's too), each after its name."""
        lines = []
        for name in self.all_containers():
            out = subprocess.run(
                ["podman", "logs", "--tail", "3000", name],
                env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            lines += [f"[{name}] {s}" for s in (out.stdout + out.stderr).splitlines()]
        return lines

    def leftovers(self) -> list[str]:
        networks = subprocess.run(
            ["podman", "network", "ls", "--format", "{{.Name}}",
             "--filter", f"name={self.project}_"],
            env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return self.all_containers() + networks.stdout.split()

    def build(self) -> None:
        out = subprocess.run(
            ["bash", "service/deploy/build-images.sh"],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=1500,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        for line in out.stdout.splitlines():
            if line.startswith("export "):
                name, value = line.removeprefix("export ").split("=", 1)
                self.env[name] = value

    def compose(self, *args: str, timeout: float = 300) -> str:
        cmd = [
            str(COMPOSE_BIN), "-p", self.project,
            "-f", "docker-compose.yml", "-f", "service/deploy/compose.cpu.yml",
            "-f", str(self.scale_file), *args,
        ]  # fmt: skip
        out = subprocess.run(
            cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == 0, f"{' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return out.stdout

    def containers(self, service: str) -> list[str]:
        out = subprocess.run(
            ["podman", "ps", "--format", "{{.Names}}",
             "--filter", f"label=io.podman.compose.project={self.project}",
             "--filter", f"label=com.docker.compose.service={service}"],
            env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return sorted(out.stdout.split())

    def exec_json(self, container: str, url: str) -> str:
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        out = subprocess.run(
            ["podman", "exec", container, "python", "-c", code],
            env=self.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-1000:]
        return out.stdout

    def worker_ready(self, container: str) -> bool:
        code = "import urllib.request as u; u.urlopen('http://127.0.0.1:8001/readyz', timeout=3)"
        out = subprocess.run(
            ["podman", "exec", container, "python", "-c", code],
            env=self.env, capture_output=True, timeout=30,
        )  # fmt: skip
        return out.returncode == 0

    def worker_metrics(self, container: str, prefixes: tuple[str, ...]) -> list[str]:
        """The lines of a worker's /metrics that start with one of ``prefixes``."""
        text = self.exec_json(container, "http://127.0.0.1:8001/metrics")
        return [line for line in text.splitlines() if line.startswith(prefixes)]

    def worker_items(self, container: str) -> float:
        text = self.exec_json(container, "http://127.0.0.1:8001/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("endofuse_worker_items_total{") and 'outcome="ok"' in line
        )

    def prometheus_rules(self) -> dict[str, str]:
        """Every loaded alerting rule's name -> health (ok once evaluated without error)."""
        r = httpx.get(f"http://127.0.0.1:{self.prom_port}/api/v1/rules", timeout=5)
        groups = r.json()["data"]["groups"]
        return {rule["name"]: rule["health"] for g in groups for rule in g["rules"]}

    def prometheus_up(self, job: str) -> list[float]:
        return self.prometheus_query(f'up{{job="{job}"}}')

    def prometheus_query(self, query: str) -> list[float]:
        r = httpx.get(
            f"http://127.0.0.1:{self.prom_port}/api/v1/query", params={"query": query}, timeout=5
        )
        return [float(s["value"][1]) for s in r.json()["data"]["result"]]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    d = Deployment(tmp_path_factory.mktemp("compose"))
    d.build()
    try:
        d.started = time.monotonic()
        d.compose("up", "-d", "--no-build", *SERVICES)
        yield d
    finally:
        lines = d.logs()
        print("\n".join(flagged(lines)[-80:]))
        print("\n".join(lines[-40:])[-4000:])
        # One `podman stop` stops every container at once; `down` alone stops them one by
        # one, each with its own grace period, and once ran past pytest's stack-dump timer.
        containers = d.all_containers()
        if containers:
            subprocess.run(
                ["podman", "stop", "-t", "5", *containers],
                env=d.env, capture_output=True, timeout=120,
            )  # fmt: skip
        d.compose("down", "-t", "5", timeout=180)
        left = d.leftovers()
        if left:  # clear them whatever happens, then fail
            subprocess.run(["podman", "rm", "-f", *left], env=d.env, capture_output=True)
            subprocess.run(["podman", "network", "rm", "-f", *left], env=d.env, capture_output=True)
        assert not left, f"`down` left containers or networks behind: {left}"


def flagged(lines: list[str]) -> list[str]:
    """The service's own warnings, errors and 5xx answers: what explains a request that did
    not get its 200 (the rest is mostly start-up lines and Prometheus' discovery)."""
    marks = ('"level": "warning"', '"level": "error"', '"status": 5')
    return [s for s in lines if any(m in s for m in marks)]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_compose_deployment_end_to_end(deployment: Deployment, fullres_frames: list[Path]) -> None:
    d = deployment
    base = f"http://127.0.0.1:{d.port}"
    headers = {"X-API-Key": d.key}
    frames = [f.read_bytes() for f in fullres_frames[:12]]

    # Ready through the gateway only once a worker serves every model. The gateway spreads
    # requests over 2 API replicas of 2 processes each, and each process sees a new worker
    # at its own next look at the heartbeats (every second): one ready answer says that one
    # process is. Ready is 8 answers in a row, and again 2 s later, when every process that
    # answered has looked at least once since.
    def ready_everywhere() -> bool:
        answers = [httpx.get(f"{base}/readyz", timeout=3) for _ in range(8)]
        return all(
            r.status_code == 200
            and r.json()["workers"]
            and all(n >= 1 for n in r.json()["workers"].values())
            for r in answers
        )

    wait_until(ready_everywhere, 240, "ready on every API process")
    print(f"ready through the gateway {time.monotonic() - d.started:.1f} s after `up`")
    time.sleep(2)
    assert ready_everywhere(), httpx.get(f"{base}/readyz", timeout=3).json()
    assert len(d.containers("api")) == 2 and len(d.containers("worker")) == 2

    # Real frames through the gateway; without a key, 401.
    for data in frames:
        r = httpx.post(f"{base}/predict", files={"image": ("f", data)}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "hyperkvasir-lgi"
    assert httpx.post(f"{base}/predict", files={"image": ("f", frames[0])}).status_code == 401

    # Prometheus finds and scrapes every API and worker replica (DNS service discovery).
    wait_until(lambda: d.prometheus_up("endofuse-api") == [1.0, 1.0], 90, "2 API targets up")
    wait_until(lambda: d.prometheus_up("endofuse-worker") == [1.0, 1.0], 90, "2 workers up")
    # The alerting rules (service/deploy/alerts.yml) are loaded and each evaluates cleanly.
    shipped = yaml.safe_load((REPO / "service/deploy/alerts.yml").read_text())
    names = {rule["alert"] for group in shipped["groups"] for rule in group["rules"]}
    wait_until(
        lambda: d.prometheus_rules() == dict.fromkeys(names, "ok"), 90, "every alert rule ok"
    )

    # A worker killed mid-load: every request still answered 200.
    codes: list[int] = []
    refused: list[str] = []  # what each request that did not get its 200 was told, and when
    killed_at: list[float] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = offset
            while not stop.is_set():
                files = {"image": ("f", frames[i % len(frames)])}
                sent = time.monotonic()
                r = client.post(f"{base}/predict", files=files, headers=headers)
                codes.append(r.status_code)
                if r.status_code != 200:
                    took = time.monotonic() - sent
                    at = sent - killed_at[0] if killed_at else float("nan")
                    refused.append(
                        f"{r.status_code} sent {at:+.1f} s from the kill, answered in "
                        f"{took:.1f} s: {r.text[:160]}"
                    )
                i += 1

    threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = d.containers("worker")[0]
    subprocess.run(["podman", "kill", victim], env=d.env, check=True, capture_output=True)
    killed_at.append(time.monotonic())
    killed_wall = time.strftime("%H:%M:%S", time.gmtime())  # beside the logs' UTC "ts"
    time.sleep(12)  # past the heartbeat's expiry: the survivor takes over the victim's entries
    stop.set()
    for t in threads:
        t.join(60)
    # Logs now: scaling up below may recreate containers, and their logs with them.
    if not codes or set(codes) != {200}:
        # Printed in full: an assertion message is cut short in pytest's report.
        print(f"killed at {killed_wall} UTC", *refused, sep="\n")
        print(*flagged(d.logs())[-60:], sep="\n")
        for c in d.containers("worker"):
            print(c, d.worker_metrics(c, (*RECOVERY, "endofuse_worker_items_total{")))
    assert codes and set(codes) == {200}, ({c: codes.count(c) for c in set(codes)}, refused)
    survivor = next(c for c in d.containers("worker") if c != victim)
    # The survivor's loop: wake-ups in all, and those under 1 s late.
    lag = (
        "endofuse_event_loop_lag_seconds_count",
        'endofuse_event_loop_lag_seconds_bucket{le="1.0"}',
    )
    taken = d.worker_metrics(survivor, RECOVERY + lag)
    # Writes the API replicas tried again (a new connection failing while Redis was up),
    # as last scraped.
    retried = d.prometheus_query("sum(endofuse_queue_enqueue_retries_total)")
    print(f"worker {victim} killed under load: {len(codes)} requests, all 200; {taken}")
    print(f"API writes to the queue tried again: {retried or [0]}")

    # One more worker: it joins and takes work (what `--scale worker=3` does).
    d.scale(api=2, worker=3)
    d.compose("up", "-d", "--no-build", "worker")
    wait_until(lambda: len(d.containers("worker")) == 3, 60, "a third worker container")
    newest = max(
        d.containers("worker"),
        key=lambda c: json.loads(
            subprocess.run(
                ["podman", "inspect", c], env=d.env, capture_output=True, text=True, check=True
            ).stdout
        )[0]["Created"],
    )
    wait_until(lambda: d.worker_ready(newest), 120, "the new worker ready")
    with httpx.Client(timeout=60) as client:
        for i in range(60):
            files = {"image": ("f", frames[i % len(frames)])}
            assert client.post(f"{base}/predict", files=files, headers=headers).status_code == 200
            if i % 10 == 9 and d.worker_items(newest) > 0:
                break
    assert d.worker_items(newest) > 0, "the new worker took no work"
