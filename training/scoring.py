"""Scoring a fusion model on cached features: logits per missingness pattern, then metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.calibrate import calibrated, temperatures_for
from training.data import Table
from training.device import device_of
from training.features import FeatureSet
from training.images import AugmentedImages
from training.metrics import summarize
from training.model import FusionModel
from training.patterns import PATTERN_NAMES, apply_eval_pattern, eval_patterns, pattern_ids


@torch.no_grad()
def pooled_features(model: FusionModel, feats: FeatureSet, batch: int = 128) -> torch.Tensor:
    """Pooled image features of view 0 of every row: the backbone runs once per split, not
    once per pattern (with a fully fine-tuned backbone, that is most of the cost)."""
    model.eval()
    dev = device_of(model)
    source = feats.mid[0] if model.tail is not None else feats.pooled[0]
    return torch.cat(
        [
            model.image_features(
                torch.from_numpy(np.asarray(source[s : s + batch], np.float32)).to(dev)
            )
            for s in range(0, len(source), batch)
        ]
    )


@torch.no_grad()
def predict_logits(
    model: FusionModel, pooled: torch.Tensor, table: Table, pattern: str
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every row under one pattern; also returns the pattern ids."""
    model.eval()
    has_tab = model.tabular is not None
    image_mask, tab_mask = apply_eval_pattern(pattern, table.mask if has_tab else None, len(table))
    dev = pooled.device
    values = torch.from_numpy(table.tabular).to(dev) if has_tab else None
    mask = torch.from_numpy(tab_mask).to(dev) if has_tab else None
    fused = model.encode(pooled, values, mask, torch.from_numpy(image_mask).to(dev))["fused"]
    return model.head(fused).cpu().numpy(), pattern_ids(image_mask, tab_mask)


def collect_logits(
    model: FusionModel, feats: FeatureSet, table: Table
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Logits and pattern ids per evaluation pattern: computed once, scored many ways."""
    pooled = pooled_features(model, feats)
    return {
        pattern: predict_logits(model, pooled, table, pattern)
        for pattern in eval_patterns(model.tabular is not None)
    }


def score(
    logits: dict[str, tuple[np.ndarray, np.ndarray]],
    table: Table,
    temps: dict[str, float] | None = None,
    biases: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    results = {}
    for pattern, (lg, pids) in logits.items():
        t = temperatures_for(pids, temps)[:, None] if temps else 1.0
        b = np.array([biases[PATTERN_NAMES[p]] for p in pids]) if biases else None
        results[pattern] = summarize(calibrated(lg, t, b), table.labels, table.label_names)
    return results


def evaluate(
    model: FusionModel, feats: FeatureSet, table: Table, temps: dict[str, float] | None = None
) -> dict[str, Any]:
    return score(collect_logits(model, feats, table), table, temps)


def selection_score(results: dict[str, Any], metric: str) -> float:
    used = [p for p in ("all", "image_only", "partial") if p in results]
    return float(np.mean([results[p][metric] for p in used]))


@torch.no_grad()
def true_class_probabilities(
    model: FusionModel,
    feats: FeatureSet | AugmentedImages,
    table: Table,
    rows: np.ndarray,
    batch: int = 256,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """p(y_i) from the fused head (all inputs) and from each unimodal head, for ``rows``; for
    a full fine-tune, on the training frames as stored (no augmentation)."""
    model.eval()
    dev = device_of(model)
    has_tab = model.tabular is not None
    pixels = isinstance(feats, AugmentedImages)
    source = None if pixels else feats.mid[0] if model.tail is not None else feats.pooled[0]
    fused, image, tab = [], [], []
    starts = range(0, len(rows), batch)
    for s in tqdm(starts, desc="curriculum difficulty", unit="batch", leave=False):
        idx = rows[s : s + batch]
        x = torch.from_numpy(
            feats.plain(idx).astype(np.float32) if pixels else np.asarray(source[idx], np.float32)
        ).to(dev)
        values = torch.from_numpy(table.tabular[idx]).to(dev) if has_tab else None
        mask = torch.from_numpy(table.mask[idx]).to(dev) if has_tab else None
        ones = torch.ones(len(idx), 1, device=dev)
        enc = model.encode(model.image_features(x), values, mask, ones)
        y = torch.from_numpy(table.labels[idx]).to(dev)
        fused.append(_p_true(model.head, enc["fused"], y))
        image.append(_p_true(model.image_head, enc["image"], y))
        if has_tab:
            tab.append(_p_true(model.tabular_head, enc["tabular"], y))
    unimodal = [np.concatenate(image)] + ([np.concatenate(tab)] if has_tab else [])
    return np.concatenate(fused), unimodal


def _p_true(head: torch.nn.Module, z: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return head(z).softmax(-1).gather(1, y[:, None])[:, 0].cpu().numpy()
