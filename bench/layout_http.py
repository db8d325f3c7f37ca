"""The engine layout end to end: `endofuse serve` as shipped (one process, one ONNX Runtime
session using every core, batches up to 16) against one process per core with one intra-op
thread each (`serve --workers N`, ENDOFUSE_INTRA_OP_THREADS=1), batches up to 4. Same frames
and load generator, two rounds in opposite orders.

    python bench/layout_http.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import load_cells, multipart_request  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402


def configs() -> dict[str, tuple[tuple[str, ...], dict[str, str]]]:
    cores = str(os.cpu_count() or 1)
    return {
        "shipped: 1 process, 1 session × all cores, batch ≤ 16": (("serve",), {}),
        f"{cores} processes × 1 thread, batch ≤ 4": (
            ("serve", "--workers", cores),
            {"ENDOFUSE_INTRA_OP_THREADS": "1", "ENDOFUSE_MAX_BATCH_SIZE": "4"},
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    images = frames(data)
    rows = ["| round | layout | c=1 req/s | c=1 p50 ms | c=8 req/s | c=32 req/s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for round_ in (1, 2):
        items = list(configs().items())
        for name, (command, env) in items if round_ == 1 else list(reversed(items)):
            port = free_port()
            proc = start_server(REPO / "models", args.model, port, False, command, **env)
            try:
                bodies = [multipart_request("127.0.0.1", port, "/predict", im) for im in images]
                cells = load_cells("127.0.0.1", port, bodies, args.seconds)
            finally:
                proc.terminate()
                proc.wait(30)
            rows.append(f"| {round_} | {name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    publish(
        args.out,
        "Engine layout end to end",
        [
            f"`{args.model}` (the served version), the 40 full-resolution frames as multipart, "
            f"{args.seconds:g} s per point.",
            "",
            *rows,
        ],
        "bench/layout_http.py",
    )


if __name__ == "__main__":
    main()
