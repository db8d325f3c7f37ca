"""Overload with default settings: is excess load shed at once, and do admitted requests meet
the latency budget?

One server per configuration, the same frames and load generator: ``endofuse serve`` with its
defaults (admission control on, 1 s budget) and the same server with admission control off
(``ENDOFUSE_LATENCY_BUDGET_S=0``), each at c=128 for 20 s. After each burst, one request is
timed on a fresh connection: the first request after the load stops.

    python bench/overload.py --rounds 2 --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import LoadResult, multipart_request, run_load  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402

CONFIGS = {"defaults (budget 1 s)": {}, "admission off": {"ENDOFUSE_LATENCY_BUDGET_S": "0"}}


async def first_after(host: str, port: int, request: bytes) -> tuple[int, float]:
    reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    elapsed = time.perf_counter() - start
    writer.close()
    return int(head.split(b" ", 2)[1]), elapsed


def measure(
    env: dict[str, str], bodies: list[bytes], port: int, args: argparse.Namespace
) -> tuple[LoadResult, float]:
    proc = start_server(REPO / "models", args.model, port, spinning=False, **env)
    try:
        result = asyncio.run(run_load("127.0.0.1", port, bodies, args.concurrency, args.seconds))
        _, after = asyncio.run(first_after("127.0.0.1", port, bodies[0]))
    finally:
        proc.terminate()
        proc.wait(30)
    return result, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    images = frames(data)
    rows = []
    for round_ in range(1, args.rounds + 1):
        order = list(CONFIGS.items())
        if round_ % 2 == 0:
            order.reverse()  # opposite order each round: neither config always runs first
        for name, env in order:
            port = free_port()
            bodies = [multipart_request("127.0.0.1", port, "/predict", im) for im in images]
            r, after = measure(env, bodies, port, args)
            answered = sum(r.statuses.values())
            ok = r.statuses.get(200, 0)
            shed = r.statuses.get(503, 0)
            other = answered - ok - shed
            row = (
                f"| {round_} | {name} | {answered} | {ok} | {ok / r.seconds:.1f} | "
                f"{r.percentile(50, ok_only=True) * 1e3:.0f} | "
                f"{r.percentile(99, ok_only=True) * 1e3:.0f} | {shed} | "
                f"{r.shed_without_retry_after} | {other} | {after * 1e3:.0f} |"
            )
            print(row, flush=True)
            rows.append(row)
    publish(
        args.out,
        "Overload (admission control)",
        [
            f"`{args.model}`, the 40 full-resolution frames as multipart, closed loop at "
            f"c={args.concurrency} for {args.seconds:g} s per configuration, {args.rounds} "
            "rounds in opposite orders. Every request sent got an answer (closed loop: a "
            "connection sends its next request only after the answer).",
            "",
            "| round | server | answered | 200 | 200/s | 200 p50 ms | 200 p99 ms | 503 | "
            "503 without Retry-After | other | first request after the burst, ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ],
        "bench/overload.py",
    )


if __name__ == "__main__":
    main()
