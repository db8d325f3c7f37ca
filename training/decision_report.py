"""The decision report of one model version (``endofuse decision``): prediction sets of both
kinds per pattern and level on the test split, referral, and the out-of-distribution study,
as ``decision.md``, ``decision.json`` and ``decision.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training import decision_plots, ood


def _confidence_text(report: dict[str, Any]) -> str:
    c = report.get("class_confidence")
    if not c:
        return ""
    return (
        f", each class's threshold raised until it reaches the level with probability {c:g} "
        "over the val draw"
    )


def _threshold_text(confidence: float | None) -> str:
    if not confidence:
        return (
            "the split-conformal 95 % quantile of val (a new in-distribution input passes "
            "with probability at least 0.95, on average over val draws)."
        )
    return (
        "a val order statistic at or above the split-conformal 95 % quantile, chosen so that "
        "a new in-distribution input passes with probability at least 0.95 for "
        f"{100 * confidence:.0f} % of val draws (at the plain quantile, about half of them "
        "fall short)."
    )


def _against_val_text(o: dict[str, Any]) -> str:
    if "p_as_many_flagged" not in o:
        return ""
    return (
        f" On val, {o['val_above']} of {o['n_val']} lie above the threshold; were the test "
        f"inputs drawn as val was, {100 * o['in_distribution_flagged']:.1f} % or more would be "
        f"flagged with probability {100 * o['p_as_many_flagged']:.0f} % (beta-binomial: the "
        "threshold's own pass rate varies with the val draw)."
    )


def _shift_text(ood_report: dict[str, Any]) -> str:
    rates = ood_report.get("capture_shift_flagged")
    if not rates:
        return ""
    listed = ", ".join(f"`{k}` {100 * v:.1f} %" for k, v in rates.items())
    return (
        " Each feature layer's share of 200 val frames flagged at its own val threshold once "
        f"re-captured (16:9 letterbox + JPEG 40): {listed}; a layer above "
        f"{100 * ood.SHIFT_TOLERANCE:.0f} % reads the capture and is left out of the score; "
        "of the layers that pass, the narrowest is used (the cheapest to compute)."
        + _unused_text(ood_report.get("unused", {}))
    )


def _unused_text(unused: dict[str, str]) -> str:
    if not unused:
        return ""
    listed = "; ".join(f"`{k}`: {why}" for k, why in unused.items())
    return f" Taken out of the graph: {listed}."


def _sets_table(report: dict[str, Any], measured: dict[str, Any]) -> list[str]:
    lines = [
        "| pattern | coverage asked | coverage got | worst class | mean set size | "
        "referred | accuracy not referred | accuracy, all cases |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pattern, levels in measured.items():
        for level, r in levels.items():
            per_class = [c for c in r["class_coverage"] if c is not None]
            worst = min(per_class) if per_class else float("nan")
            name = report["labels"][r["class_coverage"].index(worst)] if per_class else "—"
            acc = r["accuracy_not_referred"]
            lines.append(
                f"| {pattern} | {level} | {r['coverage']:.3f} | {worst:.3f} ({name}) | "
                f"{r['mean_set_size']:.2f} | {100 * r['referral_rate']:.1f} % | "
                f"{'—' if acc is None else f'{acc:.3f}'} | {r['accuracy_all']:.3f} |"
            )
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decision.json").write_text(json.dumps(report, indent=2))
    decision_plots.plot(report, out / "decision.png")
    lines = [
        f"# {report['model']} — prediction sets and referral (test split)",
        "",
        f"Measured with `endofuse decision models/{report['model']}`: thresholds fitted on val "
        f"(score `{report['score']}`; class-conditional{_confidence_text(report)}, and "
        "marginal), applied "
        "to the test split by the service's own code (`service/decision.py`). The class the "
        "label rule "
        f"(`{report.get('label_rule', 'argmax')}`) names is always in the set, and the "
        "thresholds count those cases as covered. A case is referred when its set "
        "holds more than one class; *accuracy not referred* is the accuracy of the named "
        "class on the rest, *accuracy, all cases* on every case.",
        "",
        "Sets `class` (the default, `?sets=class`): one threshold per class.",
        "",
        *_sets_table(report, report["test"]),
    ]
    if "test_marginal" in report:
        lines += [
            "",
            "Sets `marginal` (`?sets=marginal`): one threshold for every class, so the "
            "coverage holds on average over cases and a rare class may get less.",
            "",
            *_sets_table(report, report["test_marginal"]),
        ]
    if "ood" in report:
        o = report["ood"]
        lines += [
            "",
            "## Out-of-distribution flag",
            "",
            f"Score: {o.get('score', 'energy of the logits')}; threshold: "
            + _threshold_text(o.get("pass_confidence"))
            + " "
            "AUROC: in-distribution test inputs against each set (1.0 = always told apart). "
            f"In-distribution test inputs flagged: {100 * o['in_distribution_flagged']:.1f} % "
            f"(n = {o['n_in']}).{_against_val_text(o)}{_shift_text(o)}",
            "",
            "| inputs | n | AUROC | flagged |",
            "|---|---|---|---|",
        ]
        for name, r in o["sets"].items():
            lines.append(f"| {name} | {r['n']} | {r['auroc']:.3f} | {100 * r['flagged']:.1f} % |")
        by_class = o.get("in_distribution_flagged_by_class")
        if by_class:
            lines += [
                "",
                "In-distribution test inputs flagged, by their true class (a class flagged "
                "more often than the others is referred more often for the flag alone):",
                "",
                *_share_table("class", by_class),
            ]
        by_label = o.get("val_flagged_by_label")
        if by_label:
            lines += [
                "",
                "Val inputs flagged, by the label the response names (each answer carries its "
                "label's row as `ood.val_flagged`, so that a flag on a label the flag often "
                "marks is read as weaker evidence):",
                "",
                *_share_table("label named", by_label),
            ]
    lines += ["", "![Referral trade-off and out-of-distribution ROC](decision.png)"]
    (out / "decision.md").write_text("\n".join(lines) + "\n")


def _share_table(column: str, counts: dict[str, list[int]]) -> list[str]:
    return [
        f"| {column} | flagged | n | share |",
        "|---|---|---|---|",
        *(
            f"| {label} | {k} | {n} | {100 * k / max(n, 1):.1f} % |"
            for label, (k, n) in counts.items()
        ),
    ]
