"""What one request costs outside inference, stage by stage, on the 40 full-resolution frames:
multipart parsing (the service's own parser on a real Starlette request), decode and
validation (``pipeline.prepare``: JPEG decode, field of view, resize), the decode alone with
Pillow and with simplejpeg's scaled decode for comparison, batch-1 inference on one
single-threaded session, response building and JSON encoding, the per-request log line and
the metrics. Medians over every frame, several passes, in this one process.

    python bench/request_costs.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

from bench.loadgen import multipart_body  # noqa: E402
from bench.serving import data_dir, frames, publish  # noqa: E402
from service.api.parsing import decode_request  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine import Batch  # noqa: E402
from service.logs import JsonFormatter  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.pipeline import encode_response, observe_success, prepare  # noqa: E402
from service.queue.base import ItemResult  # noqa: E402
from service.registry import Registry  # noqa: E402


def starlette_request(body: bytes, content_type: str) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-type", content_type.encode())],
        "query_string": b"",
    }
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def median_ms(fn: Callable[[int], object], n: int, passes: int) -> float:
    times = []
    for _ in range(passes):
        for i in range(n):
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def simplejpeg_decode(data: bytes, height: int, width: int) -> np.ndarray | None:
    """simplejpeg's scaled decode (the same libjpeg-turbo DCT scaling as Pillow's draft)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height, min_width=width)


def pillow_decode(data: bytes, height: int, width: int) -> np.ndarray:
    """The service's decode step alone: Pillow with a draft (scaled DCT) request."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (width, height))
    return np.asarray(image.convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hyperkvasir-lgi")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = frames(data_dir())
    n = len(images)
    registry = Registry.load(
        REPO / "models", providers=["CPUExecutionProvider"], only=[args.model],
        intra_op_threads=1, spinning=False,
    )  # fmt: skip
    model = registry.get(args.model)
    spec = model.manifest.image
    settings = Settings()
    bodies = [multipart_body(im) for im in images]
    loop = asyncio.new_event_loop()  # one loop, as in the server: no loop set-up per call
    raws = [loop.run_until_complete(decode_request(starlette_request(*b))) for b in bodies]
    prepared = [prepare(raw, model, settings) for raw in raws]
    results = []
    for p in prepared:
        probs, logits = model.engine.run_with_logits(Batch(images=p.item.image[None]))
        results.append(
            ItemResult(probs[0], 0.1, 5.0, 1, logits=None if logits is None else logits[0])
        )
    timings = {"decode": 2.0, "queue": 0.1, "inference": 5.0, "total": 8.0}
    metrics = Metrics()
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bench.request_costs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def log_line(i: int) -> None:
        logger.info("predict", extra={"request_id": raws[i].request_id or "x", "model": "m",
                                      "status": 200, "code": "ok", "timing_ms": 8.0})  # fmt: skip

    stages: dict[str, Callable[[int], object]] = {
        "multipart parsing (service parser, Starlette form)": lambda i: loop.run_until_complete(
            decode_request(starlette_request(*bodies[i]))
        ),
        "decode + validate (`pipeline.prepare`, as served)": lambda i: prepare(
            raws[i], model, settings
        ),
        "JPEG scaled decode alone, Pillow (the service's)": lambda i: pillow_decode(
            images[i], spec.height, spec.width
        ),
        "batch-1 inference, one single-threaded session": lambda i: model.engine.run(
            Batch(images=prepared[i].item.image[None])
        ),
        "response building (`encode_response`)": lambda i: encode_response(
            model, prepared[i], results[i], timings
        ),
        "JSON encoding (`JSONResponse`)": lambda i: JSONResponse(
            encode_response(model, prepared[i], results[i], timings)
        ),
        "log line (JSON formatter)": log_line,
        "metrics (`observe_success`)": lambda i: observe_success(metrics, "m", timings),
    }
    if simplejpeg_decode(images[0], spec.height, spec.width) is not None:
        stages["JPEG scaled decode alone, simplejpeg"] = lambda i: simplejpeg_decode(
            images[i], spec.height, spec.width
        )
    rows = ["| stage | ms per request (median) |", "|---|---|"]
    for name, fn in stages.items():
        rows.append(f"| {name} | {median_ms(fn, n, args.passes):.3f} |")
        print(rows[-1], flush=True)
    publish(
        args.out,
        "Cost of a request outside inference",
        [
            f"`{model.key}`, the {n} full-resolution frames, {args.passes} passes, medians, "
            "one process on this machine (no load beside it). JSON encoding includes building "
            "the response.",
            "",
            *rows,
        ],
        "bench/request_costs.py",
    )


if __name__ == "__main__":
    main()
