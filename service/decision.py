"""Decision support from calibrated probabilities: a conformal prediction set at a stated
coverage, and whether to refer the case to a clinician. Torch-free; the parameters are fitted
on the validation split (``training/conformal.py``) and travel in the manifest's
``decision`` block.

Split conformal prediction, per missingness pattern: a class is in the set when its
nonconformity score is at most that class's threshold. With class-conditional (Mondrian)
thresholds every class, rare ones included, gets the stated coverage on its own cases (sets
``class``, the default); with one threshold for all classes the coverage holds on average
over cases, and the sets are smaller (sets ``marginal``).

Out of distribution: a graph may output ``ood_distance``, the Mahalanobis distance of image
features to the nearest class mean (Lee et al., NeurIPS 2018) or, in newer fits, to the
nearest of several k-means prototypes per class, one column per feature layer;
it sees what the logits cannot (another modality that still lands confidently on one class).
The engine appends those columns to the logits row. The manifest names the signals the score
combines, each scaled so that its val median is 0 and its own 95 % quantile is 1, and the
score is the largest. A graph without a distance scores the energy of its logits,
-logsumexp(z) (Liu et al., NeurIPS 2020), high when no class fits. Per pattern, the threshold
lets 95 % of in-distribution inputs pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import InvalidRequest


def nonconformity(probs: np.ndarray, kind: str) -> np.ndarray:
    """Score of every class for each row [N, K]: low when the class is plausible.

    ``lac``: 1 - p_k. ``aps``: the probability mass of the classes at least as likely as k
    (k included), so a set grows from the most likely class down.
    """
    if kind == "lac":
        return 1.0 - probs
    if kind == "aps":
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=1).cumsum(axis=1)
        scores = np.empty_like(probs)
        np.put_along_axis(scores, order, ranked, axis=1)
        return scores
    raise ValueError(f"unknown nonconformity score {kind!r}")


def pattern_of(image: bool, used: int, n_fields: int) -> str:
    """The missingness pattern of one request, by the rule the graph and training use."""
    if not image:
        return "tabular_only"
    if n_fields == 0 or used == n_fields:
        return "all"
    return "image_only" if used == 0 else "partial"


@dataclass(frozen=True)
class DecisionParams:
    score: str  # "lac" | "aps"
    # pattern -> coverage level (as text, e.g. "0.9") -> per-class thresholds
    thresholds: dict[str, dict[str, list[float]]]
    levels: tuple[float, ...]
    # as ``thresholds``, one value for every class: marginal sets (absent in older manifests)
    marginal: dict[str, dict[str, list[float]]] | None = None
    ood_thresholds: dict[str, float] | None = None  # pattern -> score threshold
    # pattern -> signal ("energy", "distance", "distance_1", ...) -> (val median, val 95 %
    # quantile): the signals the score combines; absent: the score is the raw energy
    ood_scale: dict[str, dict[str, tuple[float, float]]] | None = None
    # pattern -> label named -> its ``val_flagged`` response row (``val_flagged_rows``)
    ood_val_flagged: dict[str, dict[str, dict[str, Any]]] | None = None
    _arrays: dict[tuple[str, str, str], np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_manifest(cls, raw: dict[str, Any] | None) -> DecisionParams | None:
        if not raw:
            return None
        ood = raw.get("ood")
        return cls(
            score=str(raw["score"]),
            thresholds={p: dict(v) for p, v in raw["thresholds"].items()},
            levels=tuple(float(level) for level in raw["levels"]),
            marginal=(
                {p: dict(v) for p, v in raw["marginal_thresholds"].items()}
                if raw.get("marginal_thresholds") else None
            ),
            ood_thresholds={p: float(t) for p, t in ood["thresholds"].items()} if ood else None,
            ood_scale=(
                {p: {k: (float(a), float(b)) for k, (a, b) in v.items()}
                 for p, v in ood["scale"].items()}
                if ood and ood.get("scale") else None
            ),
            ood_val_flagged=(
                {p: val_flagged_rows(v) for p, v in ood["val_flagged_by_label"].items()}
                if ood and ood.get("val_flagged_by_label") else None
            ),
        )  # fmt: skip

    def level_key(self, coverage: float) -> str:
        for level in self.levels:
            if level == coverage:  # exact: the levels are published as an enum
                return _key(level)
        raise InvalidRequest(
            f"coverage must be one of {', '.join(_key(v) for v in self.levels)} for this model"
        )

    def check_sets(self, sets: str) -> None:
        if sets not in SET_KINDS:
            raise InvalidRequest(f"sets must be one of {', '.join(SET_KINDS)}")
        if sets == "marginal" and self.marginal is None:
            raise InvalidRequest("this model version has no marginal sets fitted; use sets=class")

    def prediction_set(
        self,
        probs: np.ndarray,
        pattern: str,
        coverage: float,
        named: int | None = None,
        sets: str = "class",
    ) -> np.ndarray:
        """Boolean [K]: the classes that stay plausible at ``coverage``, always including the
        class the response names (``named``: by the label rule; default the most probable).
        Split conformal alone may exclude it (class-conditional thresholds are tight for
        common classes; a model more accurate than the coverage asked may get an empty set);
        adding it keeps sets nested across levels, and the fit counts those cases as covered
        (``training/conformal.py``), so the coverage stays the one stated."""
        key = (sets, pattern, self.level_key(coverage))
        q = self._arrays.get(key)
        if q is None:  # converted once per (sets, pattern, level), not on every request
            table = self.marginal if sets == "marginal" and self.marginal else self.thresholds
            q = self._arrays[key] = np.asarray(table[pattern][key[2]])
        members = nonconformity(probs[None], self.score)[0] <= q
        members[int(np.argmax(probs)) if named is None else named] = True
        return members


SET_KINDS = ("class", "marginal")


def val_flagged_rows(counts: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Per label named, how often the flag marked val inputs (all in distribution) named so,
    and val inputs of any label: a flag on a label it often marks is weaker evidence that the
    input is out of distribution."""
    total = sum(int(f) for f, _ in counts.values()), sum(int(n) for _, n in counts.values())
    every = round(total[0] / total[1], 4) if total[1] else None
    return {
        label: {
            "label": label,
            "flagged": int(f),
            "of": int(n),
            "share": round(int(f) / int(n), 4) if n else None,
            "share_all_labels": every,
        }
        for label, (f, n) in counts.items()
    }


def _key(level: float) -> str:
    return f"{level:g}"


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp over the last axis: high when no class explains the input."""
    top = logits.max(axis=-1, keepdims=True)
    return -(top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1)))


UNIFORM_STD = 3.0  # grey levels: below this the model input is one flat colour


def is_uniform(image: np.ndarray) -> bool:
    """A blank or single-colour model input: no tissue to read, whatever the logits say. The
    model's own signals miss these on HAM10000 (a flat colour lands near the class means).

    Exact, and cheap for almost every input (it runs per request): a subset of the pixels
    has a variance at most n / n_subset times that of them all (the mean minimises the sum
    of squares), so a subsample spread out by more than that settles it. A 1-in-64
    subsample settles every hyperkvasir-lgi val frame and 77 % of ham10000's, a 1-in-16 one
    99 %; only a near-flat subsample needs every pixel."""
    n = image.shape[0] * image.shape[1]
    for step in (8, 4):
        sub = image[::step, ::step]
        if channel_std(sub).max() >= UNIFORM_STD * np.sqrt(n / (sub.shape[0] * sub.shape[1])):
            return False
    return bool(channel_std(image).max() < UNIFORM_STD)  # spatial spread, per channel


_LEVELS = np.arange(256, dtype=np.float64)


def channel_std(image: np.ndarray) -> np.ndarray:
    """Standard deviation of each channel of a uint8 [H, W, 3] image, from its histogram:
    exact, and a seventh of the time of ``std`` over a float copy (it runs per request)."""
    flat = np.asarray(image, np.uint8).reshape(-1, 3)
    out = np.empty(3)
    for c in range(3):
        counts = np.bincount(flat[:, c], minlength=256).astype(np.float64)
        mean = counts @ _LEVELS / len(flat)
        out[c] = np.sqrt(counts @ (_LEVELS - mean) ** 2 / len(flat))
    return out


def ood_signals(row: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """The raw signals in a logits row (or rows): energy, and the graph's distances if any
    (``distance`` for its first feature layer, ``distance_1``, ... for the others)."""
    row = np.asarray(row, np.float64)
    out = {"energy": energy(row[..., :n_labels])}
    for j in range(row.shape[-1] - n_labels):
        out["distance" if j == 0 else f"distance_{j}"] = row[..., n_labels + j]
    return out


def ood_score(
    signals: dict[str, np.ndarray], scale: dict[str, tuple[float, float]] | None
) -> np.ndarray:
    """Energy alone, or the larger of the scaled signals that ``scale`` names."""
    if not scale:
        return signals["energy"]
    scaled = [(signals[k] - med) / max(q - med, 1e-9) for k, (med, q) in scale.items()]
    return np.max(scaled, axis=0)


def signal_column(key: str) -> int:
    """The ``ood_distance`` column a signal name reads: ``distance`` -> 0, ``distance_j`` -> j."""
    return 0 if key == "distance" else int(key.split("_")[1])


def request_ood_score(
    row: np.ndarray, n_labels: int, params: DecisionParams, pattern: str
) -> float:
    """``ood_score(ood_signals(row))`` for one request's row, on Python floats: the same
    arithmetic in float64 without a dozen numpy calls on a handful of values (it runs per
    request)."""
    scale = params.ood_scale.get(pattern) if params.ood_scale else None
    if not scale or "energy" in scale:
        row_energy = float(energy(np.asarray(row[:n_labels], np.float64)))
        if not scale:
            return row_energy

    def signal(key: str) -> float:
        return row_energy if key == "energy" else float(row[n_labels + signal_column(key)])

    return max((signal(k) - med) / max(q - med, 1e-9) for k, (med, q) in scale.items())


def decide(
    params: DecisionParams | None,
    labels: tuple[str, ...],
    probs: np.ndarray,
    pattern: str,
    coverage: float,
    confidence_floor: float,
    logits: np.ndarray | None = None,
    uniform_image: bool = False,
    named: int | None = None,
    sets: str = "class",
) -> dict[str, Any]:
    """Response fields: prediction set, its coverage, the out-of-distribution score, and the
    referral with its reason."""
    reasons: list[str] = []
    out: dict[str, Any] = {}
    if params is not None and params.ood_thresholds and logits is not None:
        score = request_ood_score(logits, len(labels), params, pattern)
        flagged = score > params.ood_thresholds[pattern]
        out["ood"] = {"score": round(score, 4), "flagged": bool(flagged or uniform_image)}
        label = labels[int(np.argmax(probs)) if named is None else named]
        row = (params.ood_val_flagged or {}).get(pattern, {}).get(label)
        if row is not None:
            out["ood"]["val_flagged"] = dict(row)
        if uniform_image:
            reasons.append("the image is blank or a single flat colour")
        elif flagged:
            reasons.append("the input does not look like the data the model was trained on")
    if params is not None:
        members = params.prediction_set(probs, pattern, coverage, named, sets)
        chosen = [labels[k] for k in sorted(np.flatnonzero(members), key=lambda k: -probs[k])]
        out["prediction_set"] = chosen
        out["coverage"] = coverage
        out["sets"] = sets
        if len(chosen) > 1:
            reasons.append(f"{len(chosen)} diagnoses remain plausible at this coverage")
    if float(probs.max()) < confidence_floor:
        reasons.append("top probability is below the confidence floor")
    out["refer"] = bool(reasons)
    out["reason"] = "; ".join(reasons) if reasons else None
    return out
