"""Temperature scaling, one temperature per missingness pattern, fitted on validation logits
(and the training split's, where cross-validation on val says they help).

A missing modality changes how confident the model should be, so one temperature for all
inputs leaves some patterns over- or under-confident.
"""

from __future__ import annotations

import numpy as np

from training.patterns import PATTERN_NAMES

METHOD = (
    "per missingness pattern: temperature scaling (TS), or temperature plus per-class biases "
    "(BCTS), fitted on the val split or on the training split plus val, whichever has the "
    "lowest cross-validated val NLL (folds keep a group whole); "
    "probabilities = softmax(logits / T + b)"
)


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


# --- bias-corrected temperature scaling ---------------------------------------------------
# p = softmax(z / T + b): the per-class biases undo a class prior that training shifted
# (class-balanced sampling), which one temperature cannot (Alexandari et al., ICML 2020).


def calibrated(logits: np.ndarray, temperature: float, bias: np.ndarray | None) -> np.ndarray:
    z = logits / temperature + (0 if bias is None else bias)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_bcts(
    logits: np.ndarray, labels: np.ndarray, ridge: float = 1e-3, steps: int = 50
) -> tuple[float, np.ndarray]:
    """(T, b) minimising NLL. In (1/T, b) the NLL is convex; damped Newton steps, a small
    ridge on b fixes its shift invariance and keeps rare classes' biases finite."""
    n, k = logits.shape
    theta = np.concatenate([[1.0 / fit_temperature(logits, labels)], np.zeros(k)])
    onehot = np.eye(k)[labels]

    def loss(t: np.ndarray) -> float:
        p = calibrated(logits, 1.0 / t[0], t[1:])
        return float(-np.log(np.clip(p[np.arange(n), labels], 1e-12, 1)).mean()) + ridge * (
            t[1:] @ t[1:]
        )

    for _ in range(steps):
        p = calibrated(logits, 1.0 / theta[0], theta[1:])
        r = p - onehot
        grad = (
            np.concatenate([[np.sum(r * logits) / n], r.mean(0)]) + np.r_[0, 2 * ridge * theta[1:]]
        )
        # Hessian of the mean NLL: sum_i J_i^T (diag p_i - p_i p_i^T) J_i / n, J_i = [z_i | I].
        pz = (p * logits).sum(1)
        h_aa = np.mean((p * logits**2).sum(1) - pz**2)
        h_ab = np.mean(p * logits - p * pz[:, None], axis=0)
        h_bb = (np.diag(p.sum(0)) - p.T @ p) / n + 2 * ridge * np.eye(k)
        hess = np.block([[np.array([[h_aa]]), h_ab[None]], [h_ab[:, None], h_bb]])
        step = np.linalg.solve(hess + 1e-9 * np.eye(k + 1), grad)
        current, scale = loss(theta), 1.0
        while scale > 1e-4 and (
            theta[0] - scale * step[0] <= 0 or loss(theta - scale * step) > current
        ):
            scale /= 2
        if scale <= 1e-4:
            break
        theta = theta - scale * step
        if np.abs(scale * step).max() < 1e-7:
            break
    return float(1.0 / theta[0]), theta[1:]


def _half(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """One fold of a 2-fold split, as a mask. With ``groups`` (a lesion's images) a group
    never straddles the folds: its rows share a diagnosis, and without an image they are
    the same input, so a split through them lets a calibrator score on what it was fitted to."""
    if groups is None:
        half = np.zeros(n, bool)
        half[rng.permutation(n)[: n // 2]] = True
        return half
    ids = np.unique(groups)
    return np.isin(groups, rng.permutation(ids)[: len(ids) // 2])


def _fit(
    logits: np.ndarray, labels: np.ndarray, with_bias: bool
) -> tuple[float, np.ndarray | None]:
    if with_bias:
        return fit_bcts(logits, labels)
    return fit_temperature(logits, labels), None


def _cv_nll(
    logits: np.ndarray,
    labels: np.ndarray,
    with_bias: bool,
    groups: np.ndarray | None = None,
    repeats: int = 5,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Repeated 2-fold cross-validated NLL: a fair comparison between methods of different
    size. One split decides by chance where the two differ little; the mean of several
    does not. With ``extra`` (training rows), every fit also gets them; only val rows
    are scored."""
    total = 0.0
    for seed in range(repeats):
        half = _half(len(labels), groups, np.random.default_rng(seed))
        for fit_rows, test_rows in ((half, ~half), (~half, half)):
            lg, y = logits[fit_rows], labels[fit_rows]
            if extra is not None:
                lg, y = np.concatenate([extra[0], lg]), np.concatenate([extra[1], y])
            t, b = _fit(lg, y, with_bias)
            p = calibrated(logits[test_rows], t, b)[np.arange(test_rows.sum()), labels[test_rows]]
            total += float(-np.log(np.clip(p, 1e-12, 1)).sum())
    return total / (repeats * len(labels))


def choose(
    logits: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Cross-validated val NLL of each candidate: ``TS`` / ``BCTS`` fitted on val, and with
    ``extra`` the same fitted on the training rows plus val (``TS+train``, ``BCTS+train``).

    Training logits are in-sample: a fine-tuned backbone is overconfident on its own
    training images, and fitted there a calibrator learns that overconfidence. Without an
    image the model reads three fields through a small network that memorises little, and
    then the training rows are five times more data for the same few parameters. Only val
    rows are scored, so the comparison says which of the two holds."""
    k = logits.shape[1]
    bias_ok = len(np.unique(labels)) == k
    out = {"TS": _cv_nll(logits, labels, False, groups)}
    if bias_ok:
        out["BCTS"] = _cv_nll(logits, labels, True, groups)
    if extra is not None and len(extra[1]):
        out["TS+train"] = _cv_nll(logits, labels, False, groups, extra=extra)
        if bias_ok or len(np.unique(extra[1])) == k:
            out["BCTS+train"] = _cv_nll(logits, labels, True, groups, extra=extra)
    return out


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    patterns: np.ndarray,
    min_samples: int = 30,
    groups: np.ndarray | None = None,
    train: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, dict]:
    """Per pattern: temperature alone or temperature + class biases, fitted on val or on the
    training rows ``train`` (logits, labels, pattern ids) plus val, whichever has the lowest
    cross-validated val NLL (folds kept whole by ``groups`` where rows come in groups); a
    pattern too rare to fit uses the pooled temperature. ``cv_nll`` records each candidate."""
    k = logits.shape[1]
    pooled = {"temperature": fit_temperature(logits, labels), "bias": [0.0] * k, "method": "TS"}
    out = {}
    for pid, name in enumerate(PATTERN_NAMES):
        rows = patterns == pid
        lg, y = logits[rows], labels[rows]
        g = None if groups is None else groups[rows]
        if rows.sum() < min_samples:
            out[name] = dict(pooled, data="val")
            continue
        extra = None
        if train is not None:
            extra = (train[0][train[2] == pid], train[1][train[2] == pid])
        scores = choose(lg, y, g, extra)
        best = min(scores, key=scores.__getitem__)
        method, _, with_train = best.partition("+")
        if with_train:
            lg, y = np.concatenate([extra[0], lg]), np.concatenate([extra[1], y])
        t, b = _fit(lg, y, method == "BCTS")
        out[name] = {
            "temperature": t,
            "bias": [0.0] * k if b is None else b.tolist(),
            "method": method,
            "data": "train+val" if with_train else "val",
            "cv_nll": {key: round(v, 5) for key, v in scores.items()},
        }
    return out
