"""Evaluate an exported model directory with ONNX Runtime (the artefact the service runs),
per missingness pattern, and write JSON + Markdown + PNG plots. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.manifest import load_manifest
from service.preprocess import decode_image
from training.calibrate import softmax
from training.config import from_dict
from training.data import Table, load_split, read_rows
from training.metrics import reliability, summarize
from training.patterns import apply_eval_pattern, eval_patterns


def decode_all(table: Table, manifest: Any) -> np.ndarray:
    spec = manifest.image
    out = np.empty((len(table), spec.height, spec.width, 3), np.uint8)
    for i, path in enumerate(tqdm(table.paths, desc="decode", unit="img", leave=False)):
        out[i] = decode_image(path.read_bytes(), spec, max_pixels=100_000_000)
    return out


def run_session(
    session: Any,
    images: np.ndarray,
    values: np.ndarray | None,
    mask: np.ndarray | None,
    image_mask: np.ndarray | None,
    batch: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    probs, logits = [], []
    for s in tqdm(range(0, len(images), batch), desc="infer", unit="batch", leave=False):
        feeds = {"image": images[s : s + batch]}
        if "tabular" in names:
            feeds["tabular"] = values[s : s + batch]  # the graph applies the mask itself
            feeds["tabular_mask"] = mask[s : s + batch]
        if "image_mask" in names:
            feeds["image_mask"] = image_mask[s : s + batch]
        p, lg = session.run(["probabilities", "logits"], feeds)
        probs.append(p)
        logits.append(lg)
    return np.concatenate(probs), np.concatenate(logits)


def evaluate_model_dir(model_dir: Path, split: str = "test") -> dict[str, Any]:
    import onnxruntime as ort

    manifest = load_manifest(model_dir / "manifest.json")
    cfg = from_dict(manifest.raw["training"]["config"])
    rows = read_rows(cfg.dataset)
    table = load_split(cfg.dataset, split, manifest.tabular, rows)
    images = decode_all(table, manifest)
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    patterns = eval_patterns(manifest.tabular is not None)
    results: dict[str, Any] = {
        "model": f"{manifest.name}/{manifest.version}",
        "split": split,
        "patterns": {},
    }
    for pattern in patterns:
        image_mask, tab_mask = apply_eval_pattern(
            pattern, table.mask if manifest.tabular else None, len(table)
        )
        probs, logits = run_session(session, images, table.tabular, tab_mask, image_mask)
        calibrated = summarize(probs, table.labels, manifest.labels)
        raw = summarize(softmax(logits), table.labels, manifest.labels)
        calibrated["ece_15_before_temperature"] = raw["ece_15"]
        calibrated["reliability"] = reliability(probs, table.labels)
        calibrated["reliability_before_temperature"] = reliability(softmax(logits), table.labels)
        results["patterns"][pattern] = calibrated
    return results


def main(model_dir: Path, split: str = "test", out: Path | None = None) -> dict[str, Any]:
    from training.report import write_report

    results = evaluate_model_dir(model_dir, split)
    out = out or Path("docs/models") / model_dir.parent.name
    write_report(results, out, load_manifest(model_dir / "manifest.json"))
    for pattern, r in results["patterns"].items():
        print(
            f"{results['model']} {split} [{pattern}] acc {r['accuracy']:.4f} "
            f"macro-F1 {r['macro_f1']:.4f} bal-acc {r['balanced_accuracy']:.4f} "
            f"AUROC {r['auroc_macro_ovr']:.4f} ECE {r['ece_15']:.4f} "
            f"(before T {r['ece_15_before_temperature']:.4f})"
        )
    print(f"report written to {out}")
    return results
