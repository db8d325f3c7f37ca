"""The validation report's figure: the site's reliability diagram, and recall per class at
the site beside the test split's."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, ref = r["figures"], r["reference"]["figures"] or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rel = f["reliability"]
    points = [
        (c, a) for c, a in zip(rel["confidence"], rel["accuracy"], strict=True) if c is not None
    ]
    left.plot(
        [c for c, _ in points],
        [a for _, a in points],
        "s-",
        markersize=4,
        label=f"this site (ECE {f['ece_15']:.3f})",
    )
    left.plot([0, 1], [0, 1], color="grey", lw=0.8)
    left.set_xlabel("confidence")
    left.set_ylabel("accuracy")
    left.set_title("reliability")
    left.legend(loc="upper left", fontsize=8)
    names = [k for k, n in r["per_class_n"].items() if n]
    x = range(len(names))
    right.bar(
        [i - 0.2 for i in x], [f["per_class_recall"][k] for k in names], 0.4, label="this site"
    )
    if "per_class_recall" in ref:
        right.bar(
            [i + 0.2 for i in x],
            [ref["per_class_recall"][k] for k in names],
            0.4,
            label="test split",
        )
    right.set_xticks(list(x), [f"{k}\n(n={r['per_class_n'][k]})" for k in names], fontsize=8)
    right.set_ylim(0, 1.05)
    right.set_title("recall per class")
    right.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"local validation: {r['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
