"""The statistic behind the capture alerts, on real frames: how far an hour's frame shapes
sit from the week's when the capture has not changed, and when it has.

``EndofuseCaptureShapeChanged`` (service/deploy/alerts.yml) fires when the largest gap
between the last hour's and the last 7 days' cumulative shares, over the buckets of
``endofuse_input_aspect_ratio``, exceeds 0.25 (with at least 300 frames in the hour). Here
the week is HyperKvasir's train split and an hour is a random draw of 300 frames from its
val and test splits (the same capture set-ups), computed over the same buckets the service
exports; then the same hour re-captured as a 16:9 letterbox, as another capture card would
deliver it. HAM10000's images all share one size, so its statistic is 0 until the capture
changes. Not a timing: the figures are shares.

    python bench/capture_alert.py --out docs/monitoring.md
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import data_dir, publish  # noqa: E402
from service.metrics import ASPECT_BUCKETS  # noqa: E402

THRESHOLD = 0.25  # as in service/deploy/alerts.yml
HOUR = 300  # the alert's least number of frames in the hour
LETTERBOX = 1920 / 1080


def cumulative(aspects: np.ndarray) -> np.ndarray:
    """Share of frames at or below each bucket edge, as the histogram's buckets count them."""
    return (aspects[:, None] <= np.asarray(ASPECT_BUCKETS)[None, :]).mean(axis=0)


def distance(hour: np.ndarray, week: np.ndarray) -> float:
    return float(np.abs(cumulative(hour) - cumulative(week)).max())


def aspects_by_split(root: Path) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {}
    with (root / "hyperkvasir-lgi" / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            with Image.open(root / "hyperkvasir-lgi" / row["path"]) as image:
                width, height = image.size
            out.setdefault(row["split"], []).append(width / height)
    return {split: np.asarray(values) for split, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000, help="Hours drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    splits = aspects_by_split(data_dir())
    week = splits["train"]
    pool = np.concatenate([splits["val"], splits["test"]])
    rng = np.random.default_rng(args.seed)
    unchanged = np.array(
        [distance(rng.choice(pool, HOUR, replace=False), week) for _ in range(args.draws)]
    )
    changed = distance(np.full(HOUR, LETTERBOX), week)
    p50, p95, p99 = np.percentile(unchanged, [50, 95, 99])
    lines = [
        f"HyperKvasir: the week is the train split ({len(week)} frames), an hour {HOUR} frames "
        f"drawn from val and test ({len(pool)} frames), {args.draws} draws (seed {args.seed}); "
        f"the statistic over the {len(ASPECT_BUCKETS)} buckets of "
        "`endofuse_input_aspect_ratio`. The alert fires above "
        f"{THRESHOLD}.",
        "",
        "| hour | statistic | fires |",
        "|---|---|---|",
        f"| capture unchanged, median of the draws | {p50:.3f} | no |",
        f"| capture unchanged, 95th / 99th percentile | {p95:.3f} / {p99:.3f} | no |",
        f"| capture unchanged, largest of the draws | {unchanged.max():.3f} | "
        f"{'yes' if unchanged.max() > THRESHOLD else 'no'} |",
        f"| every frame letterboxed to 16:9 | {changed:.3f} | "
        f"{'yes' if changed > THRESHOLD else 'no'} |",
    ]
    publish(args.out, "The capture alerts' statistic on real frames", lines,
            "bench/capture_alert.py", target="")  # fmt: skip


if __name__ == "__main__":
    main()
