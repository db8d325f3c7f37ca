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


def plot_flips(audits: dict[str, dict[str, Any]], path: Path) -> None:
    """Horizontal bars: share of frames whose class flips, per capture change and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    changes = list(next(iter(audits.values()))["changes"])
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(changes) * len(audits) + 1.5))
    height = 0.8 / len(audits)
    for k, (name, cf) in enumerate(audits.items()):
        rates = [100 * cf["changes"].get(c, {}).get("flip_rate", np.nan) for c in changes]
        ys = np.arange(len(changes)) + k * height
        ax.barh(ys, rates, height, label=name)
    ax.axvline(2.0, color="red", lw=0.8, ls="--", label="goal: 2 %")
    ax.set_yticks(np.arange(len(changes)) + 0.4 - height / 2, changes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("frames whose predicted class flips (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def audit_lines(results: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    audit = results["audit"]
    cf = audit["counterfactual"]
    base_cf = (baseline or {}).get("audit", {}).get("counterfactual")
    ours, theirs = results["model"], (baseline or {}).get("model", "")
    lines = [
        "## Capture-shift audit",
        "",
        f"Scored by {audit['scored_by']}. Each of "
        + (
            f"the {cf['n']} {results['split']} frames"
            if cf["n"] >= results["patterns"]["all"]["n"]
            else f"{cf['n']} {results['split']} frames (a stratified subset, same every run)"
        )
        + " is "
        "re-captured under a change that carries no diagnosis (`training/audit.py`); a flip is a "
        "predicted class that differs from the one given for the frame as stored.",
        "",
    ]
    # A label rule other than the argmax: its argmax flips beside, to tell how much of a flip
    # rate is the rule naming a class on weak evidence.
    argmax = all("argmax_flips" in r for r in cf["changes"].values())
    if argmax:
        lines[-2] += (
            f" Labels are named by the `{results.get('label_rule', 'argmax')}` rule; *argmax "
            "flips* count the frames whose most probable class changes."
        )

    def flips(r: dict[str, Any] | None) -> str:
        return f"{100 * r['flip_rate']:.1f} % ({r['flips']})" if r else "—"

    head = ["change", f"flips {ours}" if base_cf else "flips"]
    if argmax:
        head.append(f"argmax flips {ours}" if base_cf else "argmax flips")
    head.append(f"macro-F1 {ours}" if base_cf else "macro-F1")
    if base_cf:
        head += [f"flips {theirs}", f"macro-F1 {theirs}"]
    stored = ["(frame as stored)", "—"] + (["—"] if argmax else [])
    stored.append(f"{cf['original']['macro_f1']:.4f}")
    if base_cf:
        stored += ["—", f"{base_cf['original']['macro_f1']:.4f}"]
    rows = [stored]
    for change, r in cf["changes"].items():
        cells = [change, flips(r)]
        if argmax:
            cells.append(f"{100 * r['argmax_flips'] / cf['n']:.1f} % ({r['argmax_flips']})")
        cells.append(f"{r['macro_f1']:.4f}")
        if base_cf:
            b = base_cf["changes"].get(change)
            cells += [flips(b), f"{b['macro_f1']:.4f}" if b else "—"]
        rows.append(cells)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += [
        "",
        f"Worst change: flip rate {100 * cf['worst_flip_rate']:.1f} %, "
        f"macro-F1 {cf['worst_macro_f1']:.4f}.",
        "",
        "![flip rate per capture change](flips.png)",
        "",
        "### Capture metadata alone",
        "",
        "How well the label is predicted from capture features only (frame size and aspect, "
        "where the field of view sits, border blackness per side and corner, bright marks "
        "outside the field of view, the blanked lower-left box): multinomial logistic "
        f"regression fitted on the train split, scored on {results['split']}. Measured on the "
        "frame as captured (the risk in the data) and on the model's input after "
        "preprocessing (what the preprocessing leaves of it).",
        "",
        "| features from | accuracy | balanced acc. | macro-F1 |",
        "|---|---|---|---|",
    ]
    meta = audit["metadata"]
    for where in ("frame as captured", "model input"):
        m = meta[where]
        lines.append(
            f"| {where} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | "
            f"{m['macro_f1']:.4f} |"
        )
    lines += ["", f"Majority class alone: accuracy {meta['majority_class_accuracy']:.4f}.", ""]
    return lines


def write_report(
    results: dict[str, Any], out: Path, manifest: Manifest, baseline_path: Path | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    baseline = json.loads(baseline_path.read_text()) if baseline_path else None
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
        "Measured with `"
        + results.get("command", f"endofuse evaluate models/{results['model']}")
        + "` "
        "on the exported ONNX graph (ONNX Runtime, CPU), images decoded by the serving "
        "preprocessing path.",
        "",
        f"Preprocessing version {results.get('preprocessing', {}).get('version', 1)}. "
        f"Labels named by the manifest's label rule: `{results.get('label_rule', 'argmax')}`"
        " (accuracy, macro-F1, balanced accuracy and recall score those labels; AUROC and "
        "ECE the probabilities).",
        "",
        "| pattern | n | accuracy | macro-F1 | balanced acc. | AUROC "
        "| ECE (after T) | ECE (before T) | ECE if perfectly calibrated "
        "| calibrated draws at or above the ECE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pattern, r in results["patterns"].items():
        floor = r.get("ece_15_floor")
        at_least = r.get("ece_15_calibrated_at_least")
        lines.append(
            f"| {pattern} | {r['n']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['balanced_accuracy']:.4f} | {r['auroc_macro_ovr']:.4f} | {r['ece_15']:.4f} | "
            f"{r['ece_15_before_temperature']:.4f} | "
            + (f"{floor[0]:.4f} (95 %: {floor[1]:.4f}) | " if floor else "— | ")
            + (f"{100 * at_least:.1f} % |" if at_least is not None else "— |")
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
        "`partial` = a random half of each row's recorded fields withheld. "
        "*ECE if perfectly calibrated*: the mean (and 95th percentile) ECE of labels drawn "
        "from the model's own probabilities, the estimator's floor at this n "
        "(`training.metrics.ece_floor`), over 1,000 draws; *calibrated draws at or above the "
        "ECE*: the share of them that measure at least the model's ECE (a p-value: under "
        "5 % says the model is miscalibrated, more says this test split cannot tell)"
        + (
            f"; labels drawn once per `{results['ece_floor_groups']}`, as a lesion's images "
            "share one diagnosis (fewer independent labels, a higher floor)."
            if results.get("ece_floor_groups")
            else "."
        ),
        "",
        "![confusion matrix](confusion.png)",
        "",
        "![reliability diagrams](reliability.png)",
        "",
    ]
    if "audit" in results:
        audits = {results["model"]: results["audit"]["counterfactual"]}
        if baseline and "audit" in baseline:
            audits[baseline["model"]] = baseline["audit"]["counterfactual"]
        plot_flips(audits, out / "flips.png")
        lines += audit_lines(results, baseline)
    if baseline:
        lines += baseline_lines(results, baseline)
    (out / "report.md").write_text("\n".join(lines))


def baseline_lines(results: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    lines = [
        f"## {results['model']} next to {baseline['model']} ({results['split']} split)",
        "",
        "| pattern | metric | " + f"{results['model']} | {baseline['model']} |",
        "|---|---|---|---|",
    ]
    for pattern, r in results["patterns"].items():
        b = baseline["patterns"].get(pattern)
        if b is None:
            continue
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "auroc_macro_ovr", "ece_15"):
            lines.append(f"| {pattern} | {key} | {r[key]:.4f} | {b[key]:.4f} |")
    return [*lines, ""]
