"""What each out-of-distribution feature layer costs inside the graph: hyperkvasir-lgi's
served graph without distances, with the final pooling's distance (1,280 x 1,280), the
middle stage's (112 x 112, averaged in the graph), the image token's (128 x 128), and with
the first two together, and the middle stage's with several prototypes per class (as
fitted now), timed in process at batch 1 on one thread, one inference of each
in turn. The cost of a distance does not depend on the fitted values, so the layers are
given random class means and precisions of the real sizes.

    python bench/ood_cost.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import publish  # noqa: E402
from training.ood_embed import (  # noqa: E402
    PROTOTYPES,
    LayerFit,
    add_distances,
    image_token,
    mid_feature,
    pooled_feature,
    without_distance,
)


def random_fit(feature: str, dims: int, classes: int, pool: bool) -> LayerFit:
    rng = np.random.default_rng(dims)
    a = rng.normal(size=(dims, dims))
    return LayerFit(feature, rng.normal(size=(classes, dims)), a @ a.T / dims + np.eye(dims), pool)


def session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1500, help="Turns (one inference each)")
    parser.add_argument("--version", default="2", help="hyperkvasir-lgi version")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    name, version = "hyperkvasir-lgi", args.version
    base = without_distance(onnx.load(str(REPO / "models" / name / version / "model.onnx")))
    classes = 5
    pooled = random_fit(pooled_feature(base), 1280, classes, False)
    middle = random_fit(mid_feature(), 112, classes, True)
    prototypes = random_fit(mid_feature(), 112, classes * PROTOTYPES, True)
    token = random_fit(image_token(base), 128, classes, False)
    variants = {
        "no distance": base,
        "final pooling (1,280)": add_distances(base, [pooled]),
        "middle stage (112)": add_distances(base, [middle]),
        f"middle stage (112), {PROTOTYPES} prototypes per class": add_distances(base, [prototypes]),
        "image token (128)": add_distances(base, [token]),
        "final pooling and middle stage": add_distances(base, [pooled, middle]),
    }
    sessions = {k: session(v) for k, v in variants.items()}
    feeds = {"image": np.random.default_rng(1).integers(0, 255, (1, 224, 224, 3), np.uint8)}
    for s in sessions.values():
        for _ in range(20):
            s.run(None, feeds)
    # One inference of each graph in turn, the order rotating: the machine's drift, which is
    # larger than the effect, falls on every graph alike; paired differences per turn.
    names = list(sessions)
    times = np.empty((args.runs, len(names)))
    for i in range(args.runs):
        for j in range(len(names)):
            k = (i + j) % len(names)
            start = time.perf_counter()
            sessions[names[k]].run(None, feeds)
            times[i, k] = (time.perf_counter() - start) * 1e3
    rows = []
    for k, graph in enumerate(names):
        diff = times[:, k] - times[:, 0]
        rows.append(
            f"| {graph} | {np.median(times[:, k]):.2f} | {np.median(diff):+.2f} | "
            f"{100 * np.median(diff) / np.median(times[:, 0]):+.1f} % |"
        )
        print(rows[-1], flush=True)
    publish(
        args.out,
        "Cost of the out-of-distribution distance per feature layer",
        [
            f"`{name}/{version}`'s graph, batch 1, one thread; {args.runs} turns of one "
            "inference per graph, the order rotating (random class means and precisions of "
            "the real sizes: the cost does not depend on the values).",
            "",
            "| graph | median ms | median paired difference, ms | vs no distance |",
            "|---|---|---|---|",
            *rows,
        ],
        "bench/ood_cost.py",
    )


if __name__ == "__main__":
    main()
