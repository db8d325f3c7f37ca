"""A second out-of-distribution signal inside the graph: the Mahalanobis distance of the pooled
image features to the nearest class mean (Lee et al., NeurIPS 2018).

The energy of the logits misses inputs that still land confidently on one class (an endoscopy
frame posted to the dermoscopy model); the backbone's features do not. Class means and one
shared covariance (Ledoit-Wolf shrinkage: 1,280 dimensions from a few thousand images) are
fitted on the train split; the graph gains an ``ood_distance`` output computed from them, and
its probabilities and logits stay exactly as they were (checked before the file is replaced).

    endofuse ood-distance models/ham10000/1
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from service.manifest import load_manifest
from training.evaluate import evenly_sampled

OUTPUT = "ood_distance"


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance of centred rows ``x`` [n, p], and the shrinkage (Ledoit & Wolf, 2004)."""
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    delta = ((s - mu * np.eye(p)) ** 2).sum() / p
    beta = ((x**2).sum(1) ** 2).sum() / n**2 - (s**2).sum() / n
    shrink = min(beta / p, delta) / delta if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(p), float(shrink)


def pooled_feature(model: onnx.ModelProto) -> str:
    """The backbone's pooled feature tensor: the first global pooling in the graph."""
    for node in model.graph.node:
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            return node.output[0]
    raise ValueError("no global pooling node: name the feature tensor explicitly")


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in names:
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def add_distance(
    model: onnx.ModelProto, feature: str, means: np.ndarray, precision: np.ndarray
) -> onnx.ModelProto:
    """Append nodes computing min_k sqrt((x - m_k)^T P (x - m_k)) as output ``ood_distance``.

    With P = L L^T, that is the Euclidean distance between x L and m_k L."""
    chol = np.linalg.cholesky(precision).astype(np.float32)
    white_means = (means @ chol).astype(np.float32)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    g.initializer.extend([
        numpy_helper.from_array(chol, "ood/whiten"),
        numpy_helper.from_array(white_means[None], "ood/means"),
        numpy_helper.from_array(np.array([-1, chol.shape[0]], np.int64), "ood/shape"),
        numpy_helper.from_array(np.array([1], np.int64), "ood/axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "ood/axis2"),
    ])  # fmt: skip
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset >= 18:  # axes became an input of ReduceMin in opset 18
        reduce_min = helper.make_node("ReduceMin", ["ood/d2", "ood/axis1"], ["ood/min"], keepdims=0)
    else:
        reduce_min = helper.make_node("ReduceMin", ["ood/d2"], ["ood/min"], axes=[1], keepdims=0)
    g.node.extend([
        helper.make_node("Reshape", [feature, "ood/shape"], ["ood/x"]),
        helper.make_node("MatMul", ["ood/x", "ood/whiten"], ["ood/z"]),
        helper.make_node("Unsqueeze", ["ood/z", "ood/axis1"], ["ood/z3"]),
        helper.make_node("Sub", ["ood/z3", "ood/means"], ["ood/diff"]),
        helper.make_node("Mul", ["ood/diff", "ood/diff"], ["ood/sq"]),
        helper.make_node("ReduceSum", ["ood/sq", "ood/axis2"], ["ood/d2"], keepdims=0),
        reduce_min,
        helper.make_node("Sqrt", ["ood/min"], [OUTPUT]),
    ])  # fmt: skip
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch"]))
    return out


def image_only_feeds(session: Any, images: np.ndarray, n_fields: int) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    n = len(images)
    feeds = {"image": images}
    if "tabular" in names:
        feeds["tabular"] = np.zeros((n, n_fields), np.float32)
        feeds["tabular_mask"] = np.zeros((n, n_fields), np.float32)
    if "image_mask" in names:
        feeds["image_mask"] = np.ones((n, 1), np.float32)
    return feeds


def run(session: Any, images: np.ndarray, outputs: list[str], n_fields: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for s in tqdm(range(0, len(images), 32), desc="features", unit="batch", leave=False):
        for part, value in zip(
            parts, session.run(outputs, image_only_feeds(session, images[s : s + 32], n_fields)),
            strict=True,
        ):  # fmt: skip
            part.append(value.reshape(len(value), -1) if value.ndim > 1 else value)
    return [np.concatenate(p) for p in parts]


def main(model_dir: Path, feature: str | None = None, fit_frames: int = 3000) -> dict[str, Any]:
    import onnxruntime as ort

    manifest = load_manifest(model_dir / "manifest.json")
    model = onnx.load(str(model_dir / "model.onnx"))
    if OUTPUT in {o.name for o in model.graph.output}:
        raise ValueError(f"{model_dir}: the graph has an '{OUTPUT}' output already")
    feature = feature or pooled_feature(model)
    images, labels = evenly_sampled(manifest, "train", fit_frames)
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    probe = ort.InferenceSession(
        with_outputs(model, [feature]).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    probs, logits, feats = run(probe, images, ["probabilities", "logits", feature], n_fields)
    classes = np.unique(labels)
    means = np.stack([feats[labels == k].mean(0) for k in classes])
    cov, shrink = ledoit_wolf(feats - means[np.searchsorted(classes, labels)])
    edited = add_distance(model, feature, means, np.linalg.inv(cov))
    check = ort.InferenceSession(edited.SerializeToString(), providers=["CPUExecutionProvider"])
    p2, l2, dist = run(check, images[:64], ["probabilities", "logits", OUTPUT], n_fields)
    if not (np.array_equal(p2, probs[:64]) and np.array_equal(l2, logits[:64])):
        raise RuntimeError("the edited graph changed the probabilities or logits")
    expected = mahalanobis(feats[:64], means, np.linalg.inv(cov))
    if not np.allclose(dist, expected, rtol=1e-3, atol=1e-3):
        raise RuntimeError("the graph's distance disagrees with the numpy reference")
    onnx.save(edited, str(model_dir / "model.onnx"))
    info = {
        "output": OUTPUT,
        "feature": feature,
        "method": "Mahalanobis distance to the nearest class mean, shared covariance (Ledoit-Wolf)",
        "fitted_on": {"split": "train", "n": len(labels), "shrinkage": round(shrink, 4)},
    }
    raw = dict(manifest.raw, ood_embedding=info)
    raw["outputs"] = [*manifest.raw.get("outputs", ["probabilities", "logits"]), OUTPUT]
    onnx_bytes = (model_dir / "model.onnx").read_bytes()
    raw["files"] = {
        "model.onnx": {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)}
    }
    (model_dir / "manifest.json").write_text(json.dumps(raw, indent=2))
    return info


def mahalanobis(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x[:, None, :] - means[None]
    return np.sqrt(np.einsum("nki,ij,nkj->nk", d, precision, d).min(1))
