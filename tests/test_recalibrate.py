"""Recalibration into a new version: the graph's calibration constants are replaced and
nothing else (``training/recalibrate.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.sessions import open_session
from training.calibrate import calibrated
from training.patterns import PATTERN_NAMES
from training.recalibrate import constants, merged, rewrite

REPO = Path(__file__).resolve().parents[1]
HAM = REPO / "models" / "ham10000"


def _feeds(n: int, pattern: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random frames and fields (age, sex index, site index) as one missingness pattern."""
    rng = np.random.default_rng(seed)
    tabular = np.stack(
        [rng.uniform(5, 85, n), rng.integers(0, 2, n), rng.integers(0, 14, n)], 1
    ).astype(np.float32)
    mask = np.ones((n, 3), np.float32)
    if pattern == "image_only":
        mask[:] = 0
    elif pattern == "partial":
        mask[:, 1:] = 0
    image_mask = np.zeros((n, 1), np.float32) if pattern == "tabular_only" else np.ones((n, 1))
    return {
        "image": rng.integers(0, 256, (n, 150, 200, 3), dtype=np.uint8),
        "tabular": tabular * mask,
        "tabular_mask": mask,
        "image_mask": image_mask.astype(np.float32),
    }


def _run(model: onnx.ModelProto | Path, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    probs, logits = open_session(data).run(["probabilities", "logits"], _feeds(6, pattern))
    return probs, logits


def test_merged_takes_new_parameters_only_where_training_rows_were_chosen() -> None:
    source = {
        "temperatures": {n: 1.0 + i for i, n in enumerate(PATTERN_NAMES)},
        "biases": {n: [0.1 * i, 0.0] for i, n in enumerate(PATTERN_NAMES)},
        "methods": {n: "BCTS" for n in PATTERN_NAMES},
    }
    params = {
        n: {"temperature": 9.0, "bias": [5.0, 5.0], "method": "TS", "data": "val", "cv_nll": {}}
        for n in PATTERN_NAMES
    }
    params["tabular_only"] = dict(params["tabular_only"], data="train+val")
    block = merged(source, params)
    assert block["temperatures"]["tabular_only"] == 9.0
    assert block["biases"]["tabular_only"] == [5.0, 5.0]
    assert block["methods"]["tabular_only"] == "TS"
    for name in ("all", "image_only", "partial"):
        assert block["temperatures"][name] == source["temperatures"][name]
        assert block["biases"][name] == source["biases"][name]
    assert block["fitted_on"] == {
        "all": "val", "image_only": "val", "tabular_only": "train+val", "partial": "val"
    }  # fmt: skip
    assert source.get("fitted_on") is None  # the source block is left as it was


def test_rewrite_replaces_the_calibration_constants_and_nothing_else() -> None:
    """On ham10000/2's graph: new parameters for tabular only; logits unchanged in every
    pattern, probabilities softmax(logits / T + b) with the new parameters, the other
    patterns' probabilities exactly as before."""
    manifest = json.loads((HAM / "2" / "manifest.json").read_text())
    old = manifest["calibration"]
    new = json.loads(json.dumps(old))
    new["temperatures"]["tabular_only"] = 0.7
    new["biases"]["tabular_only"] = [0.3, -0.2, 0.1, 0.0, 0.5, -0.4, 0.2]
    model = onnx.load(str(HAM / "2" / "model.onnx"))
    rewrite(model, old, new, 7)
    for pattern in PATTERN_NAMES:
        p_old, l_old = _run(HAM / "2" / "model.onnx", pattern)
        p_new, l_new = _run(model, pattern)
        assert np.array_equal(l_old, l_new)
        t, b = new["temperatures"][pattern], np.array(new["biases"][pattern])
        assert np.allclose(p_new, calibrated(l_new[:, :7].astype(np.float64), t, b), atol=1e-5)
        if pattern == "tabular_only":
            assert np.abs(p_new - p_old).max() > 0.01
        else:
            assert np.array_equal(p_new, p_old)
    with pytest.raises(ValueError, match="do not match"):
        constants(model, old, 7)  # the graph now holds ``new``


def test_shipped_recalibrated_version_differs_from_its_source_only_without_an_image() -> None:
    """ham10000/7 is ham10000/2 with the tabular-only calibration refitted on train + val:
    the same logits in every pattern, the same probabilities wherever there is an image."""
    raw = json.loads((HAM / "7" / "manifest.json").read_text())
    calibration = raw["calibration"]
    assert calibration["recalibrated_from"] == "ham10000/2"
    assert calibration["fitted_on"] == {
        "all": "val", "image_only": "val", "tabular_only": "train+val", "partial": "val"
    }  # fmt: skip
    cv = calibration["cv_nll"]["tabular_only"]
    assert cv["BCTS+train"] == min(cv.values())
    for pattern in PATTERN_NAMES:
        p_src, l_src = _run(HAM / "2" / "model.onnx", pattern)
        p_dst, l_dst = _run(HAM / "7" / "model.onnx", pattern)
        assert np.array_equal(l_src[:, :7], l_dst[:, :7])
        if pattern == "tabular_only":
            assert np.abs(p_dst - p_src).max() > 0.01
        else:
            assert np.array_equal(p_src, p_dst)
