"""What the drift metrics show when what a service is sent changes, on real data.

For each bundled model's versions 1 and 2, three streams of requests through the API (in
process), one after another, each read back from ``/metrics`` as the difference it made: the
test split as stored, the same images re-captured (``training/audit.py``: a 16:9 letterbox
for endoscopy, half resolution for dermoscopy, each model's worst change in its version 1
audit), and the other dataset's images (dermoscopy sent to the endoscopy model, and the
reverse). Per stream: the share of each label given (``endofuse_predictions_total``), the
median top probability (``endofuse_top_probability``) and the share of answers near or past
the out-of-distribution threshold (``endofuse_ood_margin``). Images only, no tabular fields.
Not a timing: the figures are counts.

    python bench/drift.py --out docs/monitoring.md
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.serving import data_dir, publish  # noqa: E402
from service.api import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.metrics import TOP_PROBABILITY_BUCKETS  # noqa: E402
from training.audit import recapture  # noqa: E402

CHANGES = {"hyperkvasir-lgi": "letterbox 1920x1080 (16:9)", "ham10000": "half resolution"}
NEAR = -0.1  # a margin above this is "near the threshold"
WIDE = (
    1.55  # frames wider than this (3:2 and wider): not an endoscopy processor's or a dermatoscope's
)


def test_split(root: Path, dataset: str, limit: int) -> list[bytes]:
    """Up to ``limit`` test images, evenly spaced over the split (its rows come by class)."""
    with (root / dataset / ("labels.csv" if dataset != "ham10000" else "metadata.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    rows = rows[:: max(1, -(-len(rows) // limit))][:limit]
    return [(root / dataset / r["path"]).read_bytes() for r in rows]


def recaptured(images: list[bytes], model: str) -> list[bytes]:
    return [recapture(image, CHANGES[model], i) for i, image in enumerate(images)]


def counters(client: TestClient, model: str, version: str) -> dict[str, float]:
    """The drift samples of one version, keyed by sample name (+ label or bucket bound)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.labels.get("model") != model or s.labels.get("version", version) != version:
                continue  # the frame shape is the model's, whichever version answered
            if s.name.startswith(
                (
                    "endofuse_predictions",
                    "endofuse_top_probability",
                    "endofuse_ood_margin",
                    "endofuse_input_aspect_ratio",
                )
            ):
                key = s.name + "".join(f"|{s.labels[k]}" for k in ("label", "le") if k in s.labels)
                out[key] = out.get(key, 0.0) + s.value
    return out


def median_bucket(delta: Callable[[str], float], name: str) -> str:
    """The bucket that holds the median answer, as "lower–upper"."""
    total, lower = delta(f"{name}_count"), 0.0
    for bound in (*TOP_PROBABILITY_BUCKETS, 1.0):
        key = f"{name}_bucket|{bound if bound < 1.0 else '+Inf'}"
        if delta(key) >= total / 2:
            return f"{lower:g}–{bound:g}"
        lower = bound
    return "?"


def stream(
    client: TestClient, model: str, version: str, bodies: list[bytes], labels: list[str]
) -> list[str]:
    before = counters(client, model, version)
    for body in bodies:
        r = client.post(f"/models/{model}/versions/{version}/predict", files={"image": ("f", body)})
        r.raise_for_status()
    after = counters(client, model, version)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    n = delta("endofuse_top_probability_count")
    shares = [f"{100 * delta(f'endofuse_predictions_total|{label}') / n:.0f} %" for label in labels]
    margins = delta("endofuse_ood_margin_count")
    near = margins - delta(f"endofuse_ood_margin_bucket|{NEAR}")
    past = margins - delta("endofuse_ood_margin_bucket|0.0")
    wide = delta("endofuse_input_aspect_ratio_count") - delta(
        f"endofuse_input_aspect_ratio_bucket|{WIDE}"
    )
    return [
        f"{int(n)}",
        f"{100 * wide / n:.0f} %",
        *shares,
        median_bucket(delta, "endofuse_top_probability"),
        f"{100 * near / margins:.1f} %" if margins else "—",
        f"{100 * past / margins:.1f} %" if margins else "—",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="Requests per stream, at most")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = data_dir()
    frames = test_split(root, "hyperkvasir-lgi", args.frames)
    skin = test_split(root, "ham10000", args.frames)
    plans = {
        "hyperkvasir-lgi": [
            ("test split as stored", frames),
            (
                f"the same frames, {CHANGES['hyperkvasir-lgi']}",
                recaptured(frames, "hyperkvasir-lgi"),
            ),
            ("HAM10000 dermoscopy (test split)", skin),
        ],
        "ham10000": [
            ("test split as stored", skin),
            (f"the same images, {CHANGES['ham10000']}", recaptured(skin, "ham10000")),
            ("HyperKvasir endoscopy (test split)", frames),
        ],
    }
    settings = Settings(models_dir=REPO / "models", providers="cpu", warmup_runs=0, reload_s=0)
    tables: list[str] = []
    with TestClient(create_app(settings)) as client:
        for model, plan in plans.items():
            labels = client.get(f"/models/{model}/versions/2").json()["labels"]
            tables += [
                "",
                f"| version | stream | answers | frames wider than {WIDE} | "
                + " | ".join(labels)
                + " | median top probability | near the threshold | past it |",
                "|---|---|---|---|" + "---|" * len(labels) + "---|---|---|",
            ]
            for version in ("1", "2"):
                for what, bodies in plan:
                    cells = stream(client, model, version, bodies, labels)
                    tables.append(f"| {model}/{version} | {what} | " + " | ".join(cells) + " |")
                    print(tables[-1], flush=True)
    publish(
        args.out,
        "What the drift metrics show",
        [
            "Each stream in turn through the API, read back from `/metrics` as the change it "
            f"made. Frames wider than {WIDE}: share of the images whose width / height exceeds "
            "it (`endofuse_input_aspect_ratio`, per model). Label columns: share of the "
            "answers given that label "
            "(`endofuse_predictions_total`); top probability: the bucket of "
            "`endofuse_top_probability` that holds the median answer; near / past the "
            f"threshold: share with an out-of-distribution margin above {NEAR} / above 0 "
            "(`endofuse_ood_margin`; past is flagged). Images only, no tabular fields.",
            *tables,
        ],
        "bench/drift.py",
        target="",
    )


if __name__ == "__main__":
    main()
