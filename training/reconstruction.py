"""Masked image reconstruction by a light decoder (MICS, and CM-CGNS's cross-modal variant).

The image input is what the trainable part of the network sees: the cached block input
(``[N, C, h, w]``) when the backbone tail is fine-tuned, the pooled 1280-d features otherwise.
A share ``mask_ratio`` of it is zeroed (random spatial positions, or random blocks of 64
channels; for a full fine-tune, whose input is the pixels, random 16 x 16 patches),
encoded, and a two-layer decoder predicts the layer-normalised pooled features of the
*unmasked* input. The cross-modal variant gives the decoder the image embedding concatenated with
the tabular summary, so the tabular fields help fill in what the mask hid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.backbone import FEATURE_DIM
from training.model import FusionModel

CHANNEL_BLOCK = 64
PATCH = 16


def mask_input(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None):
    """Zero a random share ``ratio`` of spatial positions (4-D) or channel blocks (2-D)."""
    if x.dim() == 4:
        n, _, h, w = x.shape
        keep = torch.rand(n, 1, h, w, generator=generator) >= ratio
        return x * keep.to(x.device, x.dtype)
    n, d = x.shape
    blocks = (d + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    keep = torch.rand(n, blocks, generator=generator) >= ratio
    keep = keep.repeat_interleave(CHANNEL_BLOCK, dim=1)[:, :d]
    return x * keep.to(x.device, x.dtype)


def mask_pixels(
    x: torch.Tensor, ratio: float, generator: torch.Generator | None = None, patch: int = PATCH
) -> torch.Tensor:
    """Black out a random share ``ratio`` of ``patch`` x ``patch`` squares of NHWC pixels
    (single pixels would be filled in from their neighbours by the first convolution)."""
    n, h, w, _ = x.shape
    gh, gw = -(-h // patch), -(-w // patch)
    keep = torch.rand(n, gh, gw, generator=generator) >= ratio
    keep = keep.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :h, :w, None]
    return x * keep.to(x.device, x.dtype)


class Reconstructor(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, FEATURE_DIM)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def reconstruction_loss(
    model: FusionModel,
    decoder: Reconstructor,
    image_input: torch.Tensor,
    ratio: float,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    unmasked: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the decoder's prediction from a masked input and the unmasked features.

    With ``values``/``mask`` (and a tabular model) the decoder is cross-modal. ``unmasked``:
    the pooled features of ``image_input`` where the caller has them already (over pixels a
    backbone pass is nearly the whole cost of a step). Over pixels (a tail from the stem)
    the mask is one of square patches.
    """
    if unmasked is None:
        with torch.no_grad():
            unmasked = model.image_features(image_input)
    target = F.layer_norm(unmasked.detach(), (FEATURE_DIM,))
    pixels = model.tail is not None and model.tail.start == 0
    masked = (mask_pixels if pixels else mask_input)(image_input.float(), ratio, generator)
    ones = masked.new_ones(len(masked), 1)
    cross = model.tabular is not None and values is not None and mask is not None
    enc = model.encode(
        model.image_features(masked), values if cross else None, mask if cross else None, ones
    )
    z = torch.cat([enc["image"], enc["tabular"]], dim=-1) if cross else enc["image"]
    return F.mse_loss(decoder(z), target)
