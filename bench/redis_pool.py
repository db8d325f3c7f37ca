"""What the fixed connection set (service/queue/connections.py) costs per queue write.

A local ``redis-server``; request-sized entries (150 KB, as a decoded 224x224x3 frame) written
with XADD by N concurrent tasks through (a) redis-py's default pool, which opens a new
connection whenever all are busy, and (b) the service's fixed set of 16 opened at start, which
makes a write wait for a free one instead. Rounds of the two alternate in one process.

Usage: python bench/redis_pool.py [--rounds 8] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from bench.redis_hop import local_redis  # noqa: E402
from bench.serving import write_section  # noqa: E402
from service.queue import connections  # noqa: E402

CONCURRENCY = (1, 8, 32)
WRITES = 400  # per round
ENTRY = b"x" * 150_528


async def burst(
    write: Callable[[], Awaitable[object]], concurrency: int, writes: int = WRITES
) -> float:
    """Microseconds per ``write()``, ``writes`` of them with ``concurrency`` in flight."""
    room = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with room:
            await write()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(writes)))
    return (time.perf_counter() - start) / writes * 1e6


def xadd(client: aioredis.Redis) -> Callable[[], Awaitable[object]]:
    return lambda: client.xadd("bench", {"image": ENTRY}, maxlen=1000, approximate=True)


async def compare(url: str, rounds: int) -> list[tuple[int, float, float]]:
    growing = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    fixed = connections.open_client(url, 16, "bench", socket_timeout=5, connect_timeout=2)
    await connections.warm(fixed)
    rows = []
    try:
        for c in CONCURRENCY:
            a, b = [], []
            for _ in range(rounds):
                a.append(await burst(xadd(growing), c))
                b.append(await burst(xadd(fixed), c))
            rows.append((c, statistics.median(a), statistics.median(b)))
            print(f"concurrency {c}: growing {rows[-1][1]:.0f} us, fixed {rows[-1][2]:.0f} us")
    finally:
        await growing.aclose()
        await fixed.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with local_redis() as (url, _):
        runs = [asyncio.run(compare(url, args.rounds)) for _ in range(2)]
    lines = [
        f"XADD of a 150 KB entry, {WRITES} per round, median of {args.rounds} alternating "
        "rounds; two runs in one invocation. Per write, the service's fixed set of 16 "
        "connections against a pool that grows when all are busy:",
        "",
        "| concurrency | growing pool µs, run 1 / 2 | fixed 16 µs, run 1 / 2 | difference µs |",
        "|---|---|---|---|",
    ]
    for (c, a1, b1), (_, a2, b2) in zip(*runs, strict=True):
        lines.append(
            f"| {c} | {a1:.0f} / {a2:.0f} | {b1:.0f} / {b2:.0f} | {b1 - a1:+.0f} / {b2 - a2:+.0f} |"
        )
    body = "\n".join(lines) + "\n"
    print(body)
    if args.out:
        write_section(args.out, "Queue connections: fixed set vs growing pool", body,
                      script="bench/redis_pool.py", target="")  # fmt: skip


if __name__ == "__main__":
    main()
