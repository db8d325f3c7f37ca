"""What decision support costs a request, in process: each default model version with its
decision parameters and as it was before them (``decision_overhead.without_decision``),
one request's work for each in turn — decode and checks (``pipeline.prepare``), batch-1
inference on one thread, the response (``pipeline.encode_response`` and its JSON) — timed
as CPU time of this process, over many turns. Unlike the end-to-end benchmark, whose
paired intervals spread by ±10 % on a shared 2-vCPU machine, thousands of alternating turns
resolve a difference of a fraction of a per cent. On a CPU-bound server throughput is cores
divided by CPU per request, so the extra CPU over a whole request's CPU is the throughput
lost; the HTTP work both copies share only dilutes it.

    python bench/decision_cost.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.decision_overhead import without_decision  # noqa: E402
from bench.precision import model_frames  # noqa: E402
from bench.serving import data_dir, default_version, publish  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine import Batch, Engine  # noqa: E402
from service.manifest import load_manifest  # noqa: E402
from service.pipeline import RawRequest, encode_response, prepare  # noqa: E402
from service.queue import ItemResult  # noqa: E402
from service.registry import ModelVersion  # noqa: E402

STEPS = ("prepare", "inference", "response")


def open_version(path: Path, name: str) -> tuple[ModelVersion, Engine]:
    manifest = load_manifest(path / "manifest.json")
    engine = Engine(
        path / "model.onnx", manifest, ["CPUExecutionProvider"], intra_op_threads=1, spinning=False
    )
    return ModelVersion(name, path.name, path, manifest, None), engine


def one_request(
    model: ModelVersion, engine: Engine, image: bytes, settings: Settings
) -> dict[str, int]:
    """CPU ns of each step of one request; one thread does all of it (intra-op threads 1)."""
    t0 = time.process_time_ns()
    prepared = prepare(RawRequest(image=image, request_id="bench"), model, settings)
    t1 = time.process_time_ns()
    probs, logits = engine.run_with_logits(Batch(images=prepared.item.image[None]))
    t2 = time.process_time_ns()
    result = ItemResult(probs[0], 0.0, 0.0, 1, None, None if logits is None else logits[0])
    body = encode_response(model, prepared, result, {"total": 0.0})
    json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    t3 = time.process_time_ns()
    return {"prepare": t1 - t0, "inference": t2 - t1, "response": t3 - t2}


def measure(name: str, version: str, images: list[bytes], turns: int, root: Path) -> list[str]:
    src = REPO / "models" / name / version
    plain_dir = root / f"{name}-plain" / version
    without_decision(src, plain_dir)
    copies = {"with": open_version(src, name), "without": open_version(plain_dir, name)}
    settings = Settings()
    spent = {c: {s: [] for s in STEPS} for c in copies}
    for turn in range(turns + 20):  # the first 20 turns warm up
        image = images[turn % len(images)]
        order = list(copies) if turn % 2 == 0 else list(reversed(copies))
        for copy in order:
            ns = one_request(*copies[copy], image, settings)
            if turn >= 20:
                for step, value in ns.items():
                    spent[copy][step].append(value)
    rows = []
    totals = {c: sum(np.mean(spent[c][s]) for s in STEPS) / 1e6 for c in copies}
    for step in (*STEPS, "total"):
        if step == "total":
            w, wo = totals["with"], totals["without"]
        else:
            w, wo = (np.mean(spent[c][step]) / 1e6 for c in ("with", "without"))
        rows.append(
            f"| {name}/{version} | {step} | {w:.3f} | {wo:.3f} | {w - wo:+.3f} | "
            f"{100 * (w - wo) / totals['without']:+.2f} % |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000, help="Requests timed per copy")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="endofuse-decision-cost-"))
    rows = []
    try:
        for name in ("hyperkvasir-lgi", "ham10000"):
            images = model_frames(data_dir(), name)
            rows += measure(name, default_version(name), images, args.turns, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    publish(
        args.out,
        "Cost of decision support per request, in process",
        [
            f"{args.turns} requests per copy (hyperkvasir-lgi: the 40 full-resolution frames; "
            "ham10000: 40 dermoscopy images of the test split), each in turn, the two "
            "copies alternating; CPU time of the process, one thread (ONNX Runtime intra-op "
            "threads 1, batch 1). ms per request, mean; change: with minus without, and as a "
            "share of a whole request without decision support (what the in-process path "
            "costs; the HTTP work both copies share is not in it, so the end-to-end share is "
            "smaller).",
            "",
            "| model | step | with decision support, ms | without, ms | change, ms | "
            "share of a request |",
            "|---|---|---|---|---|---|",
            *rows,
        ],
        "bench/decision_cost.py",
    )


if __name__ == "__main__":
    main()
