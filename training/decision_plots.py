"""The decision report's figure: what referring more cases buys in accuracy (per missingness
pattern, with the conformal operating points marked), and how well the out-of-distribution
score separates each kind of foreign input (ROC curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

RATES = np.linspace(0.0, 0.9, 46)


def selective_curve(probs: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Accuracy on the cases kept when the least confident share is referred."""
    order = np.argsort(-probs.max(1), kind="stable")
    correct = (probs.argmax(1) == labels)[order]
    kept = [max(1, round(len(order) * (1 - r))) for r in RATES]
    return {
        "referral": [float(r) for r in RATES],
        "accuracy": [float(correct[:k].mean()) for k in kept],
    }


def roc_points(inside: np.ndarray, outside: np.ndarray, n: int = 101) -> dict[str, list[float]]:
    """False and true positive rates of ``score > t`` over the pooled score quantiles."""
    pooled = np.concatenate([inside, outside])
    finite = pooled[np.isfinite(pooled)]
    cuts = np.quantile(finite, np.linspace(0, 1, n)) if finite.size else np.array([0.0])
    cuts = np.concatenate([[-np.inf], cuts, [np.inf]])
    return {
        "fpr": [float((inside > t).mean()) for t in cuts],
        "tpr": [float((outside > t).mean()) for t in cuts],
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ood = "ood" in report and report["ood"].get("roc")
    fig, axes = plt.subplots(1, 2 if has_ood else 1, figsize=(11 if has_ood else 5.5, 4.2))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    for pattern, curve in report["curves"].items():
        (line,) = ax.plot(curve["referral"], curve["accuracy"], label=pattern)
        for level, r in report["test"][pattern].items():
            if r["accuracy_not_referred"] is not None:
                ax.plot(r["referral_rate"], r["accuracy_not_referred"], "o",
                        color=line.get_color(), ms=5)  # fmt: skip
                ax.annotate(level, (r["referral_rate"], r["accuracy_not_referred"]),
                            fontsize=7, xytext=(3, -9), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("share of cases referred (least confident first)")
    ax.set_ylabel("accuracy on the cases kept")
    ax.set_title("Referral trade-off (dots: prediction sets of one class, by coverage)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_ood:
        ax = axes[1]
        for name, roc in report["ood"]["roc"].items():
            auc = report["ood"]["sets"][name]["auroc"]
            ax.plot(roc["fpr"], roc["tpr"], label=f"{name[:38]} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("in-distribution test inputs flagged")
        ax.set_ylabel("foreign inputs flagged")
        ax.set_title("Out-of-distribution score, ROC per kind of input (AUROC)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report['model']}: decision support on the test split", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
