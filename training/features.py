"""Frozen-backbone feature cache: CPU training is only affordable when the early layers run
once per image and view, not once per epoch.

For each image and view we keep the input of backbone block ``split_block`` (float16) so the
later blocks can still be fine-tuned, and the pooled 1280-d output of the frozen network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from service.preprocess import ImageSpec, decode_image
from training.backbone import EfficientNetLite, checkpoint_path, normalise_uint8_nhwc

DEFAULT_SPLIT = 11
VIEWS = {
    "orig": lambda a: a,
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
}


@dataclass
class FeatureSet:
    pooled: np.ndarray  # float32 [V,N,1280]
    mid: np.ndarray | None  # float16 [V,N,C,h,w], the input of block ``split_block``

    @property
    def n_views(self) -> int:
        return self.pooled.shape[0]


def load_images(paths: list[Path], spec: ImageSpec) -> np.ndarray:
    """Decode through the serving preprocessing path (same bytes in, same pixels out)."""
    out = np.empty((len(paths), spec.height, spec.width, 3), np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_image(path.read_bytes(), spec, max_pixels=100_000_000)
    return out


def _cache_key(
    paths: list[Path], spec: ImageSpec, view: str, split_block: int | None, backbone_variant: str
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.to_manifest(), view, split_block]).encode())
    digest.update(str(checkpoint_path(backbone_variant).stat().st_size).encode())
    for p in paths:
        digest.update(str(p).encode())
        digest.update(str(p.stat().st_size).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def compute_view(
    backbone: EfficientNetLite,
    paths: list[Path],
    spec: ImageSpec,
    view: str,
    split_block: int | None,
    batch_size: int = 32,
    desc: str = "",
) -> tuple[np.ndarray, np.ndarray | None]:
    backbone.eval()
    pooled, mids = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        chunk = load_images(paths[start : start + batch_size], spec)
        chunk = np.ascontiguousarray(np.stack([VIEWS[view](a) for a in chunk]))
        x = backbone.stem(normalise_uint8_nhwc(torch.from_numpy(chunk)))
        if split_block is None:
            pooled.append(backbone.head(backbone.run_blocks(x)).numpy())
            continue
        mid = backbone.run_blocks(x, 0, split_block)
        mids.append(mid.half().numpy())
        pooled.append(backbone.head(backbone.run_blocks(mid, split_block)).numpy())
    return np.concatenate(pooled), (np.concatenate(mids) if mids else None)


def cached_features(
    backbone: EfficientNetLite,
    paths: list[Path],
    spec: ImageSpec,
    views: tuple[str, ...],
    split_block: int | None,
    cache_dir: Path,
    desc: str,
) -> FeatureSet:
    cache_dir.mkdir(parents=True, exist_ok=True)
    variant = backbone.variant
    pooled_views, mid_views = [], []
    for view in views:
        path = cache_dir / f"{_cache_key(paths, spec, view, split_block, variant)}.npz"
        # Pooled features do not depend on the split point: reuse a fine-tuning cache.
        reusable = cache_dir / f"{_cache_key(paths, spec, view, DEFAULT_SPLIT, variant)}.npz"
        if split_block is None and not path.is_file() and reusable.is_file():
            path = reusable
        if path.is_file():
            with np.load(path) as data:
                pooled = data["pooled"]
                mid = data["mid"] if split_block is not None and "mid" in data else None
        else:
            pooled, mid = compute_view(
                backbone, paths, spec, view, split_block, desc=f"{desc} [{view}]"
            )
            arrays = {"pooled": pooled} if mid is None else {"pooled": pooled, "mid": mid}
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(path)  # never leave a half-written cache behind
        pooled_views.append(pooled)
        mid_views.append(mid)
    mid_all = None if mid_views[0] is None else np.stack(mid_views)
    return FeatureSet(pooled=np.stack(pooled_views), mid=mid_all)
