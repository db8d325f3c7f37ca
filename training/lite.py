"""The EfficientNet-Lite family's shapes, torch-free: which variants exist, each one's stage
table and where its stages end. Configs validate against it and the out-of-distribution fit
finds its middle layer with it, without importing the network (``training.backbone``)."""

from __future__ import annotations

import math

DEFAULT = "efficientnet-lite0"
# (width, depth) multipliers of the Lite family.
VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0),
    "efficientnet-lite1": (1.0, 1.1),
    "efficientnet-lite2": (1.1, 1.2),
}
# (expand ratio, kernel, stride, in, out, repeats) per stage, Lite0 (width = depth = 1.0).
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


def _round_channels(channels: int, width: float) -> int:
    """TF EfficientNet's rounding: to a multiple of 8, never more than 10 % below."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stages(variant: str = DEFAULT) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """The stage table of a Lite variant. Lite keeps the stem (32), the head (1280) and the
    repeats of the first and last stage fixed, so the checkpoints' shapes follow from this."""
    width, depth = VARIANTS[variant]
    out = []
    for i, (expand, kernel, stride, cin, cout, repeats) in enumerate(STAGES):
        if 0 < i < len(STAGES) - 1:
            repeats = math.ceil(depth * repeats)
        cin = cin if i == 0 else _round_channels(cin, width)
        out.append((expand, kernel, stride, cin, _round_channels(cout, width), repeats))
    return tuple(out)


def stage_ends(variant: str = DEFAULT) -> list[int]:
    """Index of each stage's last block (stage 5 of Lite0 ends at block 10)."""
    ends, total = [], 0
    for *_, repeats in stages(variant):
        total += repeats
        ends.append(total - 1)
    return ends


def backbone_name(variant: str) -> str:
    """'efficientnet-lite2' -> 'EfficientNet-Lite2', as the model card writes it."""
    return "EfficientNet-Lite" + variant.removeprefix("efficientnet-lite")
