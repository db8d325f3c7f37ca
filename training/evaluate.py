"""Evaluate an exported model directory with ONNX Runtime (the artefact the service runs),
per missingness pattern, with its capture-shift audit, and write JSON + Markdown + PNG plots.
Torch-free. The audit's frames go through ONNX Runtime too, or, with ``service_url``, as HTTP
requests to a running endofuse service."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.manifest import load_manifest
from service.preprocess import decode_image
from service.sessions import open_session
from training import card
from training.audit import CHANGES, Predict, counterfactual, metadata_risk
from training.calibrate import softmax
from training.config import from_dict
from training.data import Table, load_split, read_rows
from training.metrics import calibrated_eces, floor_of, reliability, summarize
from training.patterns import apply_eval_pattern, eval_patterns


def decode_all(table: Table, manifest: Any) -> np.ndarray:
    spec = manifest.image
    out = np.empty((len(table), spec.height, spec.width, 3), np.uint8)
    for i, path in enumerate(tqdm(table.paths, desc="decode", unit="img", leave=False)):
        out[i] = decode_image(path.read_bytes(), spec, max_pixels=100_000_000)
    return out


def manifest_split(manifest: Any, split: str, group_column: str | None = None) -> Table:
    """``split`` of the dataset the exported model was trained on (from its manifest);
    ``group_column`` names the groups for a model trained before its config did."""
    spec = from_dict(manifest.raw["training"]["config"]).dataset
    if group_column is not None:
        spec = replace(spec, group_column=group_column)
    return load_split(spec, split, manifest.tabular, read_rows(spec))


def evenly_sampled(manifest: Any, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` frames spread evenly over ``split`` (the same every time), decoded as the
    service decodes them, and their label indices."""
    table = manifest_split(manifest, split)
    pick = np.linspace(0, len(table) - 1, min(n, len(table))).astype(int)
    sample = table.rows(pick)
    return decode_all(sample, manifest), sample.labels


def run_session(
    session: Any,
    images: np.ndarray,
    values: np.ndarray | None,
    mask: np.ndarray | None,
    image_mask: np.ndarray | None,
    batch: int = 64,
    with_distance: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and logits; with ``with_distance``, the graph's ``ood_distance`` (if it
    has one) appended to each logits row, as the service's engine carries it."""
    names = {i.name for i in session.get_inputs()}
    outputs = ["probabilities", "logits"]
    if with_distance and "ood_distance" in {o.name for o in session.get_outputs()}:
        outputs.append("ood_distance")
    probs, logits = [], []
    for s in tqdm(range(0, len(images), batch), desc="infer", unit="batch", leave=False):
        feeds = {"image": images[s : s + batch]}
        if "tabular" in names:
            feeds["tabular"] = values[s : s + batch]  # the graph applies the mask itself
            feeds["tabular_mask"] = mask[s : s + batch]
        if "image_mask" in names:
            feeds["image_mask"] = image_mask[s : s + batch]
        p, lg, *distance = session.run(outputs, feeds)
        probs.append(p)
        # As the service's engine does: the graph's OOD distance rides after the logits.
        logits.append(np.concatenate([lg, distance[0].reshape(len(lg), -1)], 1) if distance else lg)
    return np.concatenate(probs), np.concatenate(logits)


def onnx_predictor(session: Any, manifest: Any, table: Table) -> Predict:
    """Encoded frames of ``table``'s rows (in order) -> probabilities, every input recorded."""

    def predict(frames: list[bytes]) -> np.ndarray:
        images = np.stack([decode_image(f, manifest.image, 100_000_000) for f in frames])
        ones = np.ones((len(frames), 1), np.float32)
        return run_session(session, images, table.tabular, table.mask, ones)[0]

    return predict


def http_predictor(url: str, manifest: Any, table: Table, concurrency: int = 8) -> Predict:
    """The same, as ``POST /models/{name}/versions/{v}/predict`` requests to a service."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    endpoint = f"{url.rstrip('/')}/models/{manifest.name}/versions/{manifest.version}/predict"

    def predict(frames: list[bytes]) -> np.ndarray:
        with httpx.Client(timeout=60) as client:

            def one(row: int) -> list[float]:
                values = tabular_fields(manifest, table, row)
                tab = json.dumps(values) if values else None
                r = client.post(
                    endpoint,
                    files={"image": ("frame", frames[row])},
                    data={"tabular": tab} if tab else None,
                )
                r.raise_for_status()
                probs = r.json()["probabilities"]
                return [probs[label] for label in manifest.labels]

            with ThreadPoolExecutor(concurrency) as pool:
                return np.array(list(pool.map(one, range(len(frames)))), np.float32)

    return predict


def tabular_fields(manifest: Any, table: Table, row: int) -> dict[str, Any]:
    """Row ``row``'s recorded tabular fields as a client sends them (name -> value)."""
    values: dict[str, Any] = {}
    for j, spec in enumerate(manifest.tabular.fields if manifest.tabular else ()):
        if table.mask[row, j]:
            raw = float(table.tabular[row, j])
            values[spec.name] = raw if spec.kind == "numeric" else spec.categories[int(raw)]
    return values


def stratified(table: Table, limit: int | None, seed: int = 0) -> Table:
    """At most ``limit`` rows, each class keeping its share (at least 5 rows where it has
    them); the same rows every time."""
    if limit is None or len(table) <= limit:
        return table
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(table.labels):
        rows = np.flatnonzero(table.labels == k)
        n = min(len(rows), max(5, round(limit * len(rows) / len(table))))
        keep.append(np.sort(rng.choice(rows, n, replace=False)))
    return table.rows(np.sort(np.concatenate(keep)))


def capture_audit(
    manifest: Any, cfg: Any, table: Table, predict: Predict, rows: list[dict[str, str]]
) -> dict[str, Any]:
    frames = [p.read_bytes() for p in table.paths]
    with tqdm(total=len(CHANGES), desc="capture audit", unit="change", leave=False) as bar:
        cf = counterfactual(
            frames,
            table.labels,
            manifest.labels,
            predict,
            lambda _: bar.update(),
            None if manifest.label_rule.kind == "argmax" else manifest.label_rule.pick,
        )
    # The metadata classifier needs no more training rows than a few times the audited ones.
    train = stratified(
        load_split(cfg.dataset, "train", manifest.tabular, rows), max(1000, 3 * len(table))
    )
    risk = metadata_risk(
        (train.paths, train.labels), (table.paths, table.labels), manifest.labels, manifest.image
    )
    return {"counterfactual": cf, "metadata": risk}


def evaluate_model_dir(
    model_dir: Path,
    split: str = "test",
    audit: bool = True,
    service_url: str | None = None,
    audit_frames: int | None = None,
    group_column: str | None = None,
) -> dict[str, Any]:
    manifest = load_manifest(model_dir / "manifest.json")
    cfg = from_dict(manifest.raw["training"]["config"])
    if group_column is not None:  # a model trained before its config named the column
        cfg = replace(cfg, dataset=replace(cfg.dataset, group_column=group_column))
    rows = read_rows(cfg.dataset)
    table = load_split(cfg.dataset, split, manifest.tabular, rows)
    images = decode_all(table, manifest)
    session = open_session(model_dir / "model.onnx")
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
        calibrated = summarize(
            probs, table.labels, manifest.labels, manifest.label_rule.pick(probs)
        )
        raw = summarize(softmax(logits), table.labels, manifest.labels)
        calibrated["ece_15_before_temperature"] = raw["ece_15"]
        null = calibrated_eces(probs, draws=1000, groups=table.groups)
        calibrated["ece_15_floor"] = list(floor_of(null))
        # How often a perfectly calibrated model measures at least this ECE here: a p-value.
        calibrated["ece_15_calibrated_at_least"] = float(np.mean(null >= calibrated["ece_15"]))
        calibrated["reliability"] = reliability(probs, table.labels)
        calibrated["reliability_before_temperature"] = reliability(softmax(logits), table.labels)
        results["patterns"][pattern] = calibrated
    if audit:
        audited = stratified(table, audit_frames)
        predict = (
            http_predictor(service_url, manifest, audited)
            if service_url
            else onnx_predictor(session, manifest, audited)
        )
        results["audit"] = capture_audit(manifest, cfg, audited, predict, rows)
        results["audit"]["scored_by"] = (
            "HTTP requests to a running endofuse service" if service_url else "ONNX Runtime"
        )
    results["ece_floor_groups"] = cfg.dataset.group_column or None
    results["preprocessing"] = manifest.image.to_manifest()["preprocessing"]
    results["label_rule"] = manifest.label_rule.kind
    return results


def main(
    model_dir: Path,
    split: str = "test",
    out: Path | None = None,
    audit: bool = True,
    service_url: str | None = None,
    baseline: Path | None = None,
    audit_frames: int | None = None,
    group_column: str | None = None,
) -> dict[str, Any]:
    from training.report import write_report

    results = evaluate_model_dir(model_dir, split, audit, service_url, audit_frames, group_column)
    results["command"] = " ".join(
        [f"endofuse evaluate {model_dir} --split {split}"]
        + ([f"--service {service_url}"] if service_url else [])
        + ([] if audit else ["--no-audit"])
        + ([f"--audit-frames {audit_frames}"] if audit_frames else [])
        + ([f"--baseline {baseline}"] if baseline else [])
        + ([f"--group-column {group_column}"] if group_column is not None else [])
    )
    out = out or Path("docs/models") / model_dir.parent.name / model_dir.name
    write_report(results, out, load_manifest(model_dir / "manifest.json"), baseline)
    for pattern, r in results["patterns"].items():
        print(
            f"{results['model']} {split} [{pattern}] acc {r['accuracy']:.4f} "
            f"macro-F1 {r['macro_f1']:.4f} bal-acc {r['balanced_accuracy']:.4f} "
            f"AUROC {r['auroc_macro_ovr']:.4f} ECE {r['ece_15']:.4f} "
            f"(before T {r['ece_15_before_temperature']:.4f})"
        )
    if "audit" in results:
        cf = results["audit"]["counterfactual"]
        print(
            f"capture audit: worst flip rate {cf['worst_flip_rate']:.4f}, "
            f"worst macro-F1 {cf['worst_macro_f1']:.4f}"
        )
    card.refresh(model_dir, out)
    print(f"report written to {out}")
    return results
