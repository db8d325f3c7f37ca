"""Pixels for the full fine-tune: decoded frames, augmented per step, prepared by the serving
preprocessing (``service.preprocess.prepare``), so training sees what the service would."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from service.preprocess import ImageSpec, prepare, to_rgb
from training.features import FeatureSet, load_images

Augment = Callable[[Image.Image, np.random.Generator], Image.Image]
# Pillow releases the GIL while it resizes, filters and encodes: a small pool overlaps frames.
# On a GPU the augmentation is most of a step, so a machine with cores to spare raises it.
_POOL = ThreadPoolExecutor(
    max_workers=int(os.environ.get("ENDOFUSE_AUGMENT_THREADS", "2")), thread_name_prefix="augment"
)


@dataclass
class AugmentedImages:
    """Training frames as stored (decoded once), turned into model input on every draw."""

    frames: list[np.ndarray]  # uint8 [h, w, 3], sizes differ
    spec: ImageSpec
    augment: Augment | None
    n_views: int = 1

    @classmethod
    def load(cls, paths: list[Path], spec: ImageSpec, augment: Augment | None) -> AugmentedImages:
        frames = []
        for path in tqdm(paths, desc="decode train frames", unit="img", leave=False):
            with Image.open(path) as image:
                frames.append(np.asarray(to_rgb(image.convert("RGB")), dtype=np.uint8))
        return cls(frames, spec, augment)

    def draw(self, index: int, seed: int) -> np.ndarray:
        image = Image.fromarray(self.frames[index])
        if self.augment is not None:
            image = self.augment(image, np.random.default_rng(seed))
        return prepare(image, self.spec)

    def plain(self, idx: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3]: the frames as stored, prepared as the service would (no
        augmentation); what the curriculum scores difficulty on."""
        return np.stack(
            list(_POOL.map(lambda i: prepare(Image.fromarray(self.frames[i]), self.spec), idx))
        )

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [B, H, W, 3]; each frame's changes come from its own seed, drawn from ``rng``,
        so a run is reproducible whatever order the pool finishes in."""
        seeds = rng.integers(0, 2**32, len(idx))
        return np.stack(list(_POOL.map(self.draw, idx.tolist(), seeds.tolist())))


def pixel_set(paths: list[Path], spec: ImageSpec, desc: str) -> FeatureSet:
    """Evaluation frames through the serving decode, as a one-view set whose block input is
    the pixels themselves (the tail of a full fine-tune starts at the stem)."""
    images = load_images(list(tqdm(paths, desc=desc, unit="img", leave=False)), spec)
    return FeatureSet(pooled=np.zeros((1, len(paths), 0), np.float32), mid=images[None])
