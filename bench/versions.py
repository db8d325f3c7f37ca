"""Two versions of one model, in process: ONNX Runtime's cost per image at batch sizes 1, 8
and 16, one single-threaded session each, the versions interleaved round by round so that a
noisy neighbour slows both alike (the in-process half of ``bench/precision.py``, for versions
that differ in more than precision, e.g. their backbone).

    python bench/versions.py --model hyperkvasir-lgi --versions 2 5
    python bench/versions.py --versions 2 6 --models-dir models /tmp/scratch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.precision import model_frames, per_image_ms  # noqa: E402
from bench.serving import data_dir  # noqa: E402
from service.manifest import load_manifest  # noqa: E402
from service.preprocess import decode_image  # noqa: E402

BATCHES = (1, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--versions", nargs=2, default=["2", "5"], metavar="V")
    parser.add_argument(
        "--models-dir",
        nargs=2,
        type=Path,
        default=[REPO / "models"] * 2,
        metavar="DIR",
        help="the repository of each version (a scratch export beside the bundled models)",
    )
    args = parser.parse_args()
    names = [
        f"{args.model}/{v}"
        + ("" if root.resolve() == (REPO / "models").resolve() else f" ({root})")
        for v, root in zip(args.versions, args.models_dir, strict=True)
    ]
    if names[0] == names[1]:
        raise SystemExit("name two different versions")
    dirs = {
        name: root / args.model / v
        for name, v, root in zip(names, args.versions, args.models_dir, strict=True)
    }
    specs = [load_manifest(d / "manifest.json").image for d in dirs.values()]
    if specs[0] != specs[1]:
        raise SystemExit("the two versions decode frames differently: compare them over HTTP")
    raw = model_frames(data_dir(), args.model)
    images = np.stack([decode_image(f, specs[0]) for f in raw[:16]])
    cost = {b: per_image_ms(dirs, images, b) for b in BATCHES}
    print("| in process, ms per image | batch 1 | batch 8 | batch 16 |\n|---|---|---|---|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{cost[b][name]:.2f}" for b in BATCHES) + " |")
    ratios = " | ".join(f"**{cost[b][names[1]] / cost[b][names[0]]:.2f}×**" for b in BATCHES)
    print(f"| second ÷ first | {ratios} |")


if __name__ == "__main__":
    main()
