"""Learned rounding and bias correction of an int8 graph (training.rounding), on a small
three-convolution network quantised as ``endofuse quantize`` quantises a backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="quantisation needs the 'train' extra")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from service.sessions import open_session  # noqa: E402
from training import rounding  # noqa: E402
from training.quantize import WEIGHT_LIMIT, CalibrationBatches, static  # noqa: E402


def _network() -> onnx.ModelProto:
    """uint8 NHWC image -> [-1, 1] -> strided conv (pads unequal on the two sides, as folded
    SAME padding leaves them) -> ReLU6 -> depthwise conv -> ReLU6 -> 1x1 conv -> y."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        value = rng.normal(size=shape) * scale
        if len(shape) == 4:  # one large weight per channel sets a coarse scale, as folded
            value[:, 0, 0, 0] *= 10  # batch norms leave in some channels: rounding matters
        return numpy_helper.from_array(value.astype(np.float32), name)

    inits = [
        init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 1, 3, 3), init("b2", 8),
        init("w3", 4, 8, 1, 1), init("b3", 4),
        numpy_helper.from_array(np.array(127.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["t", "half"], ["d"]),
        helper.make_node("Sub", ["d", "one"], ["x"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/tail/c1", strides=[2, 2],
                         pads=[0, 0, 1, 1]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="/tail/r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="/tail/c2", group=8,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="/tail/r2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="/tail/c3"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [None, 16, 20, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _frames(n: int, seed: int) -> np.ndarray:
    """Smooth random pictures: 4x5 noise blown up to 16x20, so neighbouring pixels agree."""
    coarse = np.random.default_rng(seed).integers(0, 256, (n, 4, 5, 3))
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)


def _quantised(model: onnx.ModelProto, frames: np.ndarray, tmp_path: Path) -> onnx.ModelProto:
    src, out = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(src))
    static(src, out, CalibrationBatches(frames, {"image"}, 0), [])
    return onnx.load(str(out))


def _y(model: onnx.ModelProto, frames: np.ndarray) -> np.ndarray:
    return open_session(model.SerializeToString()).run(["y"], {"image": frames})[0]


def test_conv_matches_onnx_runtime_with_unequal_pads_and_groups() -> None:
    model = _network()
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    for name in ("x", "c1", "r1", "c2"):
        tapped.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    x, c1, r1, c2 = open_session(tapped.SerializeToString()).run(
        ["x", "c1", "r1", "c2"], {"image": _frames(2, 0)}
    )
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i)) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for inp, out, node, b in ((x, c1, "/tail/c1", "b1"), (r1, c2, "/tail/c2", "b2")):
        w = weights["w1" if node == "/tail/c1" else "w2"]
        ours = rounding.conv(torch.from_numpy(inp), w, nodes[node]) + weights[b].reshape(
            1, -1, 1, 1
        )
        np.testing.assert_allclose(ours.numpy(), out, atol=1e-5)


def test_learned_rounding_and_bias_correction_bring_int8_closer_to_fp32(tmp_path: Path) -> None:
    """On frames the adjustment never saw, the int8 graph's output comes closer to fp32's;
    only weight values and biases change: the same ops, scales and zero points, weights within
    the symmetric int8 range."""
    fp32, calibration, held_out = _network(), _frames(64, 1), _frames(64, 2)
    nearest = _quantised(fp32, calibration, tmp_path)
    adjusted = onnx.ModelProto()
    adjusted.CopyFrom(nearest)
    report = rounding.adjust(adjusted, fp32, calibration, 0, iterations=300)

    reference = _y(fp32, held_out)
    error_nearest = np.mean((_y(nearest, held_out) - reference) ** 2)
    error_adjusted = np.mean((_y(adjusted, held_out) - reference) ** 2)
    assert error_adjusted < 0.8 * error_nearest, (error_adjusted, error_nearest)
    assert report["layers"] == 3
    assert report["output_error"]["adjusted"] < report["output_error"]["nearest"]

    assert [n.op_type for n in adjusted.graph.node] == [n.op_type for n in nearest.graph.node]
    before = {i.name: numpy_helper.to_array(i) for i in nearest.graph.initializer}
    changed = {}
    for init in adjusted.graph.initializer:
        value = numpy_helper.to_array(init)
        assert value.dtype == before[init.name].dtype
        if not np.array_equal(value, before[init.name]):
            changed[init.name] = value.dtype
    # int8 weights and int32 biases of the three convolutions; no scale or zero point
    assert set(changed.values()) == {np.dtype(np.int8), np.dtype(np.int32)}, changed
    for name, dtype in changed.items():
        if dtype == np.int8:
            assert (
                np.abs(
                    numpy_helper.to_array(
                        next(i for i in adjusted.graph.initializer if i.name == name)
                    ).astype(int)
                ).max()
                <= 127
            )


def test_seven_bit_weights_stay_within_64_and_match_the_exact_integers(tmp_path: Path) -> None:
    """``weight_bits=7``: every int8 weight within ±64, through learned rounding too (the range
    no CPU's 16-bit pair sums can overflow), the range used, and ONNX Runtime's fused int8
    kernels giving what the unfused graph (float arithmetic on the same integers) gives."""
    fp32, calibration, held_out = _network(), _frames(64, 1), _frames(64, 2)
    src, out = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(fp32, str(src))
    static(src, out, CalibrationBatches(calibration, {"image"}, 0), [], weight_bits=7)
    nearest = onnx.load(str(out))
    adjusted = onnx.ModelProto()
    adjusted.CopyFrom(nearest)
    rounding.adjust(adjusted, fp32, calibration, 0, iterations=300, limit=WEIGHT_LIMIT[7])
    for model in (nearest, adjusted):
        weights = [numpy_helper.to_array(i) for i in model.graph.initializer]
        widest = max(np.abs(w.astype(int)).max() for w in weights if w.dtype == np.int8)
        assert widest == 64, widest

    reference = _y(fp32, held_out)
    assert np.mean((_y(adjusted, held_out) - reference) ** 2) < np.mean(
        (_y(nearest, held_out) - reference) ** 2
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = open_session(adjusted.SerializeToString(), options).run(["y"], {"image": held_out})[0]
    fused = _y(adjusted, held_out)
    assert np.abs(fused - unfused).mean() < 0.01 * reference.std()
