"""Cost of the preprocessing on the hot path: version 1 (squash) against version 2 (field-of-view
crop, aspect-keeping fit, ellipse mask) and version 4 (black bars cut, then squash), same
frames, same process, interleaved rounds.

Usage: python bench/preprocess.py [--rounds 20] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import data_dir, frames  # noqa: E402
from service.preprocess import ImageSpec, decode_image  # noqa: E402

SPECS = {
    "v1 (squash, fixed masks)": ImageSpec(
        224, 224, ((0.0, 0.0, 0.17, 0.67), (0.0, 0.67, 0.36, 1.0), (0.92, 0.82, 1.0, 1.0)), 1
    ),
    "v2 (FOV crop, fit, ellipse)": ImageSpec(224, 224, version=2),
    "v4 (bars cut, squash)": ImageSpec(224, 224, version=4),
}


def per_frame_ms(images: list[bytes], spec: ImageSpec) -> float:
    start = time.perf_counter()
    for data in images:
        decode_image(data, spec)
    return (time.perf_counter() - start) / len(images) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = frames(data_dir())
    times: dict[str, list[float]] = {name: [] for name in SPECS}
    for _ in range(args.rounds):  # interleaved, so drift on a noisy box hits both alike
        for name, spec in SPECS.items():
            times[name].append(per_frame_ms(images, spec))
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[next(iter(SPECS))]
    lines = [
        f"{len(images)} full-resolution frames, {args.rounds} interleaved rounds, one thread, "
        f"{platform.machine()}, {os.cpu_count()} CPUs "
        f"(`python bench/preprocess.py --rounds {args.rounds}`):",
        "",
        "| preprocessing | median ms / frame (decode + preprocess) | min | ratio to v1 |",
        "|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(
            f"| {name} | {medians[name]:.2f} | {min(t):.2f} | {medians[name] / base:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
