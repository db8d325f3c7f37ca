"""endofuse against reference peers, in one invocation: the same model file, the same 40
full-resolution frames posted as multipart ``image``, the same load generator
(bench/loadgen.py), concurrency 1 / 8 / 32, two rounds in opposite orders.

Stacks: endofuse embedded as shipped (engine instances and the batch limit measured at load),
endofuse embedded with one multi-threaded session and batches up to 16 (the layout before
engine instances), endofuse behind Redis (1 API + 1 worker + redis-server), a plain FastAPI
server (sync endpoint, batch 1) and LitServe (batches of 16, 5 ms), the peers in
bench/peers/. Every peer decodes with ``service.preprocess.decode_image``.

    python bench/peers.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import LoadResult, multipart_body, multipart_request, run_load  # noqa: E402
from bench.redis_hop import start_redis  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402

CONCURRENCY = (1, 8, 32)
Started = list[subprocess.Popen]
_GROUPS: set[int] = set()  # peers started as process-group leaders


def start_peer(argv: list[str], port: int, model_dir: Path, probe: bytes) -> subprocess.Popen:
    """Start a peer; ready once it answers ``probe`` (a real frame) with 200."""
    log = tempfile.NamedTemporaryFile("w+", prefix="endofuse-peer-", suffix=".log", delete=False)  # noqa: SIM115
    env = dict(os.environ, PEER_MODEL_DIR=str(model_dir), PYTHONPATH=str(REPO))
    # Its own process group: LitServe's inference workers must go when it does.
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    _GROUPS.add(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"peer exited: {Path(log.name).read_text()[-2000:]}")
        try:  # ready once it answers a real request
            body, content_type = multipart_body(probe)
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict", body, {"Content-Type": content_type}
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"peer {argv} did not answer")


def stacks(
    models: Path, model: str, model_dir: Path, probe: bytes
) -> dict[str, Callable[[int], Started]]:
    py = sys.executable

    def embedded(port: int) -> Started:
        return [start_server(models, model, port, False)]

    def one_session(port: int) -> Started:
        env = {"ENDOFUSE_ENGINE_INSTANCES": "1", "ENDOFUSE_PROFILE_BATCHES": "false"}
        return [start_server(models, model, port, False, **env)]

    def redis(port: int, **worker_env: str) -> Started:
        redis_port, worker_port = free_port(), free_port()
        url = f"redis://127.0.0.1:{redis_port}/0"
        procs = [start_redis(redis_port)]
        worker = ("worker", "--queue", url)
        procs.append(start_server(models, model, worker_port, False, worker, **worker_env))
        procs.append(start_server(models, model, port, False, ENDOFUSE_QUEUE_URL=url))
        return procs

    def redis_no_read_ahead(port: int) -> Started:
        # Diagnostic: the worker reads only when a session is free, so every batch waits
        # for a Redis round trip; sizes what reading ahead buys.
        return redis(port, ENDOFUSE_WORKER_READ_AHEAD="0")

    def plain(port: int) -> Started:
        argv = [py, "-m", "uvicorn", "bench.peers.plain_fastapi:app", "--port", str(port),
                "--log-level", "warning"]  # fmt: skip
        return [start_peer(argv, port, model_dir, probe)]

    def plain_h11(port: int) -> Started:
        # Diagnostic, not a peer: the same server on the pure-Python HTTP parser endofuse's
        # edge limits are built on (service/api/edge.py), to size that part of any gap.
        argv = [py, "-m", "uvicorn", "bench.peers.plain_fastapi:app", "--port", str(port),
                "--log-level", "warning", "--http", "h11"]  # fmt: skip
        return [start_peer(argv, port, model_dir, probe)]

    def litserve(port: int) -> Started:
        argv = [py, "-m", "bench.peers.litserve_app", "--port", str(port)]
        return [start_peer(argv, port, model_dir, probe)]

    return {
        "endofuse, embedded (shipped: sessions per core, measured batch limit)": embedded,
        "endofuse, embedded, 1 session × all cores, batch ≤ 16": one_session,
        "endofuse, Redis: 1 API + 1 worker": redis,
        "(diagnostic) endofuse, Redis, worker read-ahead 0": redis_no_read_ahead,
        "plain FastAPI, sync endpoint, batch 1": plain,
        "(diagnostic) plain FastAPI on h11": plain_h11,
        "LitServe, batch ≤ 16, 5 ms": litserve,
    }


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds (user + system) spent so far by ``roots`` and their live descendants
    (LitServe's inference workers, a server's own children), read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, int]] = {}  # pid -> (parent, ticks)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # the command name may hold spaces and parentheses: split after the last ")"
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    members, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        frontier += [c for c in children if c not in members]
        members.update(children)
    return sum(table[pid][1] for pid in members if pid in table) / tick


@dataclass
class Point:
    """One concurrency level: the load generator's record and the CPU each side spent."""

    load: LoadResult
    server_cpu_s: float  # every process of the stack, redis-server and workers included
    loadgen_cpu_s: float  # this process, which runs the load generator

    def cpu_ms_per_ok(self) -> tuple[float, float]:
        n = max(len(self.load.ok_latencies), 1)
        return self.server_cpu_s * 1e3 / n, self.loadgen_cpu_s * 1e3 / n


def measure(port: int, images: list[bytes], seconds: float, procs: Started) -> dict[int, Point]:
    requests = [multipart_request("127.0.0.1", port, "/predict", im) for im in images]
    roots = [p.pid for p in procs]
    out = {}
    for c in CONCURRENCY:
        server, loadgen = tree_cpu_s(roots), time.process_time()
        load = asyncio.run(run_load("127.0.0.1", port, requests, c, seconds))
        out[c] = Point(load, tree_cpu_s(roots) - server, time.process_time() - loadgen)
        assert set(load.statuses) <= {200, 503}, load.statuses
    return out


def ok_rate(r: LoadResult) -> float:
    return len(r.ok_latencies) / r.seconds if r.seconds else 0.0


def stop(procs: Started) -> None:
    """Stop every process of a stack, children included: a peer's worker processes must not
    outlive it and take CPU from the next stack."""
    for p in reversed(procs):
        p.terminate()
        if p.pid in _GROUPS:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        if p.pid in _GROUPS:
            time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # whatever of the group is left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--version", default="2", help="the version every stack serves")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only", help="comma list of words: run the stacks whose names hold one (e.g. Redis)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = args.models_dir / args.model / args.version
    # The service serves the same version: a repository holding only it.
    repo = Path(tempfile.mkdtemp(prefix="endofuse-peers-"))
    (repo / args.model).mkdir()
    (repo / args.model / args.version).symlink_to(model_dir.resolve())
    images = frames(data_dir())
    table = stacks(repo, args.model, model_dir, images[0])
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        table = {k: v for k, v in table.items() if any(w in k for w in wanted)}
    results: dict[str, list[dict[int, Point]]] = {name: [] for name in table}
    for round_ in range(args.rounds):
        order = list(table.items()) if round_ % 2 == 0 else list(reversed(table.items()))
        for name, start in order:
            port = free_port()
            procs = start(port)
            try:
                time.sleep(1.0)  # behind Redis: the API has read the worker's heartbeat
                results[name].append(measure(port, images, args.seconds, procs))
            finally:
                stop(procs)
            r = {c: point.load for c, point in results[name][-1].items()}
            print(
                f"round {round_ + 1} {name}: "
                + ", ".join(f"c={c} {ok_rate(r[c]):.1f} req/s" for c in CONCURRENCY)
                + f", c=1 p50 {r[1].percentile(50, ok_only=True) * 1e3:.1f} ms",
                flush=True,
            )
    publish(args.out, "Against peers", report(results, args, model_dir), "bench/peers.py")


def report(
    points: dict[str, list[dict[int, Point]]], args: argparse.Namespace, model_dir: Path
) -> list[str]:
    results = {
        name: [{c: point.load for c, point in run.items()} for run in runs]
        for name, runs in points.items()
    }
    shipped = next(iter(results))
    peers = [n for n in results if not n.startswith(("endofuse", "("))]
    lines = [
        f"`{args.model}/{args.version}` ({model_dir.name}) in every stack, the 40 "
        f"full-resolution frames as multipart, {args.seconds:g} s per point, "
        f"{os.cpu_count()} CPUs, load generator on the same machine; rounds in opposite "
        "orders. req/s counts 200 answers only.",
        "",
        "| round | stack | c=1 req/s | c=1 p50 ms | c=8 req/s | c=32 req/s | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in range(args.rounds):
        for name, runs in results.items():
            r = runs[i]
            best = max(ok_rate(r[c]) for c in CONCURRENCY)
            lines.append(
                f"| {i + 1} | {name} | {ok_rate(r[1]):.1f} | "
                f"{r[1].percentile(50, ok_only=True) * 1e3:.1f} | {ok_rate(r[8]):.1f} | "
                f"{ok_rate(r[32]):.1f} | {best:.1f} |"
            )
    if peers and shipped.startswith("endofuse"):
        lines += ["", "| round | shipped endofuse best / best peer best | best peer |",
                  "|---|---|---|"]  # fmt: skip
        for i in range(args.rounds):
            ours = max(ok_rate(results[shipped][i][c]) for c in CONCURRENCY)
            rates = {p: max(ok_rate(results[p][i][c]) for c in CONCURRENCY) for p in peers}
            top = max(rates, key=rates.get)
            lines.append(f"| {i + 1} | **{ours / rates[top]:.2f}** | {top} |")
    return lines + cpu_table(points, args.rounds)


def cpu_table(points: dict[str, list[dict[int, Point]]], rounds: int) -> list[str]:
    """Where the box's CPU went at c=32: with server and load generator on the same cores,
    req/s at saturation is about cores ÷ (server + load generator CPU per request)."""
    lines = [
        "",
        "CPU per answered request at c=32 (user + system, every process of the stack; the "
        "load generator is the benchmark's own process):",
        "",
        "| round | stack | server ms | load generator ms | cores ÷ total, req/s | measured req/s |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(rounds):
        for name, runs in points.items():
            point = runs[i][32]
            server, loadgen = point.cpu_ms_per_ok()
            ceiling = (os.cpu_count() or 1) * 1e3 / max(server + loadgen, 1e-9)
            lines.append(
                f"| {i + 1} | {name} | {server:.2f} | {loadgen:.2f} | {ceiling:.1f} | "
                f"{ok_rate(point.load):.1f} |"
            )
    return lines


if __name__ == "__main__":
    main()
