"""Serve an exported graph under another preprocessing version, nothing else changed.

A model trained on frames without bars reads a letterboxed capture of the same frame with
the bars squashed in under preprocessing version 1: ham10000's stored frames are all 200 x
150 with content to their edges, and its versions 2 and 7 move 10 % of their answers when a
frame arrives in a 16:9 letterbox. Version 4 cuts the bars away first and, on frames without
them, gives version 1's pixels, so the same graph can read both. Whether that holds for a
model is measured here, not assumed: every val and test image is read both ways, and the
copy is refused when more than ``MAX_CHANGED`` of val inputs differ (a preprocessing that
changes what a model sees on its own data needs training, not a rebase). The graph, its
weights, its calibration and its self-check probes are copied unchanged; the decision
parameters (prediction sets, out-of-distribution flag) are refitted on val read the new way.

    endofuse reprocess models/ham10000/7 --version 9 --preprocessing 4
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.manifest import load_manifest
from service.preprocess import ImageSpec, decode_image
from service.repository import files_record, refuse_existing, staged_version
from training import conformal
from training.evaluate import manifest_split

# Share of val inputs that may differ between the two preprocessing versions.
MAX_CHANGED = 0.02


def changed_inputs(manifest: Any, new: ImageSpec, split: str) -> dict[str, Any]:
    """How many of ``split``'s images reach the graph as other pixels under ``new`` than
    under the manifest's own preprocessing, and the largest mean absolute difference."""
    table = manifest_split(manifest, split)
    changed, largest = 0, 0.0
    for path in tqdm(table.paths, desc=f"{split}: both ways", unit="img", leave=False):
        data = path.read_bytes()
        old_px = decode_image(data, manifest.image, max_pixels=100_000_000)
        new_px = decode_image(data, new, max_pixels=100_000_000)
        if not np.array_equal(old_px, new_px):
            changed += 1
            gap = float(np.abs(old_px.astype(np.int16) - new_px).mean())
            largest = max(largest, gap)
    return {"changed": changed, "n": len(table), "largest_mean_abs_difference": round(largest, 2)}


def main(model_dir: Path, version: str, preprocessing: int) -> Path:
    """Write ``model_dir`` served with preprocessing ``preprocessing`` as version
    ``version`` beside it, its decision parameters refitted; returns its directory."""
    manifest = load_manifest(model_dir / "manifest.json")
    dst = model_dir.parent / version
    refuse_existing(dst)
    old = manifest.image
    if preprocessing == old.version:
        raise ValueError(f"{manifest.name}/{manifest.version} already uses version {preprocessing}")
    if old.mask_regions:
        raise ValueError(
            "a version that blanks fixed regions of the frame cannot be rebased: cutting the "
            "frame's bars would move what they cover"
        )
    new = replace(old, version=preprocessing)
    measured = {"val": changed_inputs(manifest, new, "val")}
    share = measured["val"]["changed"] / max(measured["val"]["n"], 1)
    if share > MAX_CHANGED:
        raise ValueError(
            f"preprocessing {preprocessing} changes {share:.1%} of val inputs (at most "
            f"{MAX_CHANGED:.0%}): the model needs training with it, not a rebase"
        )
    measured["test"] = changed_inputs(manifest, new, "test")  # for the record, not a choice
    with staged_version(dst) as tmp:
        shutil.copyfile(model_dir / "model.onnx", tmp / "model.onnx")
        image = dict(manifest.raw["image"]) | new.to_manifest()
        raw = dict(manifest.raw)
        raw.update(
            version=version,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            image=image,
            reprocessed={
                "from": f"{manifest.name}/{manifest.version}",
                "preprocessing_before": old.version,
                "inputs_changed": measured,
            },
            files=files_record(tmp),
            metrics={"see": f"docs/models/{manifest.name}/{version}/"},
        )
        (tmp / "manifest.json").write_text(json.dumps(raw, indent=2))
        conformal.main(tmp)  # the sets and the flag, on val read the new way
    return dst
