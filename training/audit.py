"""Capture-shift audit: does a model read the tissue or the capture?

(1) Risk in the data: how well capture metadata alone (frame size and shape, where the field
    of view sits, border blackness, bright marks on the border, the blanked corner box)
    predicts the label, fitted on the training split and scored on the evaluated split. High
    means the data lets a model score without looking at tissue; the same features measured
    on the model's input show how much of that the preprocessing leaves.
(2) Counterfactual test: every frame re-captured under changes that carry no diagnosis
    (other frame shapes and resolutions with black bars, mild crops, overlays moved or added,
    colour temperature, JPEG quality, a green inset box, half resolution). Per change: the
    share of frames whose predicted class flips, and macro-F1. A model that reads the mucosa
    keeps its answer.

Torch-free: the predictor is any function from encoded frames to probabilities (ONNX Runtime
on the exported graph, or HTTP to a running service).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.geometry import find_fov
from service.preprocess import ImageSpec, decode_image
from training import capture
from training.metrics import summarize

Predict = Callable[[list[bytes]], np.ndarray]
Change = Callable[[Image.Image, np.random.Generator], tuple[Image.Image, str]]


def _png(image: Image.Image) -> tuple[Image.Image, str]:
    return image, "png"


def _jpeg(quality: int) -> Change:
    return lambda im, rng: (im, f"jpeg{quality}")


# Where and how large the blanked thumbnail is that most HyperKvasir frames carry.
USUAL_BOX = (0.0, 0.67, 0.33, 1.0)


# Each change keeps the frame's diagnostic content: geometric ones keep (or barely trim) the
# whole field of view, overlays sit at the frame's edges and corners, never its centre.
CHANGES: dict[str, Change] = {
    "letterbox 768x576 (4:3)": lambda im, rng: _png(capture.letterbox(im, 768, 576)),
    "letterbox 1920x1080 (16:9)": lambda im, rng: _png(capture.letterbox(im, 1920, 1080)),
    "pillarbox 1280x1024 (5:4)": lambda im, rng: _png(capture.letterbox(im, 1280, 1024)),
    "off-centre in 1024x768": lambda im, rng: _png(
        capture.letterbox(im, 1024, 768, float(rng.choice([0.1, 0.9])), 0.5)
    ),
    "crop 90% centred": lambda im, rng: _png(capture.crop(im, 0.9, 0.9, 0.5, 0.5)),
    "crop 90% off-centre": lambda im, rng: _png(
        capture.crop(im, 0.9, 0.9, float(rng.choice([0.45, 0.55])), float(rng.choice([0.45, 0.55])))
    ),
    "corner box moved to lower right": lambda im, rng: _png(capture.box(im, (0.7, 0.7, 1.0, 1.0))),
    "corner box added lower left": lambda im, rng: _png(capture.box(im, USUAL_BOX)),
    "text overlay added": lambda im, rng: _png(
        capture.text(im, ["ID: 0417", "Sex: F  Age: 63", "12:31:07"], 0.72, 0.04, 0.035)
    ),
    "green inset box": lambda im, rng: _png(capture.green_inset(im, (0.0, 0.72, 0.25, 1.0))),
    "warmer light (+8% R, -8% B)": lambda im, rng: _png(capture.colour_temperature(im, 0.08)),
    "cooler light (-8% R, +8% B)": lambda im, rng: _png(capture.colour_temperature(im, -0.08)),
    "JPEG quality 40": _jpeg(40),
    "JPEG quality 70": _jpeg(70),
    "JPEG quality 95": _jpeg(95),
    "half resolution": lambda im, rng: _png(capture.rescale(im, 0.5)),
}


def encode(image: Image.Image, how: str) -> bytes:
    buf = io.BytesIO()
    if how == "png":
        image.save(buf, "PNG", compress_level=1)
    else:
        image.save(buf, "JPEG", quality=int(how.removeprefix("jpeg")))
    return buf.getvalue()


def recapture(data: bytes, change: str, index: int) -> bytes:
    """Frame ``data`` re-encoded under ``change``; the same (frame, change) gives the same bytes."""
    rng = np.random.default_rng([index, sorted(CHANGES).index(change)])
    with Image.open(io.BytesIO(data)) as image:
        changed, how = CHANGES[change](image.convert("RGB"), rng)
    return encode(changed, how)


def counterfactual(
    frames: list[bytes],
    labels: np.ndarray,
    names: tuple[str, ...],
    predict: Predict,
    progress: Callable[[str], None] = lambda _: None,
    pick: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per capture change: the share of frames whose named class (``pick``) changes, and the
    macro-F1 of those names; with a label rule other than the argmax, also the share whose
    argmax changes (a rule that names rare classes on weak evidence flips more easily)."""
    choose = pick if pick is not None else (lambda p: p.argmax(1))
    base = predict(frames)
    base_pred = choose(base)
    out: dict[str, Any] = {
        "n": len(frames),
        "original": {"macro_f1": summarize(base, labels, names, base_pred)["macro_f1"]},
        "changes": {},
    }
    for change in CHANGES:
        progress(change)
        probs = predict([recapture(f, change, i) for i, f in enumerate(frames)])
        pred = choose(probs)
        flipped = pred != base_pred
        row = {
            "flip_rate": float(flipped.mean()),
            "flips": int(flipped.sum()),
            "macro_f1": summarize(probs, labels, names, pred)["macro_f1"],
            "mean_abs_prob_change": float(np.abs(probs - base).sum(1).mean() / 2),
        }
        if pick is not None:
            row["argmax_flips"] = int((probs.argmax(1) != base.argmax(1)).sum())
        out["changes"][change] = row
    worst = max(out["changes"].values(), key=lambda r: r["flip_rate"])
    out["worst_flip_rate"] = worst["flip_rate"]
    out["worst_macro_f1"] = min(r["macro_f1"] for r in out["changes"].values())
    return out


# --- (1) capture metadata alone ------------------------------------------------------------


def capture_features(image: Image.Image) -> np.ndarray:
    """What a capture set-up leaves in a frame, with no look at the tissue."""
    image = image.convert("RGB")  # find_fov, like the service, works on RGB
    rgb = np.asarray(image, dtype=np.uint8)
    h, w = rgb.shape[:2]
    hi = rgb.max(axis=2)
    black = hi < 24
    left, top, right, bottom = find_fov(image)
    outside = np.ones_like(black)
    outside[top:bottom, left:right] = False

    def share(mask: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> float:
        part = mask[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
        return float(part.mean()) if part.size else 0.0

    corners = [share(black, y, y + 0.2, x, x + 0.2) for y in (0, 0.8) for x in (0, 0.8)]
    sides = [share(black, 0, 1, 0, 0.1), share(black, 0, 1, 0.9, 1)]
    sides += [share(black, 0, 0.1, 0, 1), share(black, 0.9, 1, 0, 1)]
    marks = (hi > 120) & outside
    return np.array(
        [
            w,
            h,
            w / h,
            left / w,
            top / h,
            right / w,
            bottom / h,
            (right - left) / max(bottom - top, 1),
            float(black.mean()),
            *corners,
            *sides,
            float(marks.sum()) / max(float(outside.sum()), 1.0),
            share(hi < 8, 0.67, 1.0, 0.0, 0.33),  # the blanked thumbnail's place
        ],
        np.float64,
    )


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 3000) -> Callable:
    """Multinomial logistic regression (L2, full-batch gradient descent) on standardised x."""
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    weights = np.zeros((z.shape[1], n_classes))
    bias = np.zeros(n_classes)
    onehot = np.eye(n_classes)[y]
    for _ in range(steps):
        logits = z @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = p - onehot
        weights -= 0.5 * (z.T @ grad / len(z) + 1e-3 * weights)
        bias -= 0.5 * grad.mean(0)

    def predict(x_new: np.ndarray) -> np.ndarray:
        logits = ((x_new - mean) / std) @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    return predict


def metadata_risk(
    train: tuple[list[Path], np.ndarray],
    test: tuple[list[Path], np.ndarray],
    names: tuple[str, ...],
    spec: ImageSpec,
) -> dict[str, Any]:
    """Label predicted from capture metadata alone, on raw frames and on the model's input."""
    out: dict[str, Any] = {}
    majority = np.bincount(train[1], minlength=len(names)).argmax()
    out["majority_class_accuracy"] = float((test[1] == majority).mean())
    for where, load in (
        ("frame as captured", lambda p: Image.open(p)),
        ("model input", lambda p: Image.fromarray(decode_image(p.read_bytes(), spec, 10**8))),
    ):
        x_train = np.stack([capture_features(load(p)) for p in train[0]])
        x_test = np.stack([capture_features(load(p)) for p in test[0]])
        probs = fit_softmax(x_train, train[1], len(names))(x_test)
        r = summarize(probs, test[1], names)
        out[where] = {k: r[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    return out
