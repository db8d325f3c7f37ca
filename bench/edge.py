"""Edge limits with default settings, timed from the client: how fast a header flood is
refused, and how long a stalled body or head holds its connection.

    python bench/edge.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import free_port, publish, start_server  # noqa: E402

FLOODS = {
    "one 1 MiB header": b"X-Big: " + b"a" * (1 << 20) + b"\r\n",
    "one 16 MiB header": b"X-Big: " + b"a" * (16 << 20) + b"\r\n",
    "100,000 headers": b"".join(b"X-%d: v\r\n" % i for i in range(100_000)),
}


def refused_after(port: int, head: bytes) -> tuple[int, float]:
    """Status and seconds from the first byte sent to the answer's status line (the flood is
    sent from another thread, so the answer is read as soon as it comes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n"
        sender = threading.Thread(target=_send_quietly, args=(sock, request))
        start = time.perf_counter()
        sender.start()
        data = sock.recv(64)
        elapsed = time.perf_counter() - start
        sender.join(30)
        return int(data.split(b" ", 2)[1]), elapsed


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # refused mid-send: the answer is already on its way
        sock.sendall(data)


def held_for(port: int, opening: bytes) -> tuple[bytes, float]:
    """What the server answers to a request that stops half-way, and after how long."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(opening)
        start = time.perf_counter()
        data = sock.recv(64)
        return data.split(b"\r\n", 1)[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    port = free_port()
    proc = start_server(REPO / "models", "hyperkvasir-lgi", port, spinning=False)
    rows = []
    try:
        for name, head in FLOODS.items():
            runs = [refused_after(port, head) for _ in range(args.repeat)]
            statuses = sorted({s for s, _ in runs})
            times = [t * 1e3 for _, t in runs]
            rows.append(f"| {name} | {statuses} | {statistics.median(times):.1f} ms | "
                        f"{max(times):.1f} ms |")  # fmt: skip
        body = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{\"image\": ")  # fmt: skip
        for name, opening in {"body stalls after 10 bytes": body,
                              "head stalls half-way": b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                              }.items():  # fmt: skip
            line, seconds = held_for(port, opening)
            rows.append(f"| {name} | {line.decode()} | {seconds:.1f} s | - |")
    finally:
        proc.terminate()
        proc.wait(30)
    publish(
        args.out,
        "Edge limits",
        [
            f"Defaults (32 KiB head, 10 s head timeout, 30 s body timeout); floods repeated "
            f"{args.repeat} times on fresh connections, timed from the first byte sent to the "
            "answer.",
            "",
            "| request | answer | median | worst |",
            "|---|---|---|---|",
            *rows,
        ],
        "bench/edge.py",
    )


if __name__ == "__main__":
    main()
