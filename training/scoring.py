"""Scoring a fusion model on cached features: logits per missingness pattern, then metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.calibrate import softmax, temperatures_for
from training.data import Table
from training.features import FeatureSet
from training.metrics import summarize
from training.model import FusionModel
from training.patterns import apply_eval_pattern, eval_patterns, pattern_ids


@torch.no_grad()
def predict_logits(
    model: FusionModel, feats: FeatureSet, table: Table, pattern: str, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Logits for view 0 of every row under one pattern; also returns the pattern ids."""
    model.eval()
    has_tab = model.tabular is not None
    image_mask, tab_mask = apply_eval_pattern(pattern, table.mask if has_tab else None, len(table))
    source = feats.mid[0] if model.tail is not None else feats.pooled[0]
    out = []
    for s in range(0, len(table), batch):
        x = torch.from_numpy(np.asarray(source[s : s + batch], np.float32))
        values = torch.from_numpy(table.tabular[s : s + batch]) if has_tab else None
        mask = torch.from_numpy(tab_mask[s : s + batch]) if has_tab else None
        out.append(model(x, values, mask, torch.from_numpy(image_mask[s : s + batch])).numpy())
    return np.concatenate(out), pattern_ids(image_mask, tab_mask)


def collect_logits(
    model: FusionModel, feats: FeatureSet, table: Table
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Logits and pattern ids per evaluation pattern: computed once, scored many ways."""
    return {
        pattern: predict_logits(model, feats, table, pattern)
        for pattern in eval_patterns(model.tabular is not None)
    }


def score(
    logits: dict[str, tuple[np.ndarray, np.ndarray]],
    table: Table,
    temps: dict[str, float] | None = None,
) -> dict[str, Any]:
    results = {}
    for pattern, (lg, pids) in logits.items():
        t = temperatures_for(pids, temps) if temps else 1.0
        results[pattern] = summarize(softmax(lg, t), table.labels, table.label_names)
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
    model: FusionModel, feats: FeatureSet, table: Table, rows: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, list[np.ndarray]]:
    """p(y_i) from the fused head (all inputs) and from each unimodal head, for ``rows``."""
    model.eval()
    has_tab = model.tabular is not None
    source = feats.mid[0] if model.tail is not None else feats.pooled[0]
    fused, image, tab = [], [], []
    for s in range(0, len(rows), batch):
        idx = rows[s : s + batch]
        x = torch.from_numpy(np.asarray(source[idx], np.float32))
        values = torch.from_numpy(table.tabular[idx]) if has_tab else None
        mask = torch.from_numpy(table.mask[idx]) if has_tab else None
        enc = model.encode(model.image_features(x), values, mask, torch.ones(len(idx), 1))
        y = torch.from_numpy(table.labels[idx])[:, None]
        fused.append(model.head(enc["fused"]).softmax(-1).gather(1, y)[:, 0].numpy())
        image.append(model.image_head(enc["image"]).softmax(-1).gather(1, y)[:, 0].numpy())
        if has_tab:
            tab.append(model.tabular_head(enc["tabular"]).softmax(-1).gather(1, y)[:, 0].numpy())
    unimodal = [np.concatenate(image)] + ([np.concatenate(tab)] if has_tab else [])
    return np.concatenate(fused), unimodal
