"""Classification and calibration metrics in numpy (used by training and ONNX evaluation)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(out, (labels, preds), 1)
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, equal-width bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def ece_floor(
    probs: np.ndarray,
    bins: int = 15,
    draws: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """The ECE a perfectly calibrated model with these probabilities would show on this many
    cases (mean and 95th percentile over label draws). The binned estimator is biased upward,
    most where the confidence sits in 0.3-0.9 and cases are few: a measured ECE near this
    floor cannot be told from perfect calibration.

    ``groups`` (equal ids = images of one lesion) draws one uniform per group, so a lesion's
    images get one diagnosis, as they do in the data: fewer independent labels, a higher
    floor. Where a group's images carry identical probabilities (no image: the tabular-only
    pattern) they then share their label exactly."""
    return floor_of(calibrated_eces(probs, bins, draws, seed, groups))


def floor_of(draws: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile of calibrated draws' ECEs (``calibrated_eces``)."""
    return float(np.mean(draws)), float(np.percentile(draws, 95))


def calibrated_eces(
    probs: np.ndarray,
    bins: int = 15,
    draws: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """ECE of ``draws`` label sets drawn from ``probs`` themselves (``ece_floor``): the
    distribution a perfectly calibrated model's measured ECE follows on these cases."""
    rng = np.random.default_rng(seed)
    cum = probs.cumsum(axis=1)
    found = []
    for _ in range(draws):
        if groups is None:
            u = rng.random((len(probs), 1))
        else:
            u = rng.random(int(groups.max()) + 1)[groups][:, None]
        labels = (cum < u * cum[:, -1:]).sum(axis=1)
        found.append(ece(probs, np.minimum(labels, probs.shape[1] - 1), bins))
    return np.asarray(found)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean over classes of each class's one-vs-rest calibration error: unlike the top-class
    ECE it sees a class whose probability is too high everywhere (a shifted prior)."""
    edges = np.linspace(0, 1, bins + 1)
    per_class = []
    for k in range(probs.shape[1]):
        p, hit = probs[:, k], (labels == k).astype(np.float64)
        total = 0.0
        for lo, hi in pairwise(edges):
            in_bin = (p > lo) & (p <= hi) if lo > 0 else (p >= lo) & (p <= hi)
            if in_bin.any():
                total += in_bin.mean() * abs(hit[in_bin].mean() - p[in_bin].mean())
        per_class.append(total)
    return float(np.mean(per_class))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list]:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    rows: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
    for lo, hi in pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        rows["count"].append(int(in_bin.sum()))
        rows["confidence"].append(float(conf[in_bin].mean()) if in_bin.any() else None)
        rows["accuracy"].append(float(correct[in_bin].mean()) if in_bin.any() else None)
    return rows


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (rank statistic)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_ovr(probs: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest AUROC (rank statistic, ties averaged)."""
    scores = [
        auroc(probs[:, k], labels == k)
        for k in range(probs.shape[1])
        if 0 < (labels == k).sum() < len(labels)
    ]
    return float(np.mean(scores)) if scores else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def label_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class of a confusion matrix: recall, F1, and whether the class has cases (the
    classes balanced accuracy and macro-F1 average over)."""
    k = len(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return recall, f1, support > 0


def summarize(
    probs: np.ndarray,
    labels: np.ndarray,
    names: tuple[str, ...],
    preds: np.ndarray | None = None,
) -> dict:
    """Metrics of ``probs``; the label-based ones score ``preds`` (default: the argmax)."""
    k = len(names)
    preds = probs.argmax(axis=1) if preds is None else preds
    cm = confusion(labels, preds, k)
    recall, f1, present = label_scores(cm)
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())
    return {
        "n": len(labels),
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1[present].mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "auroc_macro_ovr": auroc_ovr(probs, labels),
        "ece_15": ece(probs, labels),
        "nll": nll,
        "per_class_recall": {n: float(r) for n, r in zip(names, recall, strict=True)},
        "per_class_f1": {n: float(v) for n, v in zip(names, f1, strict=True)},
        "confusion": cm.tolist(),
    }
