"""Evaluation report: results.json, report.md, confusion matrix and reliability diagrams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from service.manifest import Manifest


def plot_confusion(cm: list[list[int]], labels: tuple[str, ...], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(cm)
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(
        matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1
    )
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(patterns: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], patterns.items(), strict=True):
        for key, label, style in (
            (
                "reliability_before_temperature",
                f"before (ECE {r['ece_15_before_temperature']:.3f})",
                "o--",
            ),
            ("reliability", f"after (ECE {r['ece_15']:.3f})", "s-"),
        ):
            conf = [c for c in r[key]["confidence"] if c is not None]
            acc = [
                a
                for a, c in zip(r[key]["accuracy"], r[key]["confidence"], strict=True)
                if c is not None
            ]
            ax.plot(conf, acc, style, label=label, markersize=4)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path, manifest: Manifest) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slim = {
        **results,
        "patterns": {
            p: {k: v for k, v in r.items() if not k.startswith("reliability")}
            for p, r in results["patterns"].items()
        },
    }
    (out / "results.json").write_text(json.dumps(slim, indent=2))
    all_pattern = results["patterns"]["all"]
    plot_confusion(
        all_pattern["confusion"],
        manifest.labels,
        f"{results['model']} {results['split']} (all inputs)",
        out / "confusion.png",
    )
    plot_reliability(results["patterns"], out / "reliability.png")
    lines = [
        f"# {results['model']} — {results['split']} split",
        "",
        f"Measured with `endofuse evaluate models/{results['model']} --split {results['split']}` "
        "on the exported ONNX graph (ONNX Runtime, CPU), images decoded by the serving "
        "preprocessing path.",
        "",
        "| pattern | n | accuracy | macro-F1 | balanced acc. | AUROC "
        "| ECE (after T) | ECE (before T) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pattern, r in results["patterns"].items():
        lines.append(
            f"| {pattern} | {r['n']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['balanced_accuracy']:.4f} | {r['auroc_macro_ovr']:.4f} | {r['ece_15']:.4f} | "
            f"{r['ece_15_before_temperature']:.4f} |"
        )
    lines += ["", "Per-class recall (all inputs):", "", "| class | recall | F1 |", "|---|---|---|"]
    for name in manifest.labels:
        lines.append(
            f"| {name} | {all_pattern['per_class_recall'][name]:.4f} | "
            f"{all_pattern['per_class_f1'][name]:.4f} |"
        )
    lines += [
        "",
        "Patterns: `all` = every input as recorded (fields missing in the data stay missing); "
        "`image_only` = all tabular fields withheld; `tabular_only` = image withheld; "
        "`partial` = a random half of each row's recorded fields withheld.",
        "",
        "![confusion matrix](confusion.png)",
        "",
        "![reliability diagrams](reliability.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
