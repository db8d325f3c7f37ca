"""What every peer shares with the service: the model file, its manifest, the decode."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import load_manifest
from service.preprocess import decode_image

MODEL_DIR = Path(os.environ.get("PEER_MODEL_DIR", "models/hyperkvasir-lgi/2"))
MANIFEST = load_manifest(MODEL_DIR / "manifest.json")
LABELS = list(MANIFEST.labels)


def session() -> ort.InferenceSession:
    """ONNX Runtime's defaults, except spinning: off, as the service runs it on a small CPU."""
    options = ort.SessionOptions()
    threads = int(os.environ.get("PEER_INTRA_OP_THREADS", "0"))
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(MODEL_DIR / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )


def pixels(data: bytes) -> np.ndarray:
    return decode_image(data, MANIFEST.image)


def answer(probs: np.ndarray) -> dict:
    return {
        "label": LABELS[int(probs.argmax())],
        "probabilities": {name: float(p) for name, p in zip(LABELS, probs, strict=True)},
    }
