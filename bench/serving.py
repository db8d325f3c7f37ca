"""Serving benchmark: in-process ceiling vs end-to-end HTTP, same model and frames, one run.

(a) in-process: decode + preprocess + ONNX Runtime inference, no HTTP, no queue —
    single-request latency (batch 1) and the ceiling: the best throughput over several
    measured layouts (sessions × threads × batch size), never an assumed one.
(b) HTTP: ``endofuse serve`` in a subprocess, a closed-loop loopback load generator at
    concurrency 1, 8, 32 posting real frames as multipart.
(c) The c=1 overhead side by side: short alternating blocks of (a)'s single request and
    (b) at concurrency 1, so that both see the same speed of a noisy VM.

Usage: python bench/serving.py [--model hyperkvasir-lgi] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.frames import data_dir, frames  # noqa: E402 (also imported from here by most benches)
from bench.loadgen import multipart_request, run_load  # noqa: E402
from service.engine import Batch, cpu_count, open_pool  # noqa: E402
from service.preprocess import decode_image  # noqa: E402
from service.registry import Registry  # noqa: E402


def in_process(
    models_dir: Path, model: str, images: list[bytes], batch: int, seconds: float, spinning: bool
):
    """Single-request latency (decode + batch-1 inference on one session using every core),
    and the in-process ceiling: the best of several measured layouts, each with decode
    running beside inference on as many threads as there are sessions (at least two)."""
    mv = _model_version(models_dir, model)
    spec, path, manifest = mv.manifest.image, mv.path / "model.onnx", mv.manifest
    cpu = ["CPUExecutionProvider"]
    solo = _solo(mv, spinning)
    single = _singles(solo, images, spec, seconds)
    cores = cpu_count()
    layouts = [(1, 0, b) for b in sorted({1, 4, batch})] + [(cores, 1, b) for b in (1, 2, 4)]
    best = (0.0, "")
    for sessions, threads, size in layouts:
        pool = open_pool(path, manifest, cpu, sessions, threads, 1, spinning)
        rate = _pipelined(pool, images, spec, size, seconds / 2)
        name = f"{sessions} session(s) × {threads or 'all'} thread(s), batch {size}"
        print(f"(a) {name}: {rate:.1f} img/s", flush=True)
        best = max(best, (rate, name))
    version = mv.version
    del mv, solo
    gc.collect()
    return statistics.median(single), best, version


PAIRED_SECONDS = 2.0


def _model_version(models_dir: Path, model: str):
    """The version's manifest and path only: each measurement opens its own sessions."""
    registry = Registry.load(
        models_dir, providers=["CPUExecutionProvider"], only=[model], load_engines=False
    )
    return registry.get(model)


def default_version(model: str, models_dir: Path = REPO / "models") -> str:
    """The version a request naming none gets under the default settings (the newest fp32
    one): what a benchmark of "the default model" measures as the repository moves on."""
    return _model_version(models_dir, model).version


def _solo(mv, spinning: bool):
    """One session on every core, as the single-request latency is measured."""
    return open_pool(
        mv.path / "model.onnx", mv.manifest, ["CPUExecutionProvider"], 1, 0, 1, spinning
    )


def _singles(solo, images: list[bytes], spec, seconds: float) -> list[float]:
    """Seconds per request, one after another: decode + batch-1 inference (at least 20)."""
    single: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(single) < 20:
        t = time.perf_counter()
        solo.run(Batch(images=decode_image(images[len(single) % len(images)], spec)[None]))
        single.append(time.perf_counter() - t)
    return single


def paired_overhead(
    models_dir: Path,
    model: str,
    images: list[bytes],
    requests: list[bytes],
    port: int,
    spinning: bool,
    blocks: int = 6,
    seconds: float = PAIRED_SECONDS,
) -> list[tuple[float, float]]:
    """(in-process single median, HTTP c=1 p50) in ms for ``blocks`` alternating short
    blocks, the server idle during the in-process ones. Measured apart, minutes from each
    other, the two drift with the VM's speed (the in-process single moved by 50 % between two
    runs), which swamps a 2 ms difference; side by side, each block's pair shares the drift."""
    mv = _model_version(models_dir, model)
    solo = _solo(mv, spinning)
    pairs = []
    for _ in range(blocks):
        single = statistics.median(_singles(solo, images, mv.manifest.image, seconds))
        r = asyncio.run(run_load("127.0.0.1", port, requests, 1, seconds))
        pairs.append((single * 1e3, r.percentile(50) * 1e3))
    del solo
    gc.collect()
    return pairs


def _pipelined(pool, images: list[bytes], spec, size: int, seconds: float) -> float:
    """Images per second with ``max(2, pool.size)`` threads each decoding a batch and running
    it on a free session: decode of one batch overlaps inference of another."""
    end = time.perf_counter() + seconds
    counts = []

    def loop(offset: int) -> None:
        done, i = 0, offset
        while time.perf_counter() < end:
            chunk = [images[(i + k) % len(images)] for k in range(size)]
            pool.run(Batch(images=np.stack([decode_image(b, spec) for b in chunk])))
            done += size
            i += size * 7
        counts.append(done)

    start = time.perf_counter()
    workers = max(2, pool.size)
    with ThreadPoolExecutor(workers) as threads:
        list(threads.map(loop, range(workers)))
    return sum(counts) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    models_dir: Path,
    model: str,
    port: int,
    spinning: bool,
    command: tuple[str, ...] = ("serve",),
    ready_port: int | None = None,
    **extra_env: str,
) -> subprocess.Popen:
    # A file, not a pipe: an unread pipe that fills up would stall the server.
    log = tempfile.NamedTemporaryFile("w+", prefix="endofuse-bench-", suffix=".log", delete=False)  # noqa: SIM115
    env = dict(
        os.environ,
        ENDOFUSE_MODELS=json.dumps(model.split(",")),  # one name or a comma list
        ENDOFUSE_PROVIDERS="cpu",
        ENDOFUSE_LOG_LEVEL="WARNING",
        ENDOFUSE_ORT_SPINNING=str(spinning).lower(),
        **extra_env,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            *command,
            "--port",
            str(port),
            "--models-dir",
            str(models_dir),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            ready = f"http://127.0.0.1:{ready_port or port}/readyz"
            with urllib.request.urlopen(ready, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {Path(log.name).read_text()[-2000:]}")
    proc.kill()
    raise SystemExit("server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--ort-spinning",
        choices=("true", "false"),
        default="false",
        help="ONNX Runtime intra-op spin-waiting, same for (a) and (b)",
    )
    args = parser.parse_args()
    data = data_dir()
    images = frames(data)

    spinning = args.ort_spinning == "true"
    single, (ceiling, ceiling_layout), version = in_process(
        args.models_dir, args.model, images, args.batch, args.seconds, spinning
    )
    print(f"(a) in-process: single {single * 1e3:.2f} ms, ceiling {ceiling:.1f} img/s", flush=True)

    port = free_port()
    server = start_server(args.models_dir, args.model, port, spinning)
    rows = []
    try:
        requests = [multipart_request("127.0.0.1", port, "/predict", img) for img in images]
        for concurrency in (1, 8, 32):
            r = asyncio.run(run_load("127.0.0.1", port, requests, concurrency, args.seconds))
            ok = r.statuses.get(200, 0)
            rows.append(
                (
                    concurrency,
                    r.throughput,
                    r.percentile(50) * 1e3,
                    r.percentile(99) * 1e3,
                    ok,
                    sum(r.statuses.values()) - ok,
                )
            )
            print(
                f"(b) c={concurrency}: {r.throughput:.1f} req/s p50 {rows[-1][2]:.2f} ms "
                f"p99 {rows[-1][3]:.2f} ms statuses {r.statuses}",
                flush=True,
            )
        pairs = paired_overhead(args.models_dir, args.model, images, requests, port, spinning)
        print(f"(c) paired blocks (in-process single ms, HTTP c=1 p50 ms): {pairs}", flush=True)
    finally:
        server.terminate()
        server.wait(30)

    best = max(r[1] for r in rows)
    lines = [
        f"Model `{args.model}/{version}` ({args.seconds:.0f} s per point), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ONNX Runtime CPU; "
        f"ORT spinning {args.ort_spinning}; load generator on the same machine over loopback.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| (a) in-process single request (decode + infer, batch 1), median "
        f"| {single * 1e3:.2f} ms |",
        f"| (a) in-process ceiling: best measured layout ({ceiling_layout}; decode "
        f"overlapped with inference) | {ceiling:.1f} img/s |",
        "",
        "| concurrency | req/s | p50 ms | p99 ms | ok | errors | (b)/(a) throughput |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, rps, p50, p99, ok, err in rows:
        lines.append(
            f"| {c} | {rps:.1f} | {p50:.2f} | {p99:.2f} | {ok} | {err} | {rps / ceiling:.3f} |"
        )
    lines += [
        "",
        f"Saturation ratio (best HTTP req/s / in-process ceiling): **{best / ceiling:.3f}**; "
        f"p50 at concurrency 1 minus in-process single latency: "
        f"**{rows[0][2] - single * 1e3:+.2f} ms** (measured apart, a minute from each other).",
        "",
        f"Side by side ({len(pairs)} alternating {PAIRED_SECONDS:.0f} s blocks: in-process "
        "single, then HTTP at concurrency 1 with the server otherwise idle):",
        "",
        "| block | in-process single median ms | HTTP c=1 p50 ms | difference ms |",
        "|---|---|---|---|",
        *(f"| {i} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for i, (a, b) in enumerate(pairs, 1)),
        "",
        f"c=1 p50 minus in-process single, median of the blocks' differences: "
        f"**{statistics.median(b - a for a, b in pairs):+.2f} ms**.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, "Embedded serving", table)


def publish(
    out: Path | None, title: str, lines: list[str], script: str, target: str = "bench"
) -> None:
    """Print a benchmark's section and, with ``--out``, write it into that document."""
    table = "\n".join(lines)
    print(table)
    if out:
        write_section(out, title, table, script, target)


def write_section(
    path: Path, title: str, body: str, script: str = "bench/serving.py", target: str = "bench"
) -> None:
    """Replace (or append) one '## title' section, keeping the rest of the document.
    ``target``: the make target that runs ``script``, or "" for none."""
    text = path.read_text() if path.exists() else "# Performance\n"
    marker = f"## {title}"
    try:
        shown = path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        shown = path.name
    run = f"`python {script} --out {shown}`"
    command = f"Measured with `make {target}` ({run})." if target else f"Measured with {run}."
    section = f"{marker}\n\n{command}\n\n{body}\n"
    if marker in text:
        head, _, rest = text.partition(marker)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
