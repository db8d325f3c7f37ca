"""Temperature scaling, one temperature per missingness pattern, fitted on validation logits.

A missing modality changes how confident the model should be, so one temperature for all
inputs leaves some patterns over- or under-confident.
"""

from __future__ import annotations

import numpy as np

from training.patterns import PATTERN_NAMES


def softmax(logits: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    z = logits / np.reshape(temperature, (-1, 1)) if np.ndim(temperature) else logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, 1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Minimise NLL over T: a coarse log-grid, then golden-section refinement."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    losses = [nll(logits, labels, t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a = hi - ratio * (hi - lo)
        b = lo + ratio * (hi - lo)
        if nll(logits, labels, np.exp(a)) < nll(logits, labels, np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def fit_per_pattern(
    logits: np.ndarray, labels: np.ndarray, patterns: np.ndarray, min_samples: int = 30
) -> dict[str, float]:
    """Temperature per pattern id; a pattern too rare to fit falls back to the pooled value."""
    pooled = fit_temperature(logits, labels)
    temperatures = {}
    for pid, name in enumerate(PATTERN_NAMES):
        rows = patterns == pid
        if rows.sum() >= min_samples:
            temperatures[name] = fit_temperature(logits[rows], labels[rows])
        else:
            temperatures[name] = pooled
    return temperatures


def temperatures_for(patterns: np.ndarray, temperatures: dict[str, float]) -> np.ndarray:
    table = np.array([temperatures[name] for name in PATTERN_NAMES])
    return table[patterns]
