"""Closed-loop HTTP/1.1 load generator with pre-encoded requests.

Kept deliberately thin (raw asyncio streams, keep-alive, no client library) because it
shares the machine with the server under test: every cycle it spends is one the server
does not get.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field


def multipart_body(image: bytes) -> tuple[bytes, str]:
    """A multipart body with the frame as its ``image`` part, and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="f.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def multipart_request(host: str, port: int, path: str, image: bytes) -> bytes:
    body, content_type = multipart_body(image)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


@dataclass
class LoadResult:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Latencies of 200 answers only, and 503 answers that lacked Retry-After.
    ok_latencies: list[float] = field(default_factory=list)
    shed_without_retry_after: int = 0
    # Every answer, warm-up and drain included: what the server did while the load ran.
    answered: int = 0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, ok_only: bool = False) -> float:
        ordered = sorted(self.ok_latencies if ok_only else self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status, and whether a Retry-After header came with it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    retry_after = False
    for line in head.split(b"\r\n"):
        lower = line.lower()
        if lower.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        retry_after = retry_after or lower.startswith(b"retry-after:")
    await reader.readexactly(length)
    return status, retry_after


async def run_load(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> LoadResult:
    result = LoadResult(concurrency)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def connection(offset: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                writer.write(requests[i % len(requests)])
                i += concurrency
                status, retry_after = await read_response(reader)
                done = time.perf_counter()
                result.answered += 1
                if sent >= measure_from:
                    result.latencies.append(done - sent)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == 200:
                        result.ok_latencies.append(done - sent)
                    elif status == 503 and not retry_after:
                        result.shed_without_retry_after += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(c) for c in range(concurrency)))
    result.seconds = time.perf_counter() - measure_from
    return result


def load_cells(
    host: str, port: int, requests: list[bytes], seconds: float, concurrency: tuple = (1, 8, 32)
) -> list[str]:
    """Table cells: req/s at each concurrency, the first one followed by its p50 in ms. Any
    answer but 200 or 503 stops the benchmark."""
    cells = []
    for i, c in enumerate(concurrency):
        r = asyncio.run(run_load(host, port, requests, c, seconds))
        assert set(r.statuses) <= {200, 503}, r.statuses
        cells.append(f"{r.throughput:.1f}")
        if i == 0:
            cells.append(f"{r.percentile(50) * 1e3:.1f}")
    return cells
