"""Engine layout on this CPU, in process: images per second when S ONNX Runtime sessions of T
intra-op threads each run batches of B concurrently (one Python thread per session), for the
layouts that use the machine's cores. The data for choosing engine instances per device.

    python bench/instances.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import data_dir, frames, publish  # noqa: E402
from service.manifest import load_manifest  # noqa: E402
from service.preprocess import decode_image  # noqa: E402
from service.sessions import open_session  # noqa: E402


def session(model: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return open_session(model, options)


def throughput(model: Path, images: np.ndarray, sessions: int, threads: int, batch: int,
               seconds: float) -> float:  # fmt: skip
    pool = [session(model, threads) for _ in range(sessions)]
    feeds = {"image": images[:batch]}
    for s in pool:
        s.run(["probabilities"], feeds)
    done = [0] * sessions
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            pool[i].run(["probabilities"], feeds)
            done[i] += batch

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hyperkvasir-lgi/2")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    model_dir = REPO / "models" / args.model
    spec = load_manifest(model_dir / "manifest.json").image
    images = np.stack([decode_image(f, spec) for f in frames(data)[:16]])
    cores = os.cpu_count() or 1
    layouts = sorted({(1, cores), (cores, 1)} | ({(2, cores // 2)} if cores >= 4 else set()))
    rows = ["| sessions × threads | batch 1 | batch 4 | batch 8 | batch 16 |",
            "|---|---|---|---|---|"]  # fmt: skip
    for round_ in (1, 2):
        for s, t in layouts if round_ == 1 else list(reversed(layouts)):
            cells = [f"{throughput(model_dir / 'model.onnx', images, s, t, b, args.seconds):.1f}"
                     for b in (1, 4, 8, 16)]  # fmt: skip
            rows.append(f"| {s} × {t} (round {round_}) | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    publish(
        args.out,
        "Engine layout (sessions × threads)",
        [
            f"`{args.model}`, images per second in process (inference only, no decode), "
            f"{args.seconds:g} s per cell, {cores} cores, two rounds in opposite orders.",
            "",
            *rows,
        ],
        "bench/instances.py",
    )


if __name__ == "__main__":
    main()
