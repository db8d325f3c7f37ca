"""fp32 against its int8 variant, one model: in-process ONNX Runtime cost per image at batch
sizes 1, 8 and 16, and end to end through one server holding both versions (the same frames,
load generator and server, two rounds in opposite orders). Each model gets frames of its own
kind: the 40 full-resolution endoscopy frames, or 40 dermoscopy images of the test split.

    python bench/precision.py --model hyperkvasir-lgi --out docs/performance.md
    python bench/precision.py --model ham10000 --fp32 2 --int8 6 --out docs/performance.md

Without --fp32 / --int8 it compares the versions the service serves by default for each
precision (the newest of each), so the benchmark follows the bundled models.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.instances import session as instance_session  # noqa: E402
from bench.loadgen import load_cells, multipart_request  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402
from service.errors import ManifestError  # noqa: E402
from service.manifest import load_manifest  # noqa: E402
from service.preprocess import decode_image  # noqa: E402
from service.registry import Registry  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import load_split, read_rows  # noqa: E402
from training.ood_embed import image_only_feeds, input_names  # noqa: E402


def newest(model: str, precision: str) -> str:
    """The version the service serves to requests naming none when ``precision`` is the
    preferred one, chosen by the registry itself (no engine opened)."""
    try:
        registry = Registry.load(
            REPO / "models",
            providers=["CPUExecutionProvider"],
            only=[model],
            precision=precision,
            load_engines=False,
        )
    except ManifestError as exc:
        raise SystemExit(str(exc)) from None
    served = registry.newest(model)
    if served is None or served.manifest.precision != precision:
        raise SystemExit(f"models/{model} has no {precision} version")
    return served.version


def model_frames(data: Path, model: str) -> list[bytes]:
    if not model.startswith("ham10000"):
        return frames(data)
    spec = load_config(REPO / "training" / "configs" / "ham10000.yaml").dataset
    table = load_split(spec, "test", None, read_rows(spec))
    return [p.read_bytes() for p in sorted(table.paths)[:40]]


def describe_frames(model: str) -> str:
    if model.startswith("ham10000"):
        return "40 dermoscopy images of the test split"
    return "the 40 full-resolution frames"


def session(model_dir: Path) -> tuple[ort.InferenceSession, int]:
    """One single-threaded session, as each engine instance runs on a CPU, and the number of
    tabular fields its graph takes."""
    manifest = load_manifest(model_dir / "manifest.json")
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    return instance_session(model_dir / "model.onnx", 1), n_fields


def per_image_ms(
    dirs: dict[str, Path], images: np.ndarray, batch: int, rounds: int = 10, runs: int = 5
) -> dict[str, float]:
    """Median ms per image of each version at ``batch``, the versions interleaved round by
    round (in opposite orders) so that a noisy neighbour slows both alike."""
    times: dict[str, list[float]] = {kind: [] for kind in dirs}
    loaded = {kind: session(d) for kind, d in dirs.items()}
    feeds = {k: image_only_feeds(input_names(s), images[:batch], n) for k, (s, n) in loaded.items()}
    for kind, (sess, _) in loaded.items():
        sess.run(["probabilities"], feeds[kind])
    for round_ in range(rounds):
        order = list(loaded.items()) if round_ % 2 == 0 else list(reversed(loaded.items()))
        for kind, (sess, _) in order:
            for _ in range(runs):
                start = time.perf_counter()
                sess.run(["probabilities"], feeds[kind])
                times[kind].append((time.perf_counter() - start) / batch * 1e3)
    return {kind: statistics.median(t) for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--fp32", help="version (default: the newest fp32 one)")
    parser.add_argument("--int8", help="version (default: the newest int8 one)")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-http", action="store_true", help="in-process cost only")
    args = parser.parse_args()
    args.fp32 = args.fp32 or newest(args.model, "fp32")
    args.int8 = args.int8 or newest(args.model, "int8")
    data = data_dir()
    raw = model_frames(data, args.model)
    versions = {"fp32": args.fp32, "int8": args.int8}
    dirs = {k: REPO / "models" / args.model / v for k, v in versions.items()}
    spec = load_manifest(dirs["fp32"] / "manifest.json").image
    images = np.stack([decode_image(f, spec) for f in raw[:16]])
    batches = (1, 8, 16)
    cost = {b: per_image_ms(dirs, images, b) for b in batches}
    rows = ["| in process, ms per image | batch 1 | batch 8 | batch 16 |", "|---|---|---|---|"]
    for kind in dirs:
        cells = [f"{cost[b][kind]:.2f}" for b in batches]
        rows.append(f"| {kind} (version {versions[kind]}) | " + " | ".join(cells) + " |")
    speedup = [f"**{cost[b]['fp32'] / cost[b]['int8']:.2f}×**" for b in batches]
    rows.append("| fp32 ÷ int8 | " + " | ".join(speedup) + " |")
    print("\n".join(rows), flush=True)
    if args.no_http:
        return
    port = free_port()
    proc = start_server(REPO / "models", args.model, port, spinning=False)
    http = ["| round | version | c=1 req/s | c=1 p50 ms | c=8 req/s | c=32 req/s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    try:
        for round_ in (1, 2):
            order = list(versions.items()) if round_ == 1 else list(reversed(versions.items()))
            for kind, v in order:
                path = f"/models/{args.model}/versions/{v}/predict"
                bodies = [multipart_request("127.0.0.1", port, path, f) for f in raw]
                cells = load_cells("127.0.0.1", port, bodies, args.seconds)
                http.append(f"| {round_} | {kind} ({v}) | " + " | ".join(cells) + " |")
                print(http[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    publish(
        args.out,
        f"int8 against fp32: {args.model}",
        [
            f"`{args.model}` version {args.fp32} (fp32) and its int8 variant, version "
            f"{args.int8}; in process: ONNX Runtime, one single-threaded session per version (as "
            "each engine instance on a CPU), spinning off, median of 50 runs interleaved with "
            f"the other version's; end to end: {describe_frames(args.model)} as multipart, "
            f"{args.seconds:g} s per point.",
            "",
            *rows,
            "",
            *http,
        ],
        "bench/precision.py",
    )


if __name__ == "__main__":
    main()
