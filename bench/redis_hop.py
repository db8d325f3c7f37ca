"""Redis deployment vs embedded mode, same model and frames, one run.

Embedded: ``endofuse serve`` (in-process queue). Redis: a local ``redis-server`` (no
persistence), ``endofuse serve --queue redis://...`` (API only) and one ``endofuse worker``.
The same closed-loop load generator posts real frames at concurrency 1 (latency: what the
Redis hop adds) and 32 (throughput at saturation).

Usage: python bench/redis_hop.py [--seconds 10] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.loadgen import LoadResult, multipart_request, run_load  # noqa: E402
from bench.serving import data_dir, frames, free_port, start_server, write_section  # noqa: E402

CONCURRENCY = (1, 32)


def start_redis(port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", "256mb", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    return proc


@contextlib.contextmanager
def local_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    """A throwaway ``redis-server`` on a free loopback port: its URL and process."""
    port = free_port()
    proc = start_redis(port)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        proc.wait()


def measure(port: int, images: list[bytes], seconds: float) -> dict[int, LoadResult]:
    requests = [multipart_request("127.0.0.1", port, "/predict", img) for img in images]
    out = {}
    for c in CONCURRENCY:
        out[c] = asyncio.run(run_load("127.0.0.1", port, requests, c, seconds))
        r = out[c]
        print(
            f"  c={c}: {r.throughput:.1f} req/s p50 {r.percentile(50) * 1e3:.2f} ms "
            f"p99 {r.percentile(99) * 1e3:.2f} ms statuses {r.statuses}",
            flush=True,
        )
    return out


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--worker-threads", type=int, default=0, help="worker ONNX Runtime intra-op threads"
    )
    args = parser.parse_args()
    data = data_dir()
    images = frames(data)

    print("embedded (memory://)", flush=True)
    port = free_port()
    server = start_server(args.models_dir, args.model, port, False)
    try:
        embedded = measure(port, images, args.seconds)
    finally:
        stop(server)

    print("redis:// (1 API + 1 worker)", flush=True)
    redis_port, port, worker_port = free_port(), free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    redis = start_redis(redis_port)
    worker = start_server(
        args.models_dir,
        args.model,
        worker_port,
        False,
        ("worker", "--queue", url),
        ENDOFUSE_INTRA_OP_THREADS=str(args.worker_threads),
    )
    api = start_server(args.models_dir, args.model, port, False, ENDOFUSE_QUEUE_URL=url)
    try:
        time.sleep(1.5)  # the API has read the worker's heartbeat
        remote = measure(port, images, args.seconds)
    finally:
        stop(api, worker, redis)

    lines = [
        f"Model `{args.model}`, {args.seconds:.0f} s per point, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ONNX Runtime CPU; "
        "Redis, API, worker and load generator all on this machine (loopback).",
        "",
        "| mode | concurrency | req/s | p50 ms | p99 ms | non-200 |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in (("embedded", embedded), ("redis", remote)):
        for c, r in res.items():
            bad = sum(v for k, v in r.statuses.items() if k != 200)
            lines.append(
                f"| {name} | {c} | {r.throughput:.1f} | {r.percentile(50) * 1e3:.2f} | "
                f"{r.percentile(99) * 1e3:.2f} | {bad} |"
            )
    ratio = max(r.throughput for r in remote.values()) / max(
        r.throughput for r in embedded.values()
    )
    hop = (remote[1].percentile(50) - embedded[1].percentile(50)) * 1e3
    lines += [
        "",
        f"Redis / embedded throughput at saturation: **{ratio:.3f}**; added p50 latency of the "
        f"Redis hop at concurrency 1: **{hop:+.2f} ms** (payload: the decoded uint8 tensor, "
        "224x224x3 = 147 KB, plus reply).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, "Redis deployment vs embedded", table, "bench/redis_hop.py")


if __name__ == "__main__":
    main()
