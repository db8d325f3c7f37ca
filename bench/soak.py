"""Mixed abuse + load soak: does the server's memory stay flat?

``endofuse serve`` with its defaults on the bundled models; for ``--minutes``:
- load: real frames posted by a closed-loop generator at c=16 (hyperkvasir-lgi);
- abuse, beside it: every case of the bad-input corpus (tests/bad_inputs.py) against both
  models, request-head floods, slow bodies that stall until the server drops them, and
  connections that send nothing.
The server's resident memory is sampled every ``--every`` seconds; the first sample is taken
after a one-minute warm-up under the same mix.

    python bench/soak.py --minutes 10 --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import multipart_request, run_load  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402
from tests.bad_inputs import corpus  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def abuse(base: str, port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    cases = corpus()
    rng = random.Random(0)
    with httpx.Client(base_url=base, timeout=60) as client:
        while not stop.is_set():
            model, case = rng.choice(cases)
            method, path, kwargs = case.request(f"/models/{model}/predict")
            try:
                status = client.request(method, path, **kwargs).status_code
            except Exception as exc:
                # A case the client library refuses to send (a false Content-Length), or a
                # connection the server closed: counted, and the soak goes on.
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
                continue
            key = "5xx" if status >= 500 and status != 503 else "answered"
            counts[key] = counts.get(key, 0) + 1
            if rng.random() < 0.05:
                _raw_abuse(port, rng)
                counts["raw"] = counts.get("raw", 0) + 1


def _raw_abuse(port: int, rng: random.Random) -> None:
    """A header flood, a stalled body or a silent connection, left for the server to drop."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    kind = rng.choice(["flood", "stall", "silent"])
    try:
        if kind == "flood":
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200_000 + b"\r\n\r\n")
            sock.recv(4096)
        elif kind == "stall":
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{"
            )
        threading.Thread(target=_close_later, args=(sock, 40.0), daemon=True).start()
    except OSError:
        sock.close()


def _close_later(sock: socket.socket, seconds: float) -> None:
    time.sleep(seconds)
    sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bodies = [multipart_request("127.0.0.1", port, "/predict", im) for im in frames(data)]
    proc = start_server(REPO / "models", "hyperkvasir-lgi,ham10000", port, spinning=False)
    stop = threading.Event()
    counts: dict[str, int] = {}
    abuser = threading.Thread(target=abuse, args=(base, port, stop, counts), daemon=True)
    abuser.start()
    load_seconds = 60 + args.minutes * 60

    def load() -> None:
        result = asyncio.run(run_load("127.0.0.1", port, bodies, 16, load_seconds))
        counts["load"] = sum(result.statuses.values())

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    samples: list[tuple[float, float]] = []
    try:
        time.sleep(60)
        start = time.monotonic()
        while time.monotonic() - start < args.minutes * 60:
            samples.append((time.monotonic() - start, rss_mib(proc.pid)))
            print(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MiB  {counts}", flush=True)
            time.sleep(args.every)
        samples.append((time.monotonic() - start, rss_mib(proc.pid)))
    finally:
        stop.set()
        loader.join(90)
        abuser.join(90)
        proc.terminate()
        proc.wait(30)
    first, last = samples[0][1], samples[-1][1]
    peak = max(m for _, m in samples)
    publish(
        args.out,
        "Soak: mixed abuse and load",
        [
            f"{args.minutes:g} minutes after a 1-minute warm-up, both bundled models loaded: "
            "closed-loop load at c=16 beside a client sending the bad-input corpus, header "
            "floods, stalled bodies and silent connections.",
            "",
            "| RSS at start MiB | peak MiB | at end MiB | end / start | load answered | "
            "abuse answered | abuse 5xx (not 503) | raw abuse connections |",
            "|---|---|---|---|---|---|---|---|",
            f"| {first:.0f} | {peak:.0f} | {last:.0f} | {last / first:.3f} | "
            f"{counts.get('load', 0)} | {counts.get('answered', 0)} | {counts.get('5xx', 0)} | "
            f"{counts.get('raw', 0)} |",
        ],
        "bench/soak.py",
        "bench-soak",
    )


if __name__ == "__main__":
    main()
