"""An int8 variant of an exported model: static quantisation (QDQ) with ONNX Runtime's tooling,
calibrated on training frames, written as a new model version with ``precision: int8``.

EfficientNet-Lite was designed for integer inference (ReLU6, no squeeze-excite). Three things
decide whether int8 is faster here, each measured (docs/training.md, "int8 variants"):

- **The whole backbone stays in int8.** Every float island costs a DequantizeLinear and a
  QuantizeLinear over the activations around it, and the expanded activations are the
  largest tensors of the network. So the ReLU6 clips and the residual adds are quantised with
  the convolutions (ONNX Runtime then drops the clips into the convolutions' output ranges and
  runs the adds as ``QLinearAdd``), and the explicit ``Pad`` of the TF-style SAME padding is
  folded into each convolution's own ``pads`` (``fold_pads``: exact, the same zeros), since a
  float ``Pad`` between two int8 convolutions kept a DQ/Q pair around every depthwise layer.
- **Layers are kept in float by measurement, not by kind.** Quantising a layer costs accuracy
  very unevenly: keeping one of the 49 convolutions (block 0's projection) in float removes
  81 % (hyperkvasir-lgi/2) and 78 % (ham10000/2) of the int8 model's divergence from fp32.
  ``sensitivity`` quantises the whole backbone, then each convolution alone is left in float
  and the divergence (KL of the probabilities against fp32) on probe frames is re-measured.
  Then layers go back to float, the costliest first, until the divergence is at most
  ``TARGET_KL`` (``keep_until``).
- **Rounding learned, biases corrected** (``training.rounding``): with the float layers chosen,
  each int8 convolution's weights are rounded up or down to fit the fp32 layer's output, and
  the mean error left goes into its bias; on ham10000/2 that more than halves the KL left.
- **7-bit weights, for a graph that does not depend on VNNI** (``weight_bits=7``, ONNX
  Runtime's ``reduce_range``): without VNNI, ONNX Runtime's int8 kernels add each pair of
  uint8 x int8 products in 16 bits, which saturates past 32,767; VNNI adds in 32 bits. So an
  8-bit variant answers differently on the two kinds of CPU, and its self-check record holds
  on one only. With weights within ±64 no pair can reach the limit (2 x 255 x 64 = 32,640),
  so the sums are exact on both (measured on an AVX2 CPU only: docs/training.md).
- **Ranges at the 99.99th percentile** of the calibration activations: plain min/max lets a
  few outliers stretch the range, and cost 4 points of macro-F1 on hyperkvasir-lgi in a first
  try.

The probe frames are val frames, and no label is used: the measure is how far int8 moves
the probabilities, not accuracy (training frames, which the model fits closely, understate
it: on hyperkvasir-lgi/2 a rule measured on them cost 1.4 points of val macro-F1). The
layers outside the image backbone (tabular branch, image projection, fusion, head) stay in
float: they are cheap, and where the calibrated logits are formed.

    endofuse quantize models/ham10000/2 --version 6
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from service.manifest import load_manifest
from service.repository import files_record, refuse_existing, staged_version
from service.sessions import DISABLED_OPTIMIZERS, open_session
from training import conformal, ood_embed, rounding
from training.evaluate import evenly_sampled
from training.fold_pads import fold_pads
from training.ood_embed import OUTPUT, image_only_feeds, without_distance

BACKBONE = "/tail/"  # the exported image backbone's node names (training.model's ``tail``)
QUANTISED_OPS = ("Conv", "Clip", "Add")
TARGET_KL = 0.005  # nats, mean over the probe frames
MAX_FLOAT = 16
PERCENTILE = 99.99
CALIBRATION_BATCH = 16
ROUNDING_FRAMES = 64
WEIGHT_LIMIT = {8: 127, 7: 64}  # ONNX Runtime's symmetric int8 range, and its reduce_range
# For whoever runs the graph outside endofuse (service/sessions.py does this for every session).
RUNTIME_NOTE = (
    f"open with ONNX Runtime's {', '.join(DISABLED_OPTIMIZERS)} pass disabled "
    "(InferenceSession(..., disabled_optimizers=[...])): with it on, ONNX Runtime gives the "
    "layers kept in float int8 weights of its own, and the variant "
    "loses accuracy (hyperkvasir-lgi/4: 5.7 % of val answers changed)"
)


def backbone_convs(model: onnx.ModelProto) -> list[str]:
    """The image backbone's convolutions, the candidates for int8."""
    nodes = model.graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv" and n.name.startswith(BACKBONE)]
    if not convs:
        raise ValueError(f"no convolution named {BACKBONE}* in the graph: not an image backbone")
    return convs


def outside_backbone(model: onnx.ModelProto) -> list[str]:
    """Nodes of a quantised op type outside the image backbone: they stay in float."""
    return [
        n.name
        for n in model.graph.node
        if n.op_type in (*QUANTISED_OPS, "MatMul", "Gemm") and not n.name.startswith(BACKBONE)
    ]


def kl_to(reference: np.ndarray, probs: np.ndarray) -> float:
    """Mean KL(reference || probs) over rows: how far int8 moved the probabilities."""
    eps = 1e-9
    return float(np.mean(np.sum(reference * (np.log(reference + eps) - np.log(probs + eps)), 1)))


def sensitivity(
    candidates: list[str], divergence: Callable[[list[str]], float]
) -> tuple[float, dict[str, float]]:
    """The whole backbone's divergence in int8 and, per candidate, how much of it keeping that
    layer alone in float removes (``divergence(kept_in_float)`` quantises and measures)."""
    whole = divergence([])
    gains = {}
    for name in tqdm(candidates, desc="sensitivity", unit="layer"):
        gains[name] = whole - divergence([name])
    return whole, gains


def keep_until(
    whole: float,
    gains: dict[str, float],
    divergence: Callable[[list[str]], float],
    target: float = TARGET_KL,
    limit: int = MAX_FLOAT,
) -> tuple[list[str], float]:
    """Layers kept in float, the largest gain first, until ``divergence`` of the set is at
    most ``target`` (or ``limit`` layers are float); the set and its divergence."""
    ranked = sorted(gains, key=lambda name: -gains[name])[:limit]
    keep: list[str] = []
    reached = whole
    for name in ranked:
        if reached <= target:
            break
        keep.append(name)
        reached = divergence(keep)
    return keep, reached


class CalibrationBatches:
    """Image-only batches of calibration frames (the quantised layers are the image
    backbone's), as ONNX Runtime's calibration reads them: ``get_next`` until ``None``.

    ``__len__`` and ``set_range`` let ``quantize_static`` step the calibrator one batch at a
    time (``CalibStridedMinMax``, which works for every calibrator; the percentile histograms
    merge across steps), so it holds one batch's activations instead of every frame's
    (hyperkvasir-lgi/2 at 256 frames: 1.3 GB resident at the peak instead of 16.4 GB).
    """

    def __init__(self, frames: np.ndarray, names: set[str], n_fields: int) -> None:
        self.frames, self.names, self.n_fields = frames, names, n_fields
        self.starts = list(range(0, len(frames), CALIBRATION_BATCH))
        self.set_range(0, len(self.starts))

    def __len__(self) -> int:
        return len(self.starts)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches = iter(self.starts[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self.batches, None)
        if start is None:
            return None
        batch = self.frames[start : start + CALIBRATION_BATCH]
        return image_only_feeds(self.names, batch, self.n_fields)


def static(
    src: Path,
    out: Path,
    batches: CalibrationBatches,
    exclude: list[str],
    cache: Path | None = None,
    weight_bits: int = 8,
) -> None:
    """ONNX Runtime's static quantisation of ``src`` into ``out`` as every variant is built:
    QDQ, int8 weights per channel, uint8 activations at the ``PERCENTILE``th percentile of
    ``batches``, the ``exclude``d nodes left in float (``cache``: where the ranges are kept),
    weights within ±``WEIGHT_LIMIT[weight_bits]``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(out), batches,
        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=weight_bits == 7,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=exclude,
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1},
        calibration_cache_path=None if cache is None else str(cache),
    )  # fmt: skip


def main(
    src: Path,
    version: str,
    calibration: int = 256,
    probe: int = 256,
    target: float = TARGET_KL,
    rounding_frames: int = ROUNDING_FRAMES,
    keep_in_float: list[str] | None = None,
    decide: bool = True,
    weight_bits: int = 8,
) -> Path:
    """Write ``src``'s int8 variant as version ``version`` beside it: ranges from
    ``calibration`` training frames, the layers kept in float chosen on ``probe`` val frames
    (0: none measured, the whole backbone in int8), the int8 weights' rounding learned and
    the biases corrected on ``rounding_frames`` of the calibration frames (0: nearest
    rounding), its out-of-distribution distance refitted and its decision parameters fitted
    on its own outputs (``decide``; else it has none until ``endofuse decision``); returns
    its directory, which appears only once complete.
    ``keep_in_float`` names the layers kept in float instead of measuring them (another
    variant's choice, so that two variants differ only where the comparison is meant to).
    ``weight_bits``: 8, or 7 for a variant whose integer sums cannot saturate without VNNI."""
    if weight_bits not in WEIGHT_LIMIT:
        raise ValueError(f"weight bits: {' or '.join(map(str, WEIGHT_LIMIT))}, not {weight_bits}")
    manifest = load_manifest(src / "manifest.json")
    if manifest.precision != "fp32":
        raise ValueError(f"{src}: only an fp32 version can be quantised")
    dst = src.parent / version
    refuse_existing(dst)
    source = onnx.load(str(src / "model.onnx"))
    unknown = sorted(set(keep_in_float or ()) - set(backbone_convs(source)))
    if unknown:
        raise ValueError(f"not convolutions of the image backbone: {', '.join(unknown)}")
    frames, _ = evenly_sampled(manifest, "train", calibration)
    probe_frames = evenly_sampled(manifest, "val", probe)[0] if probe else frames[:0]

    start = time.perf_counter()
    with staged_version(dst) as out, tempfile.TemporaryDirectory() as tmp:
        report = _build(source, manifest, out, Path(tmp), frames, probe_frames, target,
                        rounding_frames, keep_in_float, weight_bits)  # fmt: skip
        raw = variant_manifest(manifest.raw, out, version, len(frames), report)
        raw["quantization"]["seconds"] = round(time.perf_counter() - start, 1)
        (out / "manifest.json").write_text(json.dumps(raw, indent=2))
        fitted = manifest.raw.get("ood_embedding")
        if fitted:  # the same layers, fitted on the variant's own features
            ood_embed.main(
                out,
                [f["tensor"] for f in fitted.get("features", [])] or [fitted["feature"]],
                prototypes=ood_embed.prototypes_of(fitted),
            )
        if decide:  # the sets and the flag, on the variant's own outputs
            conformal.main(out)
    return dst


def _build(
    source: onnx.ModelProto,
    manifest: Any,
    out: Path,
    tmp: Path,
    frames: np.ndarray,
    probe_frames: np.ndarray,
    target: float,
    rounding_frames: int,
    keep_in_float: list[str] | None,
    weight_bits: int,
) -> dict[str, Any]:
    """Write the int8 graph to ``out / model.onnx``; returns the manifest's record of it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    probe = len(probe_frames) > 0
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    names = {i.name for i in source.graph.input}
    # The out-of-distribution distance is refitted on the variant's own features
    # (``training.ood_embed``): quantise the graph without it.
    plain = tmp / "plain.onnx"
    onnx.save(without_distance(source), str(plain))
    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    n_folded = fold_pads(graph)
    onnx.save(graph, str(prepared))
    candidates, outside = backbone_convs(graph), outside_backbone(graph)

    def quantise(keep: list[str], path: Path) -> Path:
        batches = CalibrationBatches(frames, names, n_fields)
        static(prepared, path, batches, keep + outside, tmp / "ranges.json", weight_bits)
        return path

    reference = _probabilities(plain, probe_frames, n_fields) if probe else None

    def divergence(keep: list[str]) -> float:
        trial = quantise(keep, tmp / "trial.onnx")
        return kl_to(reference, _probabilities(trial, probe_frames, n_fields))

    if keep_in_float is not None:
        keep, whole = list(keep_in_float), divergence([]) if probe else 0.0
        gains = {name: float("nan") for name in keep}
        nearest = divergence(keep) if probe else 0.0
    else:  # without probe frames: the whole backbone in int8, unmeasured
        whole, gains = sensitivity(candidates, divergence) if probe else (0.0, {})
        keep, nearest = keep_until(whole, gains, divergence, target) if probe else ([], 0.0)
    quantise(keep, out / "model.onnx")
    adjusted = None
    if rounding_frames:
        model = onnx.load(str(out / "model.onnx"))
        adjusted = rounding.adjust(
            model, graph, frames[:rounding_frames], n_fields, limit=WEIGHT_LIMIT[weight_bits]
        )
        onnx.save(model, str(out / "model.onnx"))
    probs = _probabilities(out / "model.onnx", probe_frames, n_fields) if probe else None
    return {
        "layers": len(candidates),
        "pads_folded": n_folded,
        "probe": {"split": "val", "frames": len(probe_frames), "labels_used": False},
        "target_kl": target,
        "kl_to_fp32": None
        if probs is None
        else {
            "whole_backbone_int8": round(whole, 6),
            "nearest_rounding": round(nearest, 6),
            "shipped": round(kl_to(reference, probs), 6),
        },
        "label_changes": None
        if probs is None
        else round(float(np.mean(probs.argmax(1) != reference.argmax(1))), 4),
        # each layer kept in float: the share of the whole backbone's KL it removes alone
        "kept_in_float": {
            name: None if np.isnan(gains[name]) else round(gains[name] / whole, 4) for name in keep
        },
        "kept_in_float_chosen": "given" if keep_in_float is not None else "measured",
        "rounding": adjusted or {"method": "nearest"},
        "weight_bits": weight_bits,
    }


def _probabilities(path: Path, images: np.ndarray, n_fields: int) -> np.ndarray:
    return ood_embed.run(open_session(path), images, ["probabilities"], n_fields)[0]


def variant_manifest(
    source: dict[str, Any],
    dst: Path,
    version: str,
    n_frames: int,
    report: dict[str, Any],
) -> dict[str, Any]:
    """The source manifest, as the int8 version: its own files, no fitted decision block or
    out-of-distribution distance (both refitted on the variant's own outputs), its metrics
    left to its evaluation, and ``report`` (what ``main`` measured) in its quantisation block."""
    drop = ("decision", "metrics", "files", "ood_embedding")
    raw = {k: v for k, v in source.items() if k not in drop}
    if "outputs" in raw:
        raw["outputs"] = [o for o in raw["outputs"] if o != OUTPUT]
    raw.update(
        version=version,
        precision="int8",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=files_record(dst),
        quantization={
            "source": f"{source['name']}/{source['version']}",
            "method": "ONNX Runtime static quantisation, QDQ: the image backbone's convolutions, "
            "ReLU6 clips and residual adds, int8 weights per channel, uint8 activations at the "
            f"{PERCENTILE}th percentile of the calibration activations; SAME padding folded "
            "into the convolutions; layers put back in float, those whose float alone removes "
            "the most of the whole backbone's KL to fp32 on the probe frames first, until the "
            "KL is at most the target; then each int8 convolution's rounding learned and its "
            "bias corrected (the rounding block)",
            "calibration": {"split": "train", "frames": n_frames},
            **report,
            "runtime": RUNTIME_NOTE,
        },
        metrics={"see": f"docs/models/{source['name']}/{version}/"},
    )
    return raw
