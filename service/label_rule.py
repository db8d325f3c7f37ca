"""Which class a response names as its ``label``. Torch-free: serving and evaluation share it.

``argmax``: the most probable class. ``balanced``: the class most probable *relative to its
share of the training data*, argmax_k p(k | x) / pi_k. For probabilities calibrated to the
natural class mix pi, that is the Bayes decision for balanced accuracy, where every class's
recall counts the same (the logit adjustment of Menon et al., ICLR 2021). It names a rare
class (melanoma) on weaker evidence than a common one (naevus), which is the trade a
dermatology triage wants; the probabilities themselves stay calibrated and unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("argmax", "balanced")


@dataclass(frozen=True)
class LabelRule:
    kind: str = "argmax"
    prior: tuple[float, ...] | None = None  # training class shares; ``balanced`` only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"label rule must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "balanced" and (not self.prior or min(self.prior) <= 0):
            raise ValueError("the balanced label rule needs a positive class prior")

    @classmethod
    def from_manifest(cls, raw: dict[str, Any] | None, n_classes: int) -> LabelRule:
        if not raw:
            return cls()  # manifests written before the rule existed: the most probable
        prior = tuple(float(p) for p in raw["class_prior"]) if "class_prior" in raw else None
        if prior is not None and len(prior) != n_classes:
            raise ValueError(f"class_prior has {len(prior)} entries for {n_classes} labels")
        return cls(str(raw["kind"]), prior)

    @classmethod
    def balanced(cls, labels: np.ndarray, n_classes: int) -> LabelRule:
        """The rule for a model trained on ``labels`` (the training split's class indices)."""
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        return cls("balanced", tuple((counts / counts.sum()).tolist()))

    def to_manifest(self, source: str) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.prior is not None:
            out["class_prior"] = [round(p, 6) for p in self.prior]
            out["prior_from"] = source
        return out

    def pick(self, probs: np.ndarray) -> np.ndarray:
        """Class index per row of ``probs`` ([N, K] -> [N]; [K] -> a 0-d array)."""
        if self.kind == "argmax":
            return np.argmax(probs, axis=-1)
        return np.argmax(np.asarray(probs, np.float64) / np.asarray(self.prior), axis=-1)
