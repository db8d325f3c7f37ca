"""Missingness patterns: what the service can receive, how training simulates it, and how
calibration tells them apart (from the masks alone, so the exported graph can too)."""

from __future__ import annotations

import numpy as np

# Pattern ids as the exported graph computes them from (image_mask, tabular_mask).
ALL, IMAGE_ONLY, TABULAR_ONLY, PARTIAL = 0, 1, 2, 3
PATTERN_NAMES = ("all", "image_only", "tabular_only", "partial")


def eval_patterns(has_tabular: bool) -> tuple[str, ...]:
    """Patterns a model is evaluated and calibrated under; image-only models have one."""
    return PATTERN_NAMES if has_tabular else ("all",)


def pattern_ids(image_mask: np.ndarray, tab_mask: np.ndarray | None) -> np.ndarray:
    """Map each row's masks to a pattern id; image-only models always get ALL."""
    image_mask = image_mask.reshape(-1)
    if tab_mask is None or tab_mask.shape[1] == 0:
        return np.zeros(len(image_mask), np.int64)
    present = tab_mask.sum(axis=1)
    ids = np.full(len(image_mask), PARTIAL, np.int64)
    ids[present == tab_mask.shape[1]] = ALL
    ids[present == 0] = IMAGE_ONLY
    ids[image_mask < 0.5] = TABULAR_ONLY
    return ids


def apply_eval_pattern(
    name: str, tab_mask: np.ndarray | None, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Manipulate recorded inputs into one evaluation pattern (image_mask, tabular mask).

    ``all`` keeps everything as recorded (fields missing in the data stay missing);
    ``partial`` hides a random half of each row's recorded fields.
    """
    image_mask = np.ones((n, 1), np.float32)
    if tab_mask is None:
        return image_mask, None
    mask = tab_mask.copy()
    if name == "image_only":
        mask[:] = 0
    elif name == "tabular_only":
        image_mask[:] = 0
    elif name == "partial":
        rng = np.random.default_rng(seed)
        for i in range(n):
            present = np.flatnonzero(mask[i])
            if len(present) > 1:
                drop = rng.choice(present, size=len(present) // 2, replace=False)
                mask[i, drop] = 0
    elif name != "all":
        raise ValueError(f"unknown pattern {name!r}")
    return image_mask, mask


def modality_dropout(
    tab_mask: np.ndarray | None,
    n: int,
    rng: np.random.Generator,
    p_image_only: float,
    p_tabular_only: float,
    p_partial: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Training-time masks covering every input combination the service accepts."""
    image_mask = np.ones((n, 1), np.float32)
    if tab_mask is None:
        return image_mask, None
    mask = tab_mask.copy()
    draw = rng.random(n)
    image_only = draw < p_image_only
    tab_only = (draw >= p_image_only) & (draw < p_image_only + p_tabular_only)
    partial = (draw >= p_image_only + p_tabular_only) & (
        draw < p_image_only + p_tabular_only + p_partial
    )
    mask[image_only] = 0
    image_mask[tab_only] = 0
    keep = rng.random(mask.shape) < 0.5
    mask[partial] *= keep[partial]
    return image_mask, mask
