"""Learned rounding and bias correction of an int8 graph's convolutions.

ONNX Runtime's static quantisation rounds every weight to the nearest step of its channel's
scale. On ham10000/2 that rounding alone (the fp32 graph with rounded weights, activations in
float) moved the val probabilities by 0.0015 nats of the 0.0020 the whole int8 variant moved:
the weights, not the activations, carried most of the loss. Two corrections, taken layer by
layer in graph order, each layer fed the input the int8 graph gives it (the layers before it
already corrected, so a layer also absorbs what the earlier layers and the activation ranges
add) and compared with the fp32 layer's output on the same frames:

- **Learned rounding** (AdaRound, Nagel et al., ICML 2020): each weight goes up or down, not
  to the nearest step, chosen by minimising the layer's output error. A soft rounding variable
  per weight is optimised with a regulariser that is annealed until every variable is 0 or 1.
- **Bias correction** (Nagel et al., ICCV 2019): the output error left, averaged over frames and
  positions, is added to the channel's bias, so the layer is right on average.

The scales, zero points, activation ranges and every op stay as quantised: only the int8
weight values and the int32 biases change, so the graph runs exactly as fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from tqdm import tqdm

from service.sessions import open_session
from training.ood_embed import image_only_feeds, input_names, with_outputs

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)
ROUNDING_WEIGHT = 0.01
BATCH = 8


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def conv(x: torch.Tensor, w: torch.Tensor, node: onnx.NodeProto) -> torch.Tensor:
    """ONNX ``Conv`` of ``node`` without its bias; its pads may differ on the two sides (the
    folded TF-style SAME padding of a strided layer)."""
    top, left, bottom, right = _attr(node, "pads", [0, 0, 0, 0])
    return F.conv2d(
        F.pad(x, (left, right, top, bottom)),
        w,
        stride=tuple(_attr(node, "strides", [1, 1])),
        dilation=tuple(_attr(node, "dilations", [1, 1])),
        groups=_attr(node, "group", 1),
    )


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def learned_rounding(
    x: torch.Tensor,
    target: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    node: onnx.NodeProto,
    iterations: int,
    seed: int = 0,
    limit: int = 127,
) -> torch.Tensor:
    """Integer weights (as floats, within ±``limit``) of ``w`` at per-channel ``scale``, each
    rounded up or down so that ``conv(x, scale * q)`` comes closest to ``target``."""
    scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    floor = torch.floor(w / scale)
    # Start where nearest rounding would: h(v) equals the fractional part.
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    warm = iterations // 5  # reconstruction alone first, then push every weight to 0 or 1
    for step in range(iterations):
        rows = torch.randint(0, len(x), (min(BATCH, len(x)),), generator=generator)
        out = conv(x[rows], scale * torch.clamp(floor + _soft(v), -limit, limit), node)
        loss = (out - target[rows]).pow(2).sum(dim=(1, 2, 3)).mean()
        if step >= warm:
            beta = 20 - 18 * (step - warm) / max(iterations - warm, 1)
            loss = loss + ROUNDING_WEIGHT * (1 - (2 * _soft(v) - 1).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return torch.clamp(floor + (_soft(v) >= 0.5).float(), -limit, limit)


def _values(model: onnx.ModelProto, tensors: list[str], frames: np.ndarray, n_fields: int):
    """Each of ``tensors`` over ``frames`` (image only), concatenated over batches of 16."""
    session = open_session(with_outputs(model, tensors).SerializeToString())
    names = input_names(session)
    parts = [
        session.run(tensors, image_only_feeds(names, frames[s : s + 16], n_fields))
        for s in range(0, len(frames), 16)
    ]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(tensors))]


def _int8_convs(qdq: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, Any]]:
    """(conv, its weights' DequantizeLinear, its bias's DequantizeLinear or None) of every
    convolution that runs in int8, in graph order."""
    producer = {out: n for n in qdq.graph.node for out in n.output}
    found = []
    for node in qdq.graph.node:
        weights = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if weights is None or weights.op_type != "DequantizeLinear":
            continue
        bias = producer.get(node.input[2]) if len(node.input) > 2 else None
        found.append((node, weights, bias if bias and bias.op_type == "DequantizeLinear" else None))
    return found


def adjust(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    frames: np.ndarray,
    n_fields: int,
    iterations: int = 600,
    limit: int = 127,
) -> dict[str, Any]:
    """Learned rounding and bias correction of every int8 convolution of ``qdq`` (changed in
    place) against the same-named convolutions of ``fp32`` on ``frames``, the weights kept
    within ±``limit`` (the range they were quantised to); returns the mean output error
    (relative to the fp32 output's spread) before and after, over the layers."""
    inits = {i.name: i for i in qdq.graph.initializer}
    fp32_convs = {n.name: n for n in fp32.graph.node if n.op_type == "Conv"}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    layers = _int8_convs(qdq)
    reference = _values(fp32, [fp32_convs[c.name].input[0] for c, _, _ in layers], frames, n_fields)
    before, after = [], []
    for i, (node, weights, bias) in enumerate(tqdm(layers, desc="rounding", unit="layer")):
        source = fp32_convs[node.name]
        w = torch.from_numpy(numpy_helper.to_array(fp32_inits[source.input[1]]).copy())
        with torch.no_grad():
            target = conv(torch.from_numpy(reference[i]), w, node)
        reference[i] = None  # its memory goes once the layer is done
        x = torch.from_numpy(_values(qdq, [node.input[0]], frames, n_fields)[0])
        q_init = inits[weights.input[0]]
        if len(weights.input) > 2 and np.any(numpy_helper.to_array(inits[weights.input[2]])):
            raise ValueError(f"{node.name}: int8 weights with a zero point (not symmetric)")
        scale = torch.from_numpy(numpy_helper.to_array(inits[weights.input[1]]).copy())
        nearest = torch.from_numpy(numpy_helper.to_array(q_init).astype(np.float32))
        q = learned_rounding(x, target, w, scale, node, iterations, seed=i, limit=limit)
        per_channel = scale.reshape((-1,) + (1,) * (w.dim() - 1))
        with torch.no_grad():
            spread = target.std().item() or 1.0
            plain = conv(x, per_channel * nearest, node) - target
            error = target - conv(x, per_channel * q, node)
            left = error - error.mean(dim=(0, 2, 3), keepdim=True)  # what a bias cannot take
        before.append(plain.pow(2).mean().sqrt().item() / spread)
        after.append(left.pow(2).mean().sqrt().item() / spread)
        q_init.CopyFrom(numpy_helper.from_array(q.numpy().astype(np.int8), q_init.name))
        if bias is not None:
            b_init, b_scale = inits[bias.input[0]], numpy_helper.to_array(inits[bias.input[1]])
            b = numpy_helper.to_array(fp32_inits[source.input[2]])
            corrected = np.round((b + error.mean(dim=(0, 2, 3)).numpy()) / b_scale)
            b_init.CopyFrom(numpy_helper.from_array(corrected.astype(np.int32), b_init.name))
    return {
        "method": "AdaRound, then bias correction, layer by layer in graph order, each layer "
        "fed the int8 graph's own input and compared with the fp32 layer's output",
        "frames": len(frames),
        "iterations": iterations,
        "layers": len(layers),
        "output_error": {
            "nearest": round(float(np.mean(before)), 5),
            "adjusted": round(float(np.mean(after)), 5),
            "unit": "root-mean-square error of a layer's output over its fp32 output's "
            "standard deviation, mean over the layers",
        },
    }
