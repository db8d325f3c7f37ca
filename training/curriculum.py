"""Epoch sampling: natural / class-balanced orders and the CLIMD curriculum (arXiv 2508.01594).

Difficulty (recomputed every epoch from the current model, on the labelled training rows):

    c_i = mean over unimodal heads of p_head(y_i | x_i)          intra-modal confidence
    g_i = p_fused(y_i | x_i) - max over heads of p_head(y_i | x_i)  inter-modal complementarity
    difficulty_i = 1 - [(1 - w) c_i + w (g_i + 1) / 2]

A row is easy when each modality already recognises it and fusion agrees; rows where the
modalities conflict (fusion below the best single modality, g < 0) are the hardest. For
image-only data c_i is the image head's confidence.

Scheduler, with progress t = epoch / (full_at * epochs) clipped to [0, 1]:

- pool: the easiest ``start_fraction + (1 - start_fraction) t`` of each class;
- class mix: ``(1 - t) uniform + t empirical``, so training starts class-balanced on easy rows
  and ends on the full, naturally imbalanced data (a plain permutation once t = 1).
"""

from __future__ import annotations

import math

import numpy as np


def sample_order(labels: np.ndarray, balance: float, rng: np.random.Generator) -> np.ndarray:
    """An epoch's sample order; ``balance`` interpolates natural (0) to class-balanced (1)."""
    if balance <= 0:
        return rng.permutation(len(labels))
    counts = np.bincount(labels)
    weights = counts[labels].astype(np.float64) ** -balance
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def difficulty(
    p_fused: np.ndarray, p_unimodal: list[np.ndarray], complementarity_weight: float
) -> np.ndarray:
    """Per-row difficulty in [0, 1] from true-class probabilities (see the module docstring)."""
    uni = np.stack(p_unimodal)
    confidence = uni.mean(axis=0)
    gain = p_fused - uni.max(axis=0)
    w = complementarity_weight
    return 1.0 - ((1 - w) * confidence + w * (gain + 1) / 2)


def progress(epoch: int, epochs: int, full_at: float) -> float:
    return float(min(1.0, epoch / max(full_at * epochs, 1e-9)))


def class_distribution(counts: np.ndarray, t: float) -> np.ndarray:
    """Class sampling probabilities: uniform at t = 0, the empirical mix at t = 1."""
    present = counts > 0
    uniform = present / present.sum()
    return (1 - t) * uniform + t * counts / counts.sum()


def curriculum_order(
    labels: np.ndarray,
    difficulties: np.ndarray,
    t: float,
    start_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One epoch of row indices (as many as there are rows) under the curriculum at ``t``."""
    n = len(labels)
    if t >= 1:
        return rng.permutation(n)
    counts = np.bincount(labels)
    probs = class_distribution(counts, t)
    fraction = start_fraction + (1 - start_fraction) * t
    pools = []
    for c in range(len(counts)):
        rows = np.flatnonzero(labels == c)
        keep = max(1, math.ceil(fraction * len(rows))) if len(rows) else 0
        pools.append(rows[np.argsort(difficulties[rows], kind="stable")[:keep]])
    classes = rng.choice(len(counts), size=n, p=probs)
    order = np.empty(n, np.int64)
    for c, pool in enumerate(pools):
        picked = classes == c
        if picked.any():
            order[picked] = rng.choice(pool, size=int(picked.sum()), replace=True)
    return order
