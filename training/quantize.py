"""An int8 variant of an exported model: static quantisation (QDQ) with ONNX Runtime's tooling,
calibrated on training frames, written as a new model version with ``precision: int8``.

EfficientNet-Lite was designed for integer inference (ReLU6, no squeeze-excite). What int8
runs here: the blocks' expansion convolutions, quantised per channel. Kept in float:
- the stem convolution: it sees the normalised pixels, where int8 loses the most;
- each block's projection and the head convolution (``KEEP_FLOAT``): quantising them too made
  ham10000 1.5x faster than fp32 at batch 1 but cost 1.6 points of balanced accuracy;
- the depthwise convolutions (one filter per channel: int8 costs them the most accuracy for
  the least speed): quantised, ham10000 lost 1.0 point of balanced accuracy against 0.3 with
  them in float, for 1.38x against 1.27x the fp32 speed at batch 1 (``--quantize-depthwise``
  quantises them);
- the small image-projection, fusion and head layers: cheap, and where the calibrated logits
  are formed.
Activation ranges are the 99.99th percentile of the calibration activations: plain min/max
lets a few outliers stretch the range, and cost 4 points of macro-F1 on hyperkvasir-lgi in a
first try.

    endofuse quantize models/ham10000/2 --version 3
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.manifest import load_manifest
from training import ood_embed
from training.evaluate import evenly_sampled
from training.ood_embed import OUTPUT, image_only_feeds, without_distance

# Layers left in float, by name: the backbone's stem, the projection convolution of every
# block and its head convolution (1x1 convs that narrow or widen the features: quantised,
# they cost the most accuracy of the pointwise layers), and the image projection, fusion and
# classifier head. What int8 runs: the blocks' expansion convolutions.
KEEP_FLOAT = ("_conv_stem", "_project_conv", "_conv_head", "image_proj", "fusion", "head")
PERCENTILE = 99.99


def is_depthwise(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def float_nodes(model: onnx.ModelProto, depthwise: bool = True) -> list[str]:
    """Layers left in float: those KEEP_FLOAT names, and with ``depthwise`` every depthwise
    convolution."""
    return [
        n.name
        for n in model.graph.node
        if (n.op_type in ("Conv", "Gemm", "MatMul") and any(k in n.name for k in KEEP_FLOAT))
        or (depthwise and is_depthwise(n))
    ]


def main(src: Path, version: str, calibration: int = 256, keep_depthwise: bool = True) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    manifest = load_manifest(src / "manifest.json")
    if manifest.precision != "fp32":
        raise ValueError(f"{src}: only an fp32 version can be quantised")
    dst = src.parent / version
    if dst.exists():
        raise ValueError(f"{dst} exists already")
    frames, _ = evenly_sampled(manifest, "train", calibration)
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    names = {i.name for i in onnx.load(str(src / "model.onnx")).graph.input}

    class Frames(CalibrationDataReader):
        # Image-only batches: the quantised layers are the image backbone's.
        def __init__(self) -> None:
            self.batches = iter(range(0, len(frames), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            if start is None:
                return None
            return image_only_feeds(names, frames[start : start + 16], n_fields)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # The out-of-distribution distance is refitted on the variant's own features
        # (``training.ood_embed``): quantise the graph without it.
        plain = Path(tmp) / "plain.onnx"
        onnx.save(without_distance(onnx.load(str(src / "model.onnx"))), str(plain))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        keep = float_nodes(onnx.load(str(prepared)), keep_depthwise)
        dst.mkdir(parents=True)
        quantize_static(
            str(prepared), str(dst / "model.onnx"), Frames(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=keep,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": PERCENTILE},
        )  # fmt: skip
    raw = variant_manifest(manifest.raw, dst, version, len(frames), len(keep), keep_depthwise)
    raw["quantization"]["seconds"] = round(time.perf_counter() - start, 1)
    (dst / "manifest.json").write_text(json.dumps(raw, indent=2))
    source = manifest.raw.get("ood_embedding")
    if source:  # the same layers, fitted on the variant's own features
        ood_embed.main(
            dst, [f["tensor"] for f in source.get("features", [])] or [source["feature"]]
        )
    return dst


def variant_manifest(
    source: dict[str, Any],
    dst: Path,
    version: str,
    n_frames: int,
    n_float: int,
    depthwise_float: bool = True,
) -> dict[str, Any]:
    """The source manifest, as the int8 version: its own files, no fitted decision block or
    out-of-distribution distance (both refitted on the variant's own outputs), and its
    metrics left to its evaluation."""
    drop = ("decision", "metrics", "files", "ood_embedding")
    raw = {k: v for k, v in source.items() if k not in drop}
    if "outputs" in raw:
        raw["outputs"] = [o for o in raw["outputs"] if o != OUTPUT]
    data = (dst / "model.onnx").read_bytes()
    raw.update(
        version=version,
        precision="int8",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files={"model.onnx": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        quantization={
            "source": f"{source['name']}/{source['version']}",
            "method": "ONNX Runtime static quantisation, QDQ, int8 weights per channel, uint8 "
            f"activations at the {PERCENTILE}th percentile of the calibration activations",
            "calibration": {"split": "train", "frames": n_frames},
            "kept_in_float": f"{n_float} layers: the stem convolution, "
            + ("the depthwise convolutions, " if depthwise_float else "")
            + "each block's projection convolution, the head convolution, and the image "
            "projection, fusion and classifier layers",
        },
        metrics={"see": f"docs/models/{source['name']}/{version}/"},
    )
    return raw
