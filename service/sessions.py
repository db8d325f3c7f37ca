"""Every ONNX Runtime session of the project opens here, so a graph runs the same way in
serving, evaluation, calibration and the int8 build's own measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# ONNX Runtime's WeightBiasQuantization gives int8 weights of its own to a float
# convolution that sits between a DequantizeLinear and a QuantizeLinear, which is exactly a
# layer an int8 variant keeps in float on purpose (training/quantize.py): with it on, a
# first int8 build of hyperkvasir-lgi ran 9 of its 16 float layers in int8, and the shipped
# one changes 5.7 % of its val answers. It changes nothing in an fp32 graph. (An unknown
# name is ignored, so a renamed pass would fail quietly; tests/test_quantize.py checks that
# the bundled int8 graphs run exactly their recorded layers in int8.)
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


# ONNX Runtime's CUDA provider runs float32 convolutions and matrix products in TF32 unless
# told otherwise (`use_tf32`, on by default): 10 bits of mantissa instead of 23 on Ampere and
# later GPUs. A version's decision thresholds (prediction sets, the out-of-distribution
# distance) and its self-check references were fitted on float32 answers, so a float32
# graph runs in float32 on the GPU too.
CUDA_OPTIONS = {"use_tf32": "0"}


def provider_list(providers: list[str] | None) -> list[Any]:
    """What ``InferenceSession`` is given: the names, with the CUDA provider's options."""
    return [
        (name, dict(CUDA_OPTIONS)) if name == "CUDAExecutionProvider" else name
        for name in providers or ["CPUExecutionProvider"]
    ]


def open_session(
    model: str | Path | bytes, options: Any = None, providers: list[str] | None = None
) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``model`` (a path or a serialised graph); CPU
    unless ``providers`` says otherwise."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source,
        sess_options=options,
        providers=provider_list(providers),
        disabled_optimizers=DISABLED_OPTIMIZERS,
    )
