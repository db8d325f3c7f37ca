"""A model card's limitations: caveats read off a version's recorded figures (the weakest
class, a pattern whose calibration the test split can fault, capture changes that move
answers, classes the out-of-distribution flag flags more often, label conflicts with
training frames), then those every bundled version shares. Torch-free."""

from __future__ import annotations

from typing import Any

PATTERN_TITLES = {
    "all": "all inputs",
    "image_only": "image only",
    "partial": "partial fields",
    "tabular_only": "tabular only",
}
NOMINAL_FLAGGED = 0.05  # the out-of-distribution threshold lets 95 % of in-distribution pass
FLIP_NOTE = 0.02  # a capture change that flips more answers than this is listed


def limitations(
    manifest: Any,
    results: dict[str, Any] | None,
    decision: dict[str, Any] | None,
    twins: dict[str, Any] | None,
) -> list[str]:
    """Caveats read off the recorded figures, then the ones every version shares."""
    out: list[str] = []
    if results:
        first = next(iter(results["patterns"].values()))
        recall = {k: v for k, v in first["per_class_recall"].items() if v is not None}
        if recall:
            weakest = min(recall, key=recall.__getitem__)
            out.append(
                f"Weakest class: `{weakest}`, recall {recall[weakest]:.3f} with all inputs; "
                "its prediction set is where a clinician sees the uncertainty."
            )
        for pattern, r in results["patterns"].items():
            p = r.get("ece_15_calibrated_at_least")
            if p is not None and p < 0.1:
                out.append(
                    f"Calibration, {PATTERN_TITLES.get(pattern, pattern)}: ECE {r['ece_15']:.3f}; "
                    f"only {p:.1%} of perfectly calibrated draws on this split measure as much, "
                    "so some miscalibration is likely there."
                )
        changes = results.get("audit", {}).get("counterfactual", {}).get("changes", {})
        shifted = [
            f"{k} ({c['flip_rate']:.1%})" for k, c in changes.items() if c["flip_rate"] > FLIP_NOTE
        ]
        if shifted:
            out.append(
                f"Capture changes that change more than {FLIP_NOTE:.0%} of answers: "
                + ", ".join(shifted)
                + ". Frames from another site's capture set-up need checking there first."
            )
    ood = (decision or {}).get("ood")
    if ood and ood["in_distribution_flagged"] > NOMINAL_FLAGGED:
        out.append(
            f"The out-of-distribution flag flagged {ood['in_distribution_flagged']:.1%} of "
            f"in-distribution test inputs, above the nominal {NOMINAL_FLAGGED:.0%} "
            f"(p = {ood.get('p_as_many_flagged', float('nan')):.2f} under the fitted rule)."
        )
    by_class = (ood or {}).get("in_distribution_flagged_by_class", {})
    often = {k: f / n for k, (f, n) in by_class.items() if n and f / n > NOMINAL_FLAGGED}
    if often:
        out.append(
            "In-distribution inputs flagged out of distribution more often than "
            f"{NOMINAL_FLAGGED:.0%}, by true class: "
            + ", ".join(
                f"`{k}` {v:.1%} ({by_class[k][0]} of {by_class[k][1]})" for k, v in often.items()
            )
            + ". These cases are referred for the flag alone; the threshold is one for all "
            "classes ([decision support](decision.md))."
            + (
                " Each answer carries how often val inputs given its label were flagged "
                "(`ood.val_flagged`), shown beside the flag on the clinician page."
                if ood.get("val_flagged_by_label")
                else ""
            )
        )
    if twins and twins.get("conflicting"):
        out.append(
            f"{len(twins['conflicting'])} of the {twins['n']} test frames have a near-identical "
            f"training frame (correlation above {twins['threshold']} as the model sees them) "
            "with another label ([twins](twins.md)): the labels themselves are uncertain there, "
            "and a model that learnt the training frame cannot be right on both."
        )
    dataset = manifest.raw.get("data", {}).get("dataset", manifest.name)
    out += [
        f"Trained and tested on the fixed splits of one public dataset (`{dataset}`); not "
        "validated on another hospital's data or prospectively. Validate on local cases "
        "before clinical use (`endofuse validate`, [local validation]"
        "(../../../validation.md)).",
        "Probabilities are calibrated on the validation split's class mix; a population with "
        "another mix shifts them.",
    ]
    return ["## Limitations", "", *(f"- {line}" for line in out), ""]
