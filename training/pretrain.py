"""Synergistic self-supervised pretraining (MICS, arXiv 2509.17492), before fine-tuning.

A label-free stage over every training image (including those whose labels fine-tuning does
not use) that trains the image path, the tabular encoder and the projector with

    L = w_c L_consistency + w_r L_reconstruction + w_a L_alignment

- consistency: InfoNCE between two augmented views of one image (two different cached
  geometric views, each with Gaussian feature noise);
- reconstruction: masked input -> light decoder -> the unmasked pooled features
  (``training.reconstruction``); weights default to the paper's code, reconstruction 10 :
  alignment 1;
- alignment: one modality as an augmented view of the other: InfoNCE between the image and the
  tabular-summary embeddings of the same patient (rows with at least one field). For image-only
  data the second "modality" is a photometric-style view: the same cached view with independent
  noise and random channel dropout, since geometric views are already used by consistency.

With cluster-guided negatives on, both InfoNCE terms use them (``training.negatives``) and the
reconstruction decoder is cross-modal.

On a full fine-tune (``model.finetune_from_block: 0``) the stage runs over pixels
(``pretrain_pixels``): the views are two draws of the training augmentation and the
reconstruction hides square patches of the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.config import Config
from training.data import Table
from training.device import cpu_state, cpu_tree, device_of
from training.features import FeatureSet
from training.images import AugmentedImages
from training.model import FusionModel, contrastive_loss, set_tail_mode
from training.negatives import ClusterGuide, weighted_infonce
from training.objectives import make_decoder, make_guide
from training.reconstruction import Reconstructor, reconstruction_loss


def perturb(x: torch.Tensor, noise: float, drop: float = 0.0) -> torch.Tensor:
    """Feature-space augmentation: multiplicative Gaussian noise and channel dropout."""
    if noise > 0:
        x = x * (1 + noise * torch.randn_like(x))
    return F.dropout(x, drop) if drop > 0 else x


def info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float, guide: ClusterGuide | None
) -> torch.Tensor:
    if guide is None:
        return contrastive_loss(a, b, temperature)
    return weighted_infonce(a, b, temperature, guide.weights(a))


def pretrain_step(
    model: FusionModel,
    decoder: Reconstructor,
    cfg: Config,
    xa: torch.Tensor,
    xb: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor | None,
    guide: ClusterGuide | None,
    noise: float | None = None,
    xc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss and its parts. ``noise``: the views' feature noise (default the
    config's; 0 where the views are augmented pixels already). ``xc``: a third augmented
    view of ``xa``'s images, the second "modality" of image-only data over pixels (feature
    noise and channel dropout are no augmentation of pixels)."""
    pc = cfg.methods.pretrain
    noise = pc.feature_noise if noise is None else noise
    ones = torch.ones(len(xa), 1, device=xa.device)
    pa = model.image_features(perturb(xa, noise))
    ea = model.encode(pa, values, mask, ones)
    eb = model.image_features(perturb(xb, noise))
    za = model.projector(ea["image"])
    zb = model.projector(model.image_proj(eb))
    consistency = info_nce(za, zb, pc.temperature, guide)
    if "tabular" in ea:
        present = mask.sum(dim=1) > 0
        alignment = info_nce(
            za[present], model.projector(ea["tabular"][present]), pc.temperature, None
        )
    else:
        if xc is None:
            photometric = model.image_features(perturb(xa, pc.feature_noise, drop=0.2))
        else:
            photometric = model.image_features(xc)
        alignment = info_nce(
            za, model.projector(model.image_proj(photometric)), pc.temperature, None
        )
    cross = cfg.methods.negatives.enabled
    recon = reconstruction_loss(
        model,
        decoder,
        xa,
        pc.mask_ratio,
        values if cross else None,
        mask if cross else None,
        unmasked=pa if noise == 0 else None,
    )
    loss = (
        pc.consistency_weight * consistency
        + pc.reconstruction_weight * recon
        + pc.alignment_weight * alignment
    )
    return loss, {
        "consistency": consistency.item(),
        "reconstruction": recon.item(),
        "alignment": alignment.item(),
    }


class StageCheckpoint:
    """The label-free stage's state after each epoch: weights, decoder, optimiser and both
    random generators, so that a run interrupted mid-stage resumes at the next epoch and
    draws exactly what an uninterrupted one would have. Without a path it does nothing."""

    def __init__(
        self,
        path: Path | None,
        model: FusionModel,
        decoder: Reconstructor,
        optimizer: torch.optim.Optimizer,
        rng: np.random.Generator,
    ) -> None:
        self.path, self.model, self.decoder = path, model, decoder
        self.optimizer, self.rng = optimizer, rng

    def load(self) -> tuple[int, list[dict[str, float]]]:
        """-> (the first epoch still to run, the losses of those already run)."""
        if self.path is None or not self.path.is_file():
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming pretraining at epoch {state['epoch'] + 1}")
        return state["epoch"], state["history"]

    def save(self, epochs_done: int, history: list[dict[str, float]]) -> None:
        if self.path is None:
            return
        state = {
            "model": cpu_state(self.model),
            "decoder": cpu_state(self.decoder),
            "optimizer": cpu_tree(self.optimizer.state_dict()),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "epoch": epochs_done,
            "history": history,
        }
        partial = self.path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.path)  # a kill mid-write leaves the previous epoch's state


def pretrain(
    model: FusionModel,
    cfg: Config,
    feats: FeatureSet,
    table: Table,
    rng: np.random.Generator,
    checkpoint: Path | None = None,
    stop_after: int | None = None,
) -> list[dict[str, float]] | None:
    """Run the label-free stage in place on ``model``; returns the mean losses per epoch,
    or None when ``stop_after`` epochs are done and more remain (``checkpoint`` holds them)."""
    pc, tc = cfg.methods.pretrain, cfg.train
    has_tab = model.tabular is not None
    decoder = make_decoder(model, cross_modal=cfg.methods.negatives.enabled)
    guide = make_guide(cfg)
    dev = device_of(model)
    params = list(model.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=pc.lr, weight_decay=tc.weight_decay)
    source = feats.mid if model.tail is not None else feats.pooled
    n_views, n = source.shape[0], len(table)
    saved = StageCheckpoint(checkpoint, model, decoder, optimizer, rng)
    start, history = saved.load()
    model.train()
    for epoch in range(start, pc.epochs):
        if stop_after is not None and epoch >= stop_after:
            return None
        order = rng.permutation(n)
        va = rng.integers(0, n_views, n)
        # A different view for the second branch whenever there is more than one.
        vb = (va + rng.integers(1, max(n_views, 2), n)) % n_views if n_views > 1 else va
        sums: dict[str, float] = {}
        steps = range(0, n - 1, tc.batch_size)
        for s in tqdm(steps, desc=f"pretrain {epoch + 1}/{pc.epochs}", unit="step", leave=False):
            idx = order[s : s + tc.batch_size]
            if len(idx) < 2:
                continue
            xa = torch.from_numpy(np.asarray(source[va[idx], idx], np.float32)).to(dev)
            xb = torch.from_numpy(np.asarray(source[vb[idx], idx], np.float32)).to(dev)
            values = torch.from_numpy(table.tabular[idx]).to(dev) if has_tab else None
            mask = torch.from_numpy(table.mask[idx]).to(dev) if has_tab else None
            loss, parts = pretrain_step(model, decoder, cfg, xa, xb, values, mask, guide)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx) / n
        history.append(sums)
        print(f"pretrain {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in sums.items()))
        saved.save(epoch + 1, history)
    return history


def pretrain_pixels(
    model: FusionModel,
    cfg: Config,
    images: AugmentedImages,
    table: Table,
    rng: np.random.Generator,
    checkpoint: Path | None = None,
    stop_after: int | None = None,
) -> list[dict[str, float]] | None:
    """The label-free stage over pixels, for a full fine-tune: the two views of an image are
    two independent draws of the training augmentation (crops, colour, overlays) through the
    whole backbone, and the reconstruction masks square patches of the first view. The
    backbone learns at the fine-tune's backbone rate (the head's rate would wash out the
    ImageNet weights), its BatchNorm statistics stay ImageNet's, as in fine-tuning. A step
    runs the backbone three times with gradients (four without tabular fields).
    ``checkpoint`` and ``stop_after`` as in :func:`pretrain`."""
    pc, tc = cfg.methods.pretrain, cfg.train
    has_tab = model.tabular is not None
    decoder = make_decoder(model, cross_modal=cfg.methods.negatives.enabled)
    guide = make_guide(cfg)
    dev = device_of(model)
    tail = list(model.tail.parameters()) if model.tail is not None else []
    tail_ids = {id(p) for p in tail}
    head = [p for p in model.parameters() if id(p) not in tail_ids] + list(decoder.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": head, "lr": pc.lr}, {"params": tail, "lr": tc.backbone_lr}],
        weight_decay=tc.weight_decay,
    )
    n = len(table)
    saved = StageCheckpoint(checkpoint, model, decoder, optimizer, rng)
    start, history = saved.load()
    for epoch in range(start, pc.epochs):
        if stop_after is not None and epoch >= stop_after:
            return None
        model.train()
        set_tail_mode(model)
        order = rng.permutation(n)
        sums: dict[str, float] = {}
        steps = range(0, n - 1, tc.batch_size)
        bar = tqdm(steps, desc=f"pretrain {epoch + 1}/{pc.epochs}", unit="step")
        for s in bar:
            idx = order[s : s + tc.batch_size]
            if len(idx) < 2:
                continue
            xa = torch.from_numpy(images.batch(idx, rng)).to(dev)
            xb = torch.from_numpy(images.batch(idx, rng)).to(dev)
            values = torch.from_numpy(table.tabular[idx]).to(dev) if has_tab else None
            mask = torch.from_numpy(table.mask[idx]).to(dev) if has_tab else None
            xc = None if has_tab else torch.from_numpy(images.batch(idx, rng)).to(dev)
            loss, parts = pretrain_step(model, decoder, cfg, xa, xb, values, mask, guide, 0.0, xc)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head + tail, 5.0)
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx) / n
        history.append(sums)
        print(f"pretrain {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in sums.items()))
        saved.save(epoch + 1, history)
    return history
