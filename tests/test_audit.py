"""The capture-shift audit: its changes are deterministic and leave the diagnosis region
intact, and it tells a model that reads the capture from one that reads the tissue."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.preprocess import ImageSpec, decode_image
from tests.test_geometry import coarse, encode, scope_frame
from training.audit import (
    CHANGES,
    capture_features,
    counterfactual,
    fit_softmax,
    metadata_risk,
    recapture,
)

V2 = ImageSpec(224, 224, version=2)
GEOMETRIC = [c for c in CHANGES if "box" in c or "pillar" in c or "centre" in c]
OVERLAYS = ["corner box moved to lower right", "text overlay added", "green inset box"]


def frames(n: int = 6) -> list[bytes]:
    return [
        encode(scope_frame((640, 540), (40, 10, 620, 530), overlays=False), "JPEG")
        for _ in range(n)
    ]


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("change", list(CHANGES))
def test_changes_are_deterministic(change: str) -> None:
    data = frames(1)[0]
    assert recapture(data, change, 3) == recapture(data, change, 3)


@pytest.mark.parametrize("change", OVERLAYS)
def test_overlays_leave_the_centre_untouched(change: str) -> None:
    data = frames(1)[0]
    before, after = decoded(data), decoded(recapture(data, change, 0))
    h, w = before.shape[:2]
    centre = (slice(3 * h // 10, 7 * h // 10), slice(3 * w // 10, 7 * w // 10))
    np.testing.assert_array_equal(after[centre], before[centre])
    assert not np.array_equal(after, before)  # the overlay is there


@pytest.mark.parametrize("change", [c for c in CHANGES if c not in OVERLAYS])
def test_model_input_keeps_the_field_of_view(change: str) -> None:
    """Through the version-2 preprocessing every change leaves the same tissue in view."""
    data = frames(1)[0]
    base = coarse(decode_image(data, V2))
    changed = coarse(decode_image(recapture(data, change, 0), V2))
    limit = 14.0 if "crop" in change or "light" in change else 8.0
    assert np.abs(changed - base).mean() < limit, change


def capture_reader(data_list: list[bytes]) -> np.ndarray:
    """A 'model' that reads the frame's aspect ratio: what the audit must expose."""
    out = []
    for data in data_list:
        with Image.open(io.BytesIO(data)) as image:
            wide = image.width / image.height > 1.25
        out.append([0.9, 0.1] if wide else [0.1, 0.9])
    return np.array(out)


def tissue_reader(data_list: list[bytes]) -> np.ndarray:
    """A 'model' that reads the centre of the field of view only."""
    out = []
    for data in data_list:
        centre = decode_image(data, V2)[80:144, 80:144].astype(float)
        redness = centre[..., 0].mean() - centre[..., 2].mean()
        out.append([0.9, 0.1] if redness > 40 else [0.1, 0.9])
    return np.array(out)


def test_audit_tells_a_capture_reader_from_a_tissue_reader() -> None:
    data = frames(4)
    labels = np.array([1, 1, 1, 1])
    capture = counterfactual(data, labels, ("a", "b"), capture_reader)
    tissue = counterfactual(data, labels, ("a", "b"), tissue_reader)
    assert capture["changes"]["letterbox 1920x1080 (16:9)"]["flip_rate"] == 1.0
    for change in GEOMETRIC + OVERLAYS:
        assert tissue["changes"][change]["flip_rate"] == 0.0, change
    assert capture["worst_flip_rate"] > tissue["worst_flip_rate"]


def test_metadata_classifier_learns_what_separates() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 1] > 0).astype(int)
    predict = fit_softmax(x[:150], y[:150], 2)
    assert (predict(x[150:]).argmax(1) == y[150:]).mean() > 0.95


def test_capture_features_fixed_length_and_finite() -> None:
    big = capture_features(scope_frame((640, 540), (40, 10, 620, 530)))
    tiny = capture_features(Image.new("RGB", (3, 2)))
    grey = capture_features(scope_frame((640, 540), (40, 10, 620, 530)).convert("L"))
    assert big.shape == tiny.shape == grey.shape
    assert np.isfinite(big).all() and np.isfinite(tiny).all() and np.isfinite(grey).all()


def test_metadata_risk_on_real_frames(fullres_frames: list[Path]) -> None:
    """On the real frames, capture metadata alone beats the majority class on the raw frame
    (the risk the data holds) and the report has both places measured."""
    classes = sorted({p.parent.name for p in fullres_frames})
    labels = np.array([classes.index(p.parent.name) for p in fullres_frames])
    train = [i for i in range(len(fullres_frames)) if i % 2 == 0]
    test = [i for i in range(len(fullres_frames)) if i % 2 == 1]
    risk = metadata_risk(
        ([fullres_frames[i] for i in train], labels[train]),
        ([fullres_frames[i] for i in test], labels[test]),
        tuple(classes),
        V2,
    )
    assert set(risk) == {"majority_class_accuracy", "frame as captured", "model input"}
    assert risk["frame as captured"]["accuracy"] > risk["majority_class_accuracy"]


def test_stratified_subset_keeps_class_shares_and_is_repeatable() -> None:
    from training.data import Table
    from training.evaluate import stratified

    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    table = Table(
        paths=[Path(f"{i}.jpg") for i in range(1000)],
        labels=labels,
        tabular=np.zeros((1000, 0), np.float32),
        mask=np.zeros((1000, 0), np.float32),
    )
    sub = stratified(table, 200)
    counts = np.bincount(sub.labels, minlength=3)
    assert counts[0] == 180 and counts[1] == 18 and counts[2] == 5  # the rare class keeps 5
    assert [p.name for p in stratified(table, 200).paths] == [p.name for p in sub.paths]
    assert stratified(table, None) is table


def test_argmax_flips_recorded_beside_a_label_rule_and_reported() -> None:
    """A rule that names the rare class on weak evidence flips where the argmax does not;
    the audit counts both, and the report shows the argmax column only for such a rule."""
    from training.report import audit_lines

    def near_boundary(data_list: list[bytes]) -> np.ndarray:
        sizes = [Image.open(io.BytesIO(d)).size for d in data_list]
        return np.array([[0.85, 0.15] if w / h > 1.25 else [0.88, 0.12] for w, h in sizes])

    prior = np.array([0.87, 0.13])
    data, labels = frames(4), np.array([0, 0, 0, 0])
    rule = counterfactual(
        data, labels, ("a", "b"), near_boundary, pick=lambda p: (p / prior).argmax(1)
    )
    plain = counterfactual(data, labels, ("a", "b"), near_boundary)
    wide = rule["changes"]["letterbox 1920x1080 (16:9)"]
    assert wide["flips"] == 4 and wide["argmax_flips"] == 0
    assert "argmax_flips" not in plain["changes"]["letterbox 1920x1080 (16:9)"]

    def table(cf: dict) -> str:
        scores = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5}
        meta = {"majority_class_accuracy": 0.5, "frame as captured": scores, "model input": scores}
        results = {"model": "m/1", "split": "test", "label_rule": "balanced",
                   "patterns": {"all": {"n": 4}},
                   "audit": {"counterfactual": cf, "scored_by": "x", "metadata": meta}}  # fmt: skip
        return "\n".join(audit_lines(results, None))

    assert "| letterbox 1920x1080 (16:9) | 100.0 % (4) | 0.0 % (0) |" in table(rule)
    assert "argmax flips" not in table(plain)
