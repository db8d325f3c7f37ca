"""Folding the explicit ``Pad`` of TF-style SAME padding into the convolution after it.

The exported backbone pads each strided convolution's input with a ``Pad`` node (the TF
checkpoint's asymmetric SAME padding). Between two int8 convolutions a float ``Pad`` keeps a
DequantizeLinear / QuantizeLinear pair around it; a convolution's own ``pads`` take the same
zeros and keep the int8 path unbroken (``training.quantize``).
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper


def fold_pads(model: onnx.ModelProto) -> int:
    """Fold each constant zero ``Pad`` over the spatial axes that feeds only a ``Conv`` into
    that convolution's ``pads`` (in place; the same output). Returns how many were folded."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    folded = []
    for pad in (n for n in graph.node if n.op_type == "Pad"):
        conv = users.get(pad.output[0], [])
        amounts = _spatial_zero_pad(pad, inits)
        if amounts is None or len(conv) != 1 or conv[0].op_type != "Conv":
            continue
        attrs = {a.name: a for a in conv[0].attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        pads = [o + a for o, a in zip(old, amounts, strict=True)]
        kept = [a for a in conv[0].attribute if a.name != "pads"]
        del conv[0].attribute[:]
        conv[0].attribute.extend([*kept, helper.make_attribute("pads", pads)])
        conv[0].input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return len(folded)


def _spatial_zero_pad(pad: onnx.NodeProto, inits: dict) -> list[int] | None:
    """(top, left, bottom, right) of a constant-zero NCHW ``Pad`` that pads only H and W."""
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(pad.input) < 2 or pad.input[1] not in inits:
        return None
    if len(pad.input) > 2 and pad.input[2]:
        value = inits.get(pad.input[2])
        if value is None or numpy_helper.to_array(value).any():
            return None
    p = numpy_helper.to_array(inits[pad.input[1]]).tolist()
    if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)) or min(p) < 0:
        return None
    return [p[2], p[3], p[6], p[7]]
