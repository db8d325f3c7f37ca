"""One supervised training step: batch assembly and the fine-tuning loss with its options.

    L = CE(head(fused under modality dropout))              fused prediction
      + w_u [CE(image head) + CE(tabular head)]             unimodal heads (also CLIMD's input)
      + w_c [InfoNCE(fused, image) + InfoNCE(fused, tab)]   contrastive on fused representations
      + w_r L_cross-modal reconstruction                    with cluster-guided negatives on

Distribution shift (``methods.shift``) re-styles the fused features before the fused head;
cluster-guided negatives (``methods.negatives``) reweight the InfoNCE negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.config import Config
from training.data import Table
from training.device import device_of
from training.features import FeatureSet
from training.images import AugmentedImages
from training.model import FusionModel, contrastive_loss
from training.negatives import ClusterGuide, weighted_infonce
from training.patterns import modality_dropout
from training.reconstruction import Reconstructor, reconstruction_loss
from training.shift import shift_statistics


@dataclass
class Auxiliary:
    """Training-only parts: they are optimised alongside the model but never exported."""

    guide: ClusterGuide | None = None
    decoder: Reconstructor | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.decoder.parameters()) if self.decoder is not None else []


def make_guide(cfg: Config) -> ClusterGuide | None:
    nc = cfg.methods.negatives
    if not nc.enabled:
        return None
    return ClusterGuide(
        nc.clusters, nc.momentum, nc.false_negative_weight, nc.hard_negative_weight, cfg.train.seed
    )


def make_decoder(model: FusionModel, cross_modal: bool) -> Reconstructor:
    """Light reconstruction decoder, on the model's device; cross-modal ones also read the
    tabular summary."""
    dim = model.cfg.dim
    width = 2 * dim if cross_modal and model.tabular is not None else dim
    return Reconstructor(width, 2 * dim).to(device_of(model))


def build_auxiliary(cfg: Config, model: FusionModel) -> Auxiliary:
    if not cfg.methods.negatives.enabled:
        return Auxiliary()
    return Auxiliary(guide=make_guide(cfg), decoder=make_decoder(model, cross_modal=True))


def make_batch(
    idx: np.ndarray,
    views: np.ndarray,
    feats: FeatureSet | AugmentedImages,
    table: Table,
    model: FusionModel,
    cfg: Config,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    dev = device_of(model)
    if isinstance(feats, AugmentedImages):
        image = torch.from_numpy(feats.batch(idx, rng))
    else:
        source = feats.mid if model.tail is not None else feats.pooled
        image = torch.from_numpy(np.asarray(source[views, idx], np.float32))
    has_tab = model.tabular is not None
    tab_mask = table.mask[idx] if has_tab else None
    image_mask, dropped = modality_dropout(
        tab_mask,
        len(idx),
        rng,
        cfg.train.p_image_only,
        cfg.train.p_tabular_only,
        cfg.train.p_partial_fields,
    )
    return {
        "image": image.to(dev),
        "labels": torch.from_numpy(table.labels[idx]).to(dev),
        "values": torch.from_numpy(table.tabular[idx]).to(dev) if has_tab else None,
        "mask": torch.from_numpy(tab_mask).to(dev) if has_tab else None,
        "dropped_mask": torch.from_numpy(dropped).to(dev) if has_tab else None,
        "image_mask": torch.from_numpy(image_mask).to(dev),
    }


def train_step(
    model: FusionModel, cfg: Config, batch: dict[str, torch.Tensor], aux: Auxiliary
) -> tuple[torch.Tensor, dict[str, float]]:
    pooled = model.image_features(batch["image"])
    ones = pooled.new_ones(len(pooled), 1)
    full = model.encode(pooled, batch["values"], batch["mask"], ones)
    dropped = model.encode(pooled, batch["values"], batch["dropped_mask"], batch["image_mask"])
    y = batch["labels"]
    tc, sc = cfg.train, cfg.methods.shift
    fused = dropped["fused"]
    if sc.enabled:
        fused = shift_statistics(fused, sc.p, sc.alpha)
    loss_fused = F.cross_entropy(model.head(fused), y)
    loss_uni = F.cross_entropy(model.image_head(full["image"]), y)
    if model.tabular_head is not None:
        loss_uni = loss_uni + F.cross_entropy(model.tabular_head(full["tabular"]), y)
    z_fused = model.projector(dropped["fused"])
    weights = aux.guide.weights(z_fused) if aux.guide is not None else None

    def nce(other: torch.Tensor) -> torch.Tensor:
        z = model.projector(other)
        if weights is None:
            return contrastive_loss(z_fused, z, tc.contrastive_temperature)
        return weighted_infonce(z_fused, z, tc.contrastive_temperature, weights)

    loss_con = nce(full["image"])
    if "tabular" in full:
        loss_con = loss_con + nce(full["tabular"])
    loss = loss_fused + tc.unimodal_loss_weight * loss_uni + tc.contrastive_weight * loss_con
    parts = {
        "fused": loss_fused.item(),
        "unimodal": loss_uni.item(),
        "contrastive": loss_con.item(),
    }
    if aux.decoder is not None:
        nc = cfg.methods.negatives
        recon = reconstruction_loss(
            model, aux.decoder, batch["image"], nc.mask_ratio, batch["values"], batch["mask"]
        )
        loss = loss + nc.reconstruction_weight * recon
        parts["reconstruction"] = recon.item()
    return loss, parts
