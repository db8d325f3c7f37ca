"""The serving engine on a CUDA GPU against the same engine on the CPU, one invocation: which
providers the session really runs, whether the CUDA provider keeps float32 (TF32 off), how
far its probabilities are from the CPU's on real frames, and images per second at several
batch sizes, two rounds, for the GPU and for two CPU layouts (one session on every core; one
single-threaded session per core, the service's own). Without a CUDA build of onnxruntime it
measures the CPU layouts alone. Imports neither torch nor the web stack, so it runs wherever
the engine's own dependencies are.

    python bench/gpu_engine.py --model hyperkvasir-lgi/2 --model ham10000/9
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.frames import data_dir, frames  # noqa: E402
from service.engine import Batch, Engine, cpu_count, resolve_providers  # noqa: E402
from service.manifest import load_manifest  # noqa: E402
from service.preprocess import decode_image  # noqa: E402

CPU = ["CPUExecutionProvider"]


def engine(model_dir: Path, providers: list[str], threads: int = 0) -> Engine:
    manifest = load_manifest(model_dir / "manifest.json")
    return Engine(model_dir / "model.onnx", manifest, providers, threads)


def contenders(model_dir: Path) -> dict[str, list[Engine]]:
    """The GPU (where this onnxruntime build has CUDA), and the CPU laid out two ways: one
    session on every core, and the service's own CPU layout, one single-threaded session
    per core running at once (``service.engine.instance_layout``)."""
    n = cpu_count()
    out = {}
    try:
        out["cuda"] = [engine(model_dir, resolve_providers("cuda"))]
    except RuntimeError as exc:
        print(f"no CUDA: {exc}; CPU layouts only", flush=True)
    out[f"cpu 1x{n}"] = [engine(model_dir, CPU, n)]
    out[f"cpu {n}x1"] = [engine(model_dir, CPU, 1) for _ in range(n)]
    return out


def images_per_second(engines: list[Engine], images: np.ndarray, batch: int, s: float) -> float:
    """Images per second at ``batch``, every engine running batches at once on its own
    thread (ONNX Runtime releases the GIL while it runs), after warm-up runs (the CUDA
    provider picks its convolution algorithms on the first run of each shape)."""
    chunk = Batch(np.concatenate([images] * -(-batch // len(images)))[:batch])

    def loop(e: Engine, until: float) -> int:
        n = 0
        while time.perf_counter() < until:
            e.run(chunk)
            n += batch
        return n

    def warm(e: Engine) -> None:
        for _ in range(3):
            e.run(chunk)

    with ThreadPoolExecutor(len(engines)) as pool:
        list(pool.map(warm, engines))
        started = time.perf_counter()
        done = sum(pool.map(loop, engines, [started + s] * len(engines)))
    return done / (time.perf_counter() - started)


def measure(model_dir: Path, raw: list[bytes], batches: list[int], seconds: float) -> dict:
    layouts = contenders(model_dir)
    cpu = layouts[f"cpu 1x{cpu_count()}"][0]
    images = np.stack([decode_image(f, cpu.manifest.image) for f in raw])
    rounds = [
        {
            f"{name} b{b}": round(images_per_second(engines, images, b, seconds), 1)
            for b in batches
            for name, engines in layouts.items()
        }
        for _ in range(2)
    ]
    result = {"model": f"{model_dir.parent.name}/{model_dir.name}", "images_per_s": rounds}
    if "cuda" in layouts:
        gpu = layouts["cuda"][0]
        p_gpu, p_cpu = gpu.run(Batch(images)), cpu.run(Batch(images))
        options = gpu.session.get_provider_options().get("CUDAExecutionProvider", {})
        result |= {
            "providers": gpu.providers,
            "auto": resolve_providers("auto"),
            "use_tf32": options.get("use_tf32"),
            "frames": len(images),
            "max_abs_prob_diff": float(np.abs(p_gpu - p_cpu).max()),
            "same_class": int((p_gpu.argmax(1) == p_cpu.argmax(1)).sum()),
        }
    return result


def report(results: list[dict], batches: list[int]) -> list[str]:
    """Markdown: each layout's two rounds per batch size, and CUDA against the best CPU."""
    names = sorted({k.rsplit(" b", 1)[0] for r in results for k in r["images_per_s"][0]})
    lines = [
        "| model | batch | "
        + " | ".join(f"{n} (rounds 1, 2)" for n in names)
        + " | CUDA ÷ best CPU |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for r in results:
        for b in batches:
            runs = {n: [x[f"{n} b{b}"] for x in r["images_per_s"]] for n in names}
            cells = " | ".join(f"{v[0]:,.0f}, {v[1]:,.0f}" for v in runs.values())
            best_cpu = [max(v[i] for n, v in runs.items() if n != "cuda") for i in (0, 1)]
            ratio = (
                ", ".join(f"{g / c:.1f}×" for g, c in zip(runs["cuda"], best_cpu, strict=True))
                if "cuda" in runs
                else ""
            )
            lines.append(f"| {r['model']} | {b} | {cells} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="name/version")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell and round")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    raw = frames(data_dir())
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for name in args.model:
        r = measure(args.models_dir / name, raw, batches, args.seconds)
        print(json.dumps(r), flush=True)
        results.append(r)
    print("\n".join(report(results, batches)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
