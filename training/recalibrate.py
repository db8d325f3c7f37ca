"""Refit an exported version's calibration into a new version, nothing else changed.

The rule is ``training.calibrate.fit_calibration``'s, applied to the graph's own logits:
per missingness pattern, a temperature or temperature + class biases, fitted on val or on
the training split plus val, whichever has the lowest cross-validated val NLL. A pattern
whose choice is still val keeps the parameters it shipped with (they were fitted to the
same rows), so its answers stay exactly the source version's. The graph's temperature and
bias constants are replaced in place; its logits are checked unchanged and its
probabilities checked against ``softmax(logits / T + b)`` on every val row before the new
version is written. An int8 variant of the new version is built from it by ``endofuse
quantize``, which copies its source's calibration.

    endofuse recalibrate models/ham10000/2 --version 7 --group-column lesion_id
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from service.manifest import load_manifest
from service.repository import files_record, refuse_existing, staged_version
from training import calibrate, conformal
from training.conformal import pattern_probs
from training.patterns import PATTERN_NAMES, apply_eval_pattern, pattern_ids
from training.train import stacked

KEYS = ("temperatures", "biases", "methods", "fitted_on", "cv_nll")


def split_rows(
    model_dir: Path, split: str, group_column: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """The graph's raw logits on ``split`` in every evaluation pattern, stacked: (logits,
    labels, pattern ids, groups), and the per-pattern output ``pattern_probs`` gave."""
    scored = pattern_probs(model_dir, split, group_column)
    n_labels = len(scored.manifest.labels)
    table = scored.table
    mask = table.mask if scored.manifest.tabular else None
    per_pattern = {
        pattern: (logits[:, :n_labels], pattern_ids(*apply_eval_pattern(pattern, mask, len(table))))
        for pattern, (_, logits) in scored.out.items()
    }
    logits, labels, pids = stacked(per_pattern, table)
    groups = None if table.groups is None else np.tile(table.groups, len(per_pattern))
    return logits.astype(np.float64), labels, pids, groups, scored.out


def refit(source: dict[str, Any], model_dir: Path, val: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """The new calibration block: the rule on ``val`` (``split_rows``) and the training
    split, a pattern that stays with val keeping the source's parameters."""
    logits, labels, pids, groups = val[:4]
    train = split_rows(model_dir, "train", None)[:3]
    params = calibrate.fit_calibration(logits, labels, pids, groups=groups, train=train)
    return merged(source, params)


def merged(source: dict[str, Any], params: dict[str, dict]) -> dict[str, Any]:
    """``source``'s calibration block with ``fit_calibration``'s choice per pattern: its
    parameters where the choice took training rows, the source's where it stayed with val
    (fitted to the same val rows when the version was exported)."""
    block = dict(source)
    block["method"] = calibrate.METHOD
    for key in KEYS:
        block[key] = dict(source.get(key, {}))
    for name in PATTERN_NAMES:
        p = params[name]
        block["cv_nll"][name] = p.get("cv_nll", {})
        block["fitted_on"][name] = p["data"]
        if p["data"] == "val" and name in source.get("temperatures", {}):
            continue
        block["temperatures"][name] = p["temperature"]
        block["biases"][name] = p["bias"]
        block["methods"][name] = p["method"]
    return block


def _table(calibration: dict[str, Any], n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Temperatures [4, 1] and biases [4, K] in pattern-id order (no biases: zeros)."""
    biases = calibration.get("biases") or {}
    return (
        np.array([[calibration["temperatures"][n]] for n in PATTERN_NAMES], np.float32),
        np.array([biases.get(n, [0.0] * n_labels) for n in PATTERN_NAMES], np.float32),
    )


def constants(
    model: onnx.ModelProto, calibration: dict[str, Any], n_labels: int
) -> tuple[str, str]:
    """Names of the graph's temperature column [4, 1] and bias table [4, K] (the export's
    buffers): found by their values, which the manifest records."""
    temps, biases = _table(calibration, n_labels)
    temps = temps[:, 0]
    found: dict[str, str] = {}
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.shape == (4, 1) and np.allclose(value[:, 0], temps, rtol=1e-6, atol=0):
            found.setdefault("temperatures", init.name)
        elif value.shape == biases.shape and np.allclose(value, biases, rtol=1e-6, atol=1e-7):
            found.setdefault("biases", init.name)
    if set(found) != {"temperatures", "biases"}:
        raise ValueError("the graph's calibration constants do not match its manifest")
    return found["temperatures"], found["biases"]


def rewrite(
    model: onnx.ModelProto, old: dict[str, Any], new: dict[str, Any], n_labels: int
) -> None:
    """Replace the graph's calibration constants ``old`` by ``new``, in place."""
    t_name, b_name = constants(model, old, n_labels)
    values = dict(zip((t_name, b_name), _table(new, n_labels), strict=True))
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))


def check(dst: Path, before: dict[str, Any], calibration: dict[str, Any]) -> None:
    """On every val row and pattern: logits as before, probabilities as the new parameters
    say (float32 arithmetic in the graph: 1e-5)."""
    logits, _, pids, _, out = split_rows(dst, "val", None)
    for pattern, (_, rows) in out.items():
        if not np.array_equal(rows, before[pattern][1]):
            raise RuntimeError(f"{pattern}: the rewritten graph changed the logits")
    temps, biases = _table(calibration, logits.shape[1])
    expected = calibrate.calibrated(logits, temps[pids].astype(np.float64), biases[pids])
    probs = np.concatenate([p for p, _ in out.values()])
    if not np.allclose(probs, expected, atol=1e-5):
        raise RuntimeError("the rewritten graph's probabilities are not the new calibration's")


def main(
    model_dir: Path,
    version: str,
    group_column: str | None = None,
) -> Path:
    """Write ``model_dir`` recalibrated as version ``version`` beside it, its decision
    parameters refitted (``endofuse decision``); returns its directory."""
    manifest = load_manifest(model_dir / "manifest.json")
    dst = model_dir.parent / version
    refuse_existing(dst)
    old = manifest.raw["calibration"]
    val = split_rows(model_dir, "val", group_column)
    new = refit(old, model_dir, val)
    model = onnx.load(str(model_dir / "model.onnx"))
    rewrite(model, old, new, len(manifest.labels))
    with staged_version(dst) as tmp:
        onnx.save(model, str(tmp / "model.onnx"))
        # The decision block is refitted below; until then the source's stays, so that the
        # refit keeps the record of the distance layers an earlier fit took out.
        raw = {k: v for k, v in manifest.raw.items() if k != "self_check"}
        raw.update(
            version=version,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            calibration=dict(new, recalibrated_from=f"{manifest.name}/{manifest.version}"),
            files=files_record(tmp),
            metrics={"see": f"docs/models/{manifest.name}/{version}/"},
        )
        (tmp / "manifest.json").write_text(json.dumps(raw, indent=2))
        check(tmp, val[4], new)
        conformal.main(tmp)  # the sets and the flag, on the new probabilities
    return dst
