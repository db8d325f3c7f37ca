"""Steady-load soak of the Redis deployment: do memory and tail latency stay flat?

A local ``redis-server`` (no persistence, as deployed), one ``endofuse worker`` and one API
replica (``endofuse serve --queue redis://...``) on the bundled hyperkvasir-lgi model; real
frames posted by a closed-loop generator at c=16 for ``--minutes`` after ``--warmup`` seconds.
Every ``--every`` seconds: the API's and the worker's resident memory, Redis's
``used_memory``, and the window's p50/p99 and non-200 answers.

    python bench/soak_redis.py --minutes 10 --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import multipart_request, run_load  # noqa: E402
from bench.redis_hop import start_redis, stop  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402
from bench.soak import rss_mib  # noqa: E402

MODEL = "hyperkvasir-lgi"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds, not measured")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    redis_port, port, worker_port = free_port(), free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    bodies = [multipart_request("127.0.0.1", port, "/predict", im) for im in frames(data)]
    server = start_redis(redis_port)
    worker = start_server(REPO / "models", MODEL, worker_port, False, ("worker", "--queue", url))
    api = start_server(REPO / "models", MODEL, port, False, ENDOFUSE_QUEUE_URL=url)
    client = redis.Redis(port=redis_port)
    rows: list[dict[str, float]] = []
    try:
        asyncio.run(run_load("127.0.0.1", port, bodies, 16, args.warmup))
        start = time.monotonic()
        while time.monotonic() - start < args.minutes * 60:
            r = asyncio.run(run_load("127.0.0.1", port, bodies, 16, args.every, warmup_s=0))
            rows.append(
                {
                    "t": time.monotonic() - start,
                    "api": rss_mib(api.pid),
                    "worker": rss_mib(worker.pid),
                    "redis": client.info("memory")["used_memory"] / 2**20,
                    "rps": r.throughput,
                    "p50": r.percentile(50) * 1e3,
                    "p99": r.percentile(99) * 1e3,
                    "answers": sum(r.statuses.values()),
                    "errors": sum(n for code, n in r.statuses.items() if code != 200),
                }
            )
            row = rows[-1]
            print(
                f"{row['t']:6.0f} s  API {row['api']:6.0f} MiB  worker {row['worker']:6.0f} MiB  "
                f"Redis {row['redis']:5.1f} MiB  {row['rps']:5.1f} req/s  "
                f"p99 {row['p99']:6.1f} ms  non-200 {row['errors']:.0f}",
                flush=True,
            )
    finally:
        stop(api, worker, server)
    first, last = rows[0], rows[-1]
    p99s = [row["p99"] for row in rows]
    lines = [
        f"{args.minutes:g} minutes at c=16 after {args.warmup:g} s of warm-up; `{MODEL}`, one API "
        f"replica, one worker, a local redis-server (no persistence), all on this machine; "
        f"windows of {args.every:g} s.",
        "",
        "| | first window | last window | last / first | peak |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("api", "API RSS MiB"), ("worker", "worker RSS MiB"),
                       ("redis", "Redis used_memory MiB"), ("p99", "p99 ms"),
                       ("rps", "req/s")):  # fmt: skip
        peak = max(row[key] for row in rows)
        lines.append(
            f"| {label} | {first[key]:.1f} | {last[key]:.1f} | "
            f"{last[key] / first[key]:.3f} | {peak:.1f} |"
        )
    answers = sum(row["answers"] for row in rows)
    errors = sum(row["errors"] for row in rows)
    lines += [
        "",
        f"Requests answered: {answers:.0f}, of them not 200: {errors:.0f}. p99 over the "
        f"windows: min {min(p99s):.1f} ms, median {sorted(p99s)[len(p99s) // 2]:.1f} ms, "
        f"max {max(p99s):.1f} ms.",
    ]
    publish(args.out, "Soak: the Redis deployment at steady load", lines, "bench/soak_redis.py",
            "bench-soak-redis")  # fmt: skip


if __name__ == "__main__":
    main()
