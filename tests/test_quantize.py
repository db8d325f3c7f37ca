"""The int8 variant's graph work: SAME padding folded into the convolutions without changing
a value, and the rule that keeps a layer in float by what it costs, measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="quantisation needs the 'train' extra")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from service.sessions import open_session  # noqa: E402
from training.fold_pads import fold_pads  # noqa: E402
from training.quantize import (  # noqa: E402
    CALIBRATION_BATCH,
    CalibrationBatches,
    backbone_convs,
    keep_until,
    kl_to,
    outside_backbone,
    sensitivity,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


def _padded_convs() -> onnx.ModelProto:
    """x -> Pad(asymmetric, zeros) -> strided Conv; x -> Pad(value 1) -> Conv (not foldable:
    not zeros); x -> Pad(zeros) -> two Convs (not foldable: two users)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    inits = [
        w,
        numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "p_same"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p_one"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "p_same"], ["a"], name="pad_same"),
        helper.make_node("Conv", ["a", "w"], ["y1"], name="conv_same", strides=[2, 2]),
        helper.make_node("Pad", ["x", "p_one", "one"], ["b"], name="pad_ones"),
        helper.make_node("Conv", ["b", "w"], ["y2"], name="conv_ones"),
        helper.make_node("Pad", ["x", "p_one"], ["c"], name="pad_shared"),
        helper.make_node("Conv", ["c", "w"], ["y3"], name="conv_shared_a", pads=[1, 0, 1, 0]),
        helper.make_node("Conv", ["c", "w"], ["y4"], name="conv_shared_b"),
    ]
    outputs = [
        helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, None, None])
        for y in ("y1", "y2", "y3", "y4")
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 11])
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_pads_folds_only_zero_spatial_pads_into_a_sole_conv_and_changes_no_value() -> None:
    model = _padded_convs()
    x = {"x": np.random.default_rng(1).normal(size=(1, 3, 9, 11)).astype(np.float32)}
    before = {y: _run(model, x, y) for y in ("y1", "y2", "y3", "y4")}
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_pads(folded) == 1
    onnx.checker.check_model(folded)
    ops = [n.name for n in folded.graph.node]
    assert "pad_same" not in ops and {"pad_ones", "pad_shared"} <= set(ops)
    conv = next(n for n in folded.graph.node if n.name == "conv_same")
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[0, 1, 1, 2]]
    assert "p_same" not in {i.name for i in folded.graph.initializer}  # no dangling constant
    for y, value in before.items():
        np.testing.assert_array_equal(_run(folded, x, y), value)


def test_fold_pads_on_a_bundled_backbone_gives_the_same_probabilities(tmp_path: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # As ``training.quantize.main`` does: the pad amounts are constants once pre-processed.
    path = tmp_path / "prepared.onnx"
    quant_pre_process(
        str(MODELS / "hyperkvasir-lgi" / "2" / "model.onnx"), str(path), skip_symbolic_shape=True
    )
    model = onnx.load(str(path))
    folded = onnx.load(str(path))
    assert fold_pads(folded) == 17  # the stem and the 16 depthwise convolutions
    assert not [n for n in folded.graph.node if n.op_type == "Pad"]
    assert len(backbone_convs(folded)) == 49  # stem, 16 blocks' convolutions, head
    assert all(not n.startswith("/tail/") for n in outside_backbone(folded))
    image = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        _run(folded, {"image": image}, "logits"), _run(model, {"image": image}, "logits"), atol=1e-5
    )


def test_layers_go_back_to_float_costliest_first_until_the_divergence_reaches_the_target() -> None:
    # How far int8 is from fp32 with these layers in float (not additive, as measured).
    measured = {
        (): 1.0, ("block0.project",): 0.1, ("block1.expand",): 0.97, ("block9.dw",): 0.99,
        ("block0.project", "block1.expand"): 0.004,
        ("block0.project", "block1.expand", "block9.dw"): 0.003,
    }  # fmt: skip
    tried = []

    def divergence(keep: list[str]) -> float:
        tried.append(tuple(keep))
        return measured[tuple(keep)]

    whole, gains = sensitivity(["block9.dw", "block0.project", "block1.expand"], divergence)
    assert whole == 1.0 and gains["block0.project"] == pytest.approx(0.9)
    tried.clear()
    keep, reached = keep_until(whole, gains, divergence, target=0.005)
    assert keep == ["block0.project", "block1.expand"] and reached == 0.004
    assert tried == [("block0.project",), ("block0.project", "block1.expand")]
    assert keep_until(whole, gains, divergence, target=0.2)[0] == ["block0.project"]
    assert keep_until(whole, gains, divergence, target=0.001, limit=1)[0] == ["block0.project"]
    assert keep_until(0.004, gains, divergence, target=0.005) == ([], 0.004)  # int8 as it is


def test_kl_to_is_zero_for_the_same_probabilities_and_grows_with_the_shift() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    assert kl_to(p, p) == pytest.approx(0.0, abs=1e-7)
    assert 0 < kl_to(p, q) < kl_to(p, q[:, ::-1])


@pytest.mark.parametrize("name, version", [("hyperkvasir-lgi", "4"), ("ham10000", "6")])
def test_shipped_int8_variant_runs_its_backbone_in_int8(
    name: str, version: str, tmp_path: Path
) -> None:
    """After ONNX Runtime's graph optimisation, every backbone convolution not recorded as
    kept in float runs as an int8 ``QLinearConv``, and no ``Pad`` is left between them."""
    import json

    model_dir = MODELS / name / version
    quant = json.loads((model_dir / "manifest.json").read_text())["quantization"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    open_session(model_dir / "model.onnx", options)  # as every session of the project opens
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == quant["layers"] - len(quant["kept_in_float"])
    assert "Pad" not in ops


def test_calibration_batches_step_one_batch_at_a_time() -> None:
    """What ``quantize_static`` needs to step the calibrator: ``len`` batches, and a range of
    them read through ``get_next`` until ``None``; image-only feeds."""
    frames = np.zeros((2 * CALIBRATION_BATCH + 5, 3, 8, 8), np.float32)
    reader = CalibrationBatches(frames, {"image", "tabular", "tabular_mask"}, 3)
    assert len(reader) == 3

    def drain() -> list[int]:
        sizes = []
        while (feeds := reader.get_next()) is not None:
            assert not feeds["tabular_mask"].any()  # every field missing
            sizes.append(len(feeds["image"]))
        return sizes

    assert drain() == [CALIBRATION_BATCH, CALIBRATION_BATCH, 5]
    reader.set_range(2, 3)
    assert drain() == [5]
    reader.set_range(0, 1)
    assert drain() == [CALIBRATION_BATCH]


def test_quantize_writes_a_servable_int8_version(tmp_path: Path) -> None:
    """``endofuse quantize`` end to end on a bundled model (32 calibration frames, no probe,
    nearest rounding, no decision block):
    a new version whose whole backbone runs in int8, its out-of-distribution distance refitted,
    answering as the fp32 model on val frames; built out of the repository's sight, and not
    over a version that exists."""
    import json
    import shutil

    from service.manifest import load_manifest
    from service.repository import discover
    from tests.conftest import require_data
    from training import quantize
    from training.evaluate import evenly_sampled

    require_data("hyperkvasir-lgi")
    src = tmp_path / "hyperkvasir-lgi" / "2"
    shutil.copytree(MODELS / "hyperkvasir-lgi" / "2", src)
    fit_distance, listed = quantize.ood_embed.main, []

    def fit_and_look(model_dir: Path, *args: object, **kwargs: object) -> object:
        # Late in the build: what a service watching the repository would find now.
        listed.append([v for _, v, _ in discover(tmp_path)])
        return fit_distance(model_dir, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize.ood_embed, "main", fit_and_look)
        out = quantize.main(src, "9", calibration=32, probe=0, rounding_frames=0, decide=False)
    assert listed == [["2"]], "the version was visible before it was complete"
    assert sorted(p.name for p in src.parent.iterdir()) == ["2", "9"]  # nothing left aside
    with pytest.raises(FileExistsError, match="exists already"):
        quantize.main(src, "9", calibration=32, probe=0)

    raw = json.loads((out / "manifest.json").read_text())
    assert raw["precision"] == "int8" and raw["quantization"]["calibration"]["frames"] == 32
    assert raw["quantization"]["kept_in_float"] == {}
    assert raw["quantization"]["rounding"] == {"method": "nearest"}  # tests/test_rounding.py
    fitted = json.loads((src / "manifest.json").read_text())["ood_embedding"]
    assert raw["ood_embedding"] != fitted  # refitted on the variant's own features,
    # with the source's prototypes per class
    assert raw["ood_embedding"].get("prototypes_per_class", 1) == fitted.get(
        "prototypes_per_class", 1
    )
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    open_session(out / "model.onnx", options)
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == raw["quantization"]["layers"]

    frames, _ = evenly_sampled(load_manifest(src / "manifest.json"), "val", 32)
    fp32 = quantize._probabilities(src / "model.onnx", frames, 0)
    int8 = quantize._probabilities(out / "model.onnx", frames, 0)
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.9
    assert kl_to(fp32, int8) < 0.1


def test_quantize_refuses_float_layers_the_backbone_does_not_have(tmp_path: Path) -> None:
    """A layer named to stay in float must be one of the backbone's convolutions: refused
    before any frame is read, nothing written."""
    import shutil

    from training import quantize

    src = tmp_path / "hyperkvasir-lgi" / "2"
    shutil.copytree(MODELS / "hyperkvasir-lgi" / "2", src)
    with pytest.raises(ValueError, match="/head/Gemm"):
        quantize.main(src, "9", keep_in_float=["/tail/_conv_stem/Conv", "/head/Gemm"])
    assert not (src.parent / "9").exists()
