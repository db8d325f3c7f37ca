"""Tiny real ONNX models (built with onnx.helper, no torch) and their manifests, for tests.

The image path averages each colour channel, so predictions depend on the pixels; an
all-black image makes the "poisoned" variant emit NaN, which the service must turn into a
failure of that one request only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = ["polyp", "normal-cecum", "bbps-2-3"]
FIELDS = [
    {"name": "age", "type": "numeric", "mean": 50.0, "std": 15.0, "min": 0, "max": 120},
    {"name": "sex", "type": "categorical", "categories": ["female", "male"]},
    {"name": "site", "type": "categorical", "categories": ["back", "face", "hand"]},
]


def build_model(
    height: int = 32,
    width: int = 32,
    labels: list[str] = LABELS,
    n_fields: int = 0,
    image_mask: bool = False,
    poison_black: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    k = len(labels)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, k)).astype(np.float32) / 64, "w_img"),
        numpy_helper.from_array(rng.normal(size=(k,)).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "hw_axes"),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", height, width, 3])]
    nodes = [
        helper.make_node("Cast", ["image"], ["img_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["img_f", "hw_axes"], ["img_mean"], keepdims=0),
        helper.make_node("MatMul", ["img_mean", "w_img"], ["img_logit"]),
    ]
    img_term = "img_logit"
    if image_mask:
        inputs.append(helper.make_tensor_value_info("image_mask", TensorProto.FLOAT, ["N", 1]))
        nodes.append(helper.make_node("Mul", ["img_logit", "image_mask"], ["img_masked"]))
        img_term = "img_masked"
    nodes.append(helper.make_node("Add", [img_term, "bias"], ["logit_a"]))
    last = "logit_a"
    if n_fields:
        inputs += [
            helper.make_tensor_value_info("tabular", TensorProto.FLOAT, ["N", n_fields]),
            helper.make_tensor_value_info("tabular_mask", TensorProto.FLOAT, ["N", n_fields]),
        ]
        inits += [
            numpy_helper.from_array(
                rng.normal(size=(n_fields, k)).astype(np.float32) / 50, "w_tab"
            ),
            numpy_helper.from_array(rng.normal(size=(n_fields, k)).astype(np.float32), "w_mask"),
        ]
        nodes += [
            helper.make_node("Mul", ["tabular", "tabular_mask"], ["tab_present"]),
            helper.make_node("MatMul", ["tab_present", "w_tab"], ["tab_logit"]),
            helper.make_node("MatMul", ["tabular_mask", "w_mask"], ["mask_logit"]),
            helper.make_node("Add", [last, "tab_logit"], ["logit_b"]),
            helper.make_node("Add", ["logit_b", "mask_logit"], ["logit_c"]),
        ]
        last = "logit_c"
    if poison_black:
        # 0 * log(0) = NaN for an all-black frame; 0 * finite = 0 otherwise.
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "ch_axis"))
        nodes += [
            helper.make_node("ReduceSum", ["img_mean", "ch_axis"], ["img_sum"], keepdims=1),
            helper.make_node("Log", ["img_sum"], ["img_log"]),
            helper.make_node("Mul", ["img_log", "zero"], ["poison"]),
            helper.make_node("Add", [last, "poison"], ["logit_p"]),
        ]
        last = "logit_p"
    nodes += [
        helper.make_node("Identity", [last], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k]),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_manifest(
    name: str,
    version: str,
    height: int = 32,
    width: int = 32,
    labels: list[str] = LABELS,
    fields: list[dict] | None = None,
    image_mask: bool = False,
) -> dict:
    return {
        "format_version": 1,
        "name": name,
        "version": version,
        "labels": labels,
        "image": {"height": height, "width": width, "mask_regions": []},
        "tabular": {"fields": fields, "missing_values": ["", "unknown"]} if fields else None,
        "inputs": {"image_mask": image_mask},
        "calibration": {"method": "none (test model)"},
        "metrics": {},
        "training": {"source": "tests/builders.py"},
    }


def write_model_dir(
    root: Path,
    name: str,
    version: str = "1",
    fields: list[dict] | None = None,
    image_mask: bool = False,
    poison_black: bool = False,
    size: int = 32,
    labels: list[str] = LABELS,
    seed: int = 0,
) -> Path:
    vdir = root / name / version
    vdir.mkdir(parents=True, exist_ok=True)
    model = build_model(size, size, labels, len(fields or []), image_mask, poison_black, seed=seed)
    onnx.save(model, vdir / "model.onnx")
    manifest = build_manifest(name, version, size, size, labels, fields, image_mask)
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return vdir


def build_slow_model(size: int = 256, channels: int = 32, layers: int = 4) -> onnx.ModelProto:
    """A real graph slow enough (convolutions on size x size) to build a backlog."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["x0"], perm=[0, 3, 1, 2]),
    ]
    inits = []
    prev, prev_c = "x0", 3
    for layer in range(layers):
        w = rng.normal(size=(channels, prev_c, 3, 3)).astype(np.float32) * 0.01
        inits.append(numpy_helper.from_array(w, f"w{layer}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{layer}"], [f"x{layer + 1}"], pads=[1] * 4))
        prev, prev_c = f"x{layer + 1}", channels
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    inits.append(numpy_helper.from_array(rng.normal(size=(channels, 3)).astype(np.float32), "fc"))
    nodes += [
        helper.make_node("ReduceMean", [prev, "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "fc"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def write_slow_model_dir(root: Path, name: str, version: str = "1", size: int = 256) -> Path:
    vdir = root / name / version
    vdir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_slow_model(size), vdir / "model.onnx")
    manifest = build_manifest(name, version, size, size)
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return vdir
