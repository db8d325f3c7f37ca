"""Fused image + tabular classifier that expects any modality, or any field, to be absent.

- Image token: pooled EfficientNet-Lite features, projected; a learned *image modality token*
  replaces it when the image is absent.
- Tabular tokens: one per field (numeric: standardised value times a learned vector;
  categorical: embedding), a learned *missing* embedding per field where the mask says absent,
  plus a tabular summary token that becomes a learned *tabular modality token* when every
  field is absent.
- Fusion: a small transformer over [CLS, image, tabular summary, field tokens], or an MLP over
  [image, tabular summary]. Heads on the fused, image and tabular representations.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from service.tabular import TabularSchema
from training.backbone import FEATURE_DIM, EfficientNetLite, normalise_uint8_nhwc
from training.config import ModelConfig


class BackboneTail(nn.Module):
    """Backbone blocks from ``start`` on plus the head conv: block input -> pooled features.

    From block 0 the tail is the whole backbone, stem included, and takes uint8-valued NHWC
    pixels (the full fine-tune)."""

    def __init__(self, backbone: EfficientNetLite, start: int) -> None:
        super().__init__()
        self.start = start
        if start == 0:
            self._conv_stem = copy.deepcopy(backbone._conv_stem)
            self._bn0 = copy.deepcopy(backbone._bn0)
        self.blocks = copy.deepcopy(backbone._blocks[start:])
        self._conv_head = copy.deepcopy(backbone._conv_head)
        self._bn1 = copy.deepcopy(backbone._bn1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0:
            x = F.relu6(self._bn0(self._conv_stem(normalise_uint8_nhwc(x))))
        for block in self.blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))


def set_tail_mode(model: FusionModel) -> None:
    """Train the tail's weights but keep its BatchNorm statistics from ImageNet: batches of
    a few dozen images estimate them worse than the pretrained running averages."""
    if model.tail is not None:
        for m in model.tail.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


class TabularEncoder(nn.Module):
    def __init__(self, schema: TabularSchema, dim: int) -> None:
        super().__init__()
        self.kinds = [f.kind for f in schema.fields]
        n = len(schema.fields)
        self.register_buffer("mean", torch.tensor([f.mean for f in schema.fields]))
        self.register_buffer("std", torch.tensor([f.std or 1.0 for f in schema.fields]))
        self.value_weight = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.value_bias = nn.Parameter(torch.zeros(n, dim))
        self.embeddings = nn.ModuleList(
            nn.Embedding(max(len(f.categories), 1), dim) for f in schema.fields
        )
        self.missing = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.field_embedding = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.sizes = [max(len(f.categories), 1) for f in schema.fields]

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = []
        for j, kind in enumerate(self.kinds):
            if kind == "numeric":
                z = (values[:, j : j + 1] - self.mean[j]) / self.std[j]
                token = z * self.value_weight[j] + self.value_bias[j]
            else:
                # Masked-out slots may hold anything; clamp keeps the lookup in range.
                index = values[:, j].round().clamp(0, self.sizes[j] - 1).long()
                token = self.embeddings[j](index)
            present = mask[:, j : j + 1]
            tokens.append(present * token + (1 - present) * self.missing[j])
        return torch.stack(tokens, dim=1) + self.field_embedding


class FusionModel(nn.Module):
    def __init__(
        self,
        n_classes: int,
        schema: TabularSchema | None,
        cfg: ModelConfig,
        tail: BackboneTail | None = None,
    ) -> None:
        super().__init__()
        dim = cfg.dim
        self.cfg = cfg
        self.tail = tail
        self.image_proj = nn.Sequential(
            nn.LayerNorm(FEATURE_DIM), nn.Dropout(cfg.dropout), nn.Linear(FEATURE_DIM, dim)
        )
        self.image_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.tabular = TabularEncoder(schema, dim) if schema is not None else None
        self.tabular_token = nn.Parameter(torch.randn(dim) * 0.02)
        if cfg.fusion == "transformer":
            self.cls = nn.Parameter(torch.randn(dim) * 0.02)
            layer = nn.TransformerEncoderLayer(
                dim, cfg.heads, 2 * dim, cfg.dropout, batch_first=True, norm_first=True
            )
            self.fusion = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.fusion_norm = nn.LayerNorm(dim)
        elif cfg.fusion == "mlp":
            n_in = 2 * dim if schema is not None else dim
            self.fusion = nn.Sequential(
                nn.Linear(n_in, 2 * dim),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(2 * dim, dim),
            )
        else:
            raise ValueError(f"model.fusion must be 'transformer' or 'mlp', not {cfg.fusion!r}")
        self.head = nn.Linear(dim, n_classes)
        self.image_head = nn.Linear(dim, n_classes)
        self.tabular_head = nn.Linear(dim, n_classes) if schema is not None else None
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def image_features(self, image_input: torch.Tensor) -> torch.Tensor:
        """Cached block input (or pooled features when there is no tail) -> pooled features."""
        return self.tail(image_input.float()) if self.tail is not None else image_input

    def encode(
        self,
        pooled: torch.Tensor,
        values: torch.Tensor | None,
        mask: torch.Tensor | None,
        image_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        img = self.image_proj(pooled)
        img = image_mask * img + (1 - image_mask) * self.image_token
        out = {"image": img}
        tokens = None
        if self.tabular is not None and values is not None and mask is not None:
            tokens = self.tabular(values, mask)
            count = mask.sum(dim=1, keepdim=True)
            summary = (tokens * mask.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1)
            anything = (count > 0).float()
            out["tabular"] = anything * summary + (1 - anything) * self.tabular_token
        out["fused"] = self._fuse(img, out.get("tabular"), tokens)
        return out

    def _fuse(
        self, img: torch.Tensor, tab: torch.Tensor | None, tokens: torch.Tensor | None
    ) -> torch.Tensor:
        if self.cfg.fusion == "mlp":
            return self.fusion(img if tab is None else torch.cat([img, tab], dim=-1))
        parts = [self.cls.expand(img.shape[0], -1).unsqueeze(1), img.unsqueeze(1)]
        if tab is not None and tokens is not None:
            parts += [tab.unsqueeze(1), tokens]
        seq = self.fusion(torch.cat(parts, dim=1))
        return self.fusion_norm(seq[:, 0])

    def forward(
        self,
        image_input: torch.Tensor,
        values: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_mask is None:
            image_mask = torch.ones(image_input.shape[0], 1, device=image_input.device)
        pooled = self.image_features(image_input)
        return self.head(self.encode(pooled, values, mask, image_mask)["fused"])


def contrastive_loss(
    anchor: torch.Tensor, positive: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: row i of ``anchor`` should pick row i of ``positive`` among the batch."""
    a = F.normalize(anchor, dim=-1)
    p = F.normalize(positive, dim=-1)
    logits = a @ p.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
