"""The serving engine on a CUDA GPU against the same engine on the CPU, one invocation: which
providers the session really runs, whether the CUDA provider keeps float32 (TF32 off), how
far its probabilities are from the CPU's on real frames, and images per second at several
batch sizes, measured in two rounds. Needs onnxruntime-gpu and a GPU; imports neither torch
nor the web stack, so it runs wherever the engine's own dependencies are.

    python bench/gpu_engine.py --model hyperkvasir-lgi/2 --model ham10000/9
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine import Batch, Engine, cpu_count, resolve_providers  # noqa: E402
from service.manifest import load_manifest  # noqa: E402
from service.preprocess import decode_image  # noqa: E402

CPU = ["CPUExecutionProvider"]


def frames(root: Path) -> list[bytes]:
    paths = sorted((root / "hyperkvasir-lgi-fullres").glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no frames under {root}/hyperkvasir-lgi-fullres (ENDOFUSE_DATA_DIR)")
    return [p.read_bytes() for p in paths]


def engine(model_dir: Path, providers: list[str]) -> Engine:
    # On the CPU one session with every core: the comparison is device against device.
    threads = 0 if providers[0] != "CPUExecutionProvider" else cpu_count()
    manifest = load_manifest(model_dir / "manifest.json")
    return Engine(model_dir / "model.onnx", manifest, providers, threads)


def images_per_second(e: Engine, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second at ``batch``, after warm-up runs (the CUDA provider picks its
    convolution algorithms on the first run of each shape)."""
    reps = -(-batch // len(images))
    chunk = Batch(np.concatenate([images] * reps)[:batch])
    for _ in range(3):
        e.run(chunk)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        e.run(chunk)
        n += batch
    return n / (time.perf_counter() - started)


def measure(model_dir: Path, raw: list[bytes], batches: list[int], seconds: float) -> dict:
    gpu, cpu = engine(model_dir, resolve_providers("cuda")), engine(model_dir, CPU)
    images = np.stack([decode_image(f, gpu.manifest.image) for f in raw])
    p_gpu, p_cpu = gpu.run(Batch(images)), cpu.run(Batch(images))
    options = gpu.session.get_provider_options().get("CUDAExecutionProvider", {})
    rounds = [
        {
            f"{name} b{b}": round(images_per_second(e, images, b, seconds), 1)
            for b in batches
            for name, e in (("cuda", gpu), ("cpu", cpu))
        }
        for _ in range(2)
    ]
    return {
        "model": f"{model_dir.parent.name}/{model_dir.name}",
        "providers": gpu.providers,
        "auto": resolve_providers("auto"),
        "use_tf32": options.get("use_tf32"),
        "frames": len(images),
        "max_abs_prob_diff": float(np.abs(p_gpu - p_cpu).max()),
        "same_class": int((p_gpu.argmax(1) == p_cpu.argmax(1)).sum()),
        "images_per_s": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="name/version")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell and round")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    data = Path(os.environ.get("ENDOFUSE_DATA_DIR", REPO.parent / "shared" / "data"))
    raw = frames(data)
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for name in args.model:
        r = measure(args.models_dir / name, raw, batches, args.seconds)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(f"| model | batch | CUDA images/s (round 1, 2) | CPU, {cpu_count()} cores | ratio |")
    print("|---|---|---|---|---|")
    for r in results:
        for b in batches:
            g = [x[f"cuda b{b}"] for x in r["images_per_s"]]
            c = [x[f"cpu b{b}"] for x in r["images_per_s"]]
            ratios = ", ".join(f"{gi / ci:.1f}×" for gi, ci in zip(g, c, strict=True))
            cells = f"{g[0]:.0f}, {g[1]:.0f} | {c[0]:.0f}, {c[1]:.0f}"
            print(f"| {r['model']} | {b} | {cells} | {ratios} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
