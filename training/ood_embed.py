"""Out-of-distribution signals inside the graph: the Mahalanobis distance of pooled image
features to the nearest class mean (Lee et al., NeurIPS 2018) or class prototype, from one or
more layers.

The energy of the logits misses inputs that still land confidently on one class (an endoscopy
frame posted to the dermoscopy model); the backbone's features do not. Per feature layer,
class prototypes and one shared covariance (Ledoit-Wolf shrinkage: up to 1,280 dimensions
from a few thousand images) are fitted on the train split. A class is several prototypes (its
k-means centres, ``PROTOTYPES``) rather than one mean: a class such as polyp is many kinds of
lesion seen through several scopes, and one Gaussian around its mean takes the unusual kinds
for strangers. The final pooled features carry what the
classifier reads; a middle stage's (spatially averaged) features also carry texture and
colour statistics that tell one imaging modality from another, and the decision fit keeps
such a layer only where it ignores capture changes (``training.ood.fit_thresholds``), and
of those the narrowest: the image token the fusion reads (128 channels, a projection of the
pooling) costs a hundredth of the pooling's 1,280 x 1,280 matrix. The
graph gains an ``ood_distance`` output, [N] for one layer or [N, layers], and its
probabilities and logits stay exactly as they were (checked before the file is replaced).

    endofuse ood-distance models/hyperkvasir-lgi/2
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from service.manifest import load_manifest
from service.repository import files_record
from service.sessions import open_session
from training import lite
from training.evaluate import evenly_sampled

OUTPUT = "ood_distance"
# k-means centres per class. One (Lee et al.'s class mean) flagged 18 of 298 in-distribution
# hyperkvasir-lgi/2 test frames, 15 of them polyps, where its val fit allowed 5 %; 2 to 8
# centres flag 12-16, while every out-of-distribution set stays told apart. Val cannot tell
# the counts apart and the test split was seen (docs/training.md, "Several prototypes per
# class").
PROTOTYPES = 4


def mid_feature(variant: str = lite.DEFAULT) -> str:
    """A middle stage of the backbone (the output of stage 5, 112 channels at 1/16 of the
    input in Lite0, block 10): deep enough to be the model's own reading of the tissue,
    shallow enough to keep the texture and colour statistics of the imaging modality."""
    return f"/tail/blocks.{lite.stage_ends(variant)[4]}/Add_output_0"


@dataclass(frozen=True)
class LayerFit:
    """One layer's Mahalanobis parameters: class prototypes [K x P, D] (P per class; with one,
    the class means) and a precision [D, D] of the layer's features, spatially averaged in
    the graph when ``pool`` (a feature map)."""

    feature: str
    means: np.ndarray
    precision: np.ndarray
    pool: bool = False
    shrinkage: float = 0.0


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


def image_token(model: onnx.ModelProto) -> str | None:
    """The image token the fusion reads (``image_proj``'s output: pooled features projected
    to the model width, 128 channels), where the graph names it."""
    outputs = [o for n in model.graph.node if n.name.startswith("/image_proj/") for o in n.output]
    return outputs[-1] if outputs else None


def default_features(model: onnx.ModelProto, variant: str = lite.DEFAULT) -> list[str]:
    """The candidate layers: the final pooling, the middle stage and the image token, those
    the graph has (the decision fit keeps the narrowest that ignores capture changes)."""
    produced = {out for node in model.graph.node for out in node.output}
    token = image_token(model)
    mid = mid_feature(variant)
    return [
        pooled_feature(model),
        *([mid] if mid in produced else []),
        *([token] if token else []),
    ]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in names:
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def without_distance(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as it was before ``add_distances``: its nodes, constants and output removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    def ours(name: str) -> bool:
        return name == OUTPUT or name.startswith("ood/")

    keep_nodes = [n for n in g.node if not any(ours(o) for o in n.output)]
    keep_inits = [i for i in g.initializer if not ours(i.name)]
    keep_outputs = [o for o in g.output if o.name != OUTPUT]
    for field, kept in (
        (g.node, keep_nodes),
        (g.initializer, keep_inits),
        (g.output, keep_outputs),
    ):
        del field[:]
        field.extend(kept)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _distance_nodes(fit: LayerFit, prefix: str, result: str, opset: int) -> tuple[list, list]:
    """Nodes computing min_k sqrt((x - m_k)^T P (x - m_k)) into ``result`` [N]. With
    P = L L^T, that is the Euclidean distance between x L and m_k L."""
    chol = np.linalg.cholesky(fit.precision).astype(np.float32)
    white_means = (fit.means @ chol).astype(np.float32)
    inits = [
        numpy_helper.from_array(chol, f"{prefix}whiten"),
        numpy_helper.from_array(white_means[None], f"{prefix}means"),
        numpy_helper.from_array(np.array([-1, chol.shape[0]], np.int64), f"{prefix}shape"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}axis1"),
        numpy_helper.from_array(np.array([2], np.int64), f"{prefix}axis2"),
    ]

    def t(name: str) -> str:
        return prefix + name

    x, nodes = fit.feature, []
    if fit.pool:
        nodes.append(helper.make_node("GlobalAveragePool", [x], [t("pooled")]))
        x = t("pooled")
    if opset >= 18:  # axes became an input of ReduceMin in opset 18
        reduce_min = helper.make_node("ReduceMin", [t("d2"), t("axis1")], [t("min")], keepdims=0)
    else:
        reduce_min = helper.make_node("ReduceMin", [t("d2")], [t("min")], axes=[1], keepdims=0)
    nodes += [
        helper.make_node("Reshape", [x, t("shape")], [t("x")]),
        helper.make_node("MatMul", [t("x"), t("whiten")], [t("z")]),
        helper.make_node("Unsqueeze", [t("z"), t("axis1")], [t("z3")]),
        helper.make_node("Sub", [t("z3"), t("means")], [t("diff")]),
        helper.make_node("Mul", [t("diff"), t("diff")], [t("sq")]),
        helper.make_node("ReduceSum", [t("sq"), t("axis2")], [t("d2")], keepdims=0),
        reduce_min,
        helper.make_node("Sqrt", [t("min")], [result]),
    ]
    return nodes, inits


def add_distances(model: onnx.ModelProto, fits: list[LayerFit]) -> onnx.ModelProto:
    """Append output ``ood_distance``: [N] for one layer, [N, layers] for several."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, opset = out.graph, _opset(model)
    if len(fits) == 1:
        nodes, inits = _distance_nodes(fits[0], "ood/", OUTPUT, opset)
        g.initializer.extend(inits)
        g.node.extend(nodes)
        g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch"]))
        return out
    columns = []
    for i, fit in enumerate(fits):
        nodes, inits = _distance_nodes(fit, f"ood/{i}/", f"ood/{i}/distance", opset)
        g.initializer.extend(inits)
        nodes.append(
            helper.make_node("Unsqueeze", [f"ood/{i}/distance", f"ood/{i}/axis1"], [f"ood/{i}/col"])
        )
        g.node.extend(nodes)
        columns.append(f"ood/{i}/col")
    g.node.append(helper.make_node("Concat", columns, [OUTPUT], axis=1))
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", len(fits)]))
    return out


def add_distance(
    model: onnx.ModelProto, feature: str, means: np.ndarray, precision: np.ndarray
) -> onnx.ModelProto:
    """One layer's distance as output ``ood_distance`` [N]."""
    return add_distances(model, [LayerFit(feature, means, precision)])


def input_names(session: Any) -> set[str]:
    return {i.name for i in session.get_inputs()}


def image_only_feeds(names: set[str], images: np.ndarray, n_fields: int) -> dict[str, np.ndarray]:
    """Feeds for a picture posted alone to a graph with inputs ``names``: every tabular field
    missing."""
    n = len(images)
    feeds = {"image": images}
    if "tabular" in names:
        feeds["tabular"] = np.zeros((n, n_fields), np.float32)
        feeds["tabular_mask"] = np.zeros((n, n_fields), np.float32)
    if "image_mask" in names:
        feeds["image_mask"] = np.ones((n, 1), np.float32)
    return feeds


def run(session: Any, images: np.ndarray, outputs: list[str], n_fields: int) -> list[np.ndarray]:
    """Each output over ``images`` (batches of 32); a feature map comes back spatially
    averaged, as ``GlobalAveragePool`` does in the graph."""
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    names = input_names(session)
    for s in tqdm(range(0, len(images), 32), desc="features", unit="batch", leave=False):
        values = session.run(outputs, image_only_feeds(names, images[s : s + 32], n_fields))
        for part, value in zip(parts, values, strict=True):
            if value.ndim == 4:
                value = value.mean(axis=(2, 3))
            part.append(value.reshape(len(value), -1) if value.ndim > 1 else value)
    return [np.concatenate(p) for p in parts]


def _sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[N, C] squared Euclidean distances, without an [N, C, D] intermediate (D up to 1,280)."""
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None]
    return np.maximum(d2, 0.0)


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, restarts: int = 10, steps: int = 100
) -> np.ndarray:
    """``k`` centres of rows ``x`` (k-means++ seeding, Lloyd steps, the lowest within-cluster
    sum of squares of ``restarts`` tries); the same for the same rows and seed. With ``k`` no
    smaller than the number of rows, the rows themselves."""
    x = np.asarray(x, np.float64)
    if k >= len(x):
        return x.copy()
    rng = np.random.default_rng(seed)
    best, best_inertia = x[:k], np.inf
    for _ in range(restarts):
        centres = x[[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = _sq_distances(x, centres).min(1)
            centres = np.vstack([centres, x[rng.choice(len(x), p=d2 / d2.sum())]])
        for _ in range(steps):
            nearest = _sq_distances(x, centres).argmin(1)
            moved = np.stack(
                [x[nearest == j].mean(0) if (nearest == j).any() else centres[j] for j in range(k)]
            )
            done = np.allclose(moved, centres)
            centres = moved
            if done:
                break
        inertia = _sq_distances(x, centres).min(1).sum()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best


def fit_layer(
    feature: str, feats: np.ndarray, labels: np.ndarray, pool: bool, prototypes: int = 1
) -> LayerFit:
    """Per class, ``prototypes`` k-means centres (1: the class mean), and one covariance of
    each frame's offset from the nearest centre of its own class."""
    centres, owner = [], []
    for k in np.unique(labels):
        own = feats[labels == k]
        centres.append(own.mean(0, keepdims=True) if prototypes == 1 else kmeans(own, prototypes))
        owner += [k] * len(centres[-1])
    means = np.concatenate(centres)
    d2 = _sq_distances(np.asarray(feats, np.float64), means)
    d2[np.asarray(owner)[None] != labels[:, None]] = np.inf
    cov, shrink = ledoit_wolf(feats - means[d2.argmin(1)])
    return LayerFit(feature, means, np.linalg.inv(cov), pool, shrink)


def main(
    model_dir: Path,
    features: list[str] | None = None,
    fit_frames: int = 3000,
    replace: bool = False,
    prototypes: int = PROTOTYPES,
) -> dict[str, Any]:
    manifest = load_manifest(model_dir / "manifest.json")
    model = onnx.load(str(model_dir / "model.onnx"))
    if OUTPUT in {o.name for o in model.graph.output}:
        if not replace:
            raise ValueError(f"{model_dir}: the graph has an '{OUTPUT}' output already")
        model = without_distance(model)
    variant = manifest.raw.get("training", {}).get("backbone_variant", lite.DEFAULT)
    features = features or default_features(model, variant)
    images, labels = evenly_sampled(manifest, "train", fit_frames)
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    probe = open_session(with_outputs(model, features).SerializeToString())
    spatial = [
        int(np.prod(v.shape[2:])) > 1 if v.ndim == 4 else False
        for v in probe.run(features, image_only_feeds(input_names(probe), images[:1], n_fields))
    ]
    probs, logits, *feats = run(probe, images, ["probabilities", "logits", *features], n_fields)
    fits = [
        fit_layer(name, f, labels, pool, prototypes)
        for name, f, pool in zip(features, feats, spatial, strict=True)
    ]
    edited = add_distances(model, fits)
    check = open_session(edited.SerializeToString())
    p2, l2, dist = run(check, images[:64], ["probabilities", "logits", OUTPUT], n_fields)
    if not (np.array_equal(p2, probs[:64]) and np.array_equal(l2, logits[:64])):
        raise RuntimeError("the edited graph changed the probabilities or logits")
    expected = np.stack(
        [mahalanobis(f[:64], fit.means, fit.precision) for f, fit in zip(feats, fits, strict=True)],
        axis=1,
    )
    if not np.allclose(dist.reshape(len(expected), -1), expected, rtol=1e-3, atol=1e-3):
        raise RuntimeError("the graph's distance disagrees with the numpy reference")
    onnx.save(edited, str(model_dir / "model.onnx"))
    info = {
        "output": OUTPUT,
        "feature": features[0],
        "features": [layer_info(fit) for fit in fits],
        "method": (
            "Mahalanobis distance to the nearest class mean"
            if prototypes == 1
            else f"Mahalanobis distance to the nearest of {prototypes} k-means prototypes per class"
        )
        + ", shared covariance (Ledoit-Wolf), one column per feature layer",
        "prototypes_per_class": prototypes,
        "fitted_on": {"split": "train", "n": len(labels), "shrinkage": round(fits[0].shrinkage, 4)},
    }
    raw = dict(manifest.raw, ood_embedding=info)
    outputs = [o for o in manifest.raw.get("outputs", ["probabilities", "logits"]) if o != OUTPUT]
    raw["outputs"] = [*outputs, OUTPUT]
    raw["files"] = files_record(model_dir)
    (model_dir / "manifest.json").write_text(json.dumps(raw, indent=2))
    return info


def prototypes_of(embedding: dict[str, Any]) -> int:
    """Prototypes per class of a recorded fit; fits from before prototypes used the mean."""
    return int(embedding.get("prototypes_per_class", 1))


def layer_info(fit: LayerFit) -> dict[str, Any]:
    return {
        "tensor": fit.feature,
        "dims": int(fit.means.shape[1]),
        "pooled_in_graph": fit.pool,
        "shrinkage": round(fit.shrinkage, 4),
    }


def mahalanobis(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x[:, None, :] - means[None]
    return np.sqrt(np.einsum("nki,ij,nkj->nk", d, precision, d).min(1))
