"""What a site's validation run found (``training.validate``): its figures beside the
version's test figures, and each difference judged against what sampling alone would give.

A finding is raised at p < 0.01 (one-sided), where p is how often a site whose cases were
drawn as the version's own test split would show a difference at least as large: the
prediction sets' coverage (binomial at the stated level, overall and per class), the
calibration (the ECE a perfectly calibrated model measures on these very cases), the share
flagged out of distribution (beta-binomial against the val draw the threshold was fitted on),
and balanced accuracy (bootstrap over the site's cases).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data import DatasetError, Table
from training.metrics import (
    calibrated_eces,
    confusion,
    floor_of,
    label_scores,
    reliability,
    summarize,
)
from training.ranks import binomial_at_most, exceed_tail

ALPHA = 0.01
NEW_SHAPE = 0.1  # the share of frames of an unknown width/height ratio raised as a finding
RATIO_TOLERANCE = 0.02  # relative: a width/height ratio this close to a training one is not new
COMMON_SHAPE = 0.01  # the share of training frames a width/height ratio needs to count as known
REPO = Path(__file__).resolve().parent.parent
FIGURES = (
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
    ("accuracy", "accuracy"),
    ("ece_15", "ECE (15 bins)"),
)


def reference(manifest: Any) -> tuple[dict[str, Any], str]:
    """The version's own test figures per pattern: its evaluation report where the repository
    has one of this very graph (scored as served, by its label rule), else the manifest's
    (before export). A graph exported under a bundled version's name and number is not the
    bundled one: the model file's hash tells them apart."""
    path = REPO / "docs" / "models" / manifest.name / manifest.version / "results.json"
    bundled = REPO / "models" / manifest.name / manifest.version / "manifest.json"
    mine = _graph_hash(manifest.raw)
    if path.is_file() and mine is not None and mine == _graph_hash(_read(bundled)):
        return json.loads(path.read_text())["patterns"], f"test split ({path.relative_to(REPO)})"
    figures = {k: v for k, v in manifest.raw.get("metrics", {}).items() if isinstance(v, dict)}
    other = ", not the bundled graph's report" if path.is_file() else ""
    return figures, f"test split (manifest{other})"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _graph_hash(raw: dict[str, Any]) -> str | None:
    return raw.get("files", {}).get("model.onnx", {}).get("sha256")


def bootstrap(
    labels: np.ndarray, named: np.ndarray, k: int, draws: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """95 % intervals of balanced accuracy and macro-F1 over resampled cases."""
    rng = np.random.default_rng(seed)
    got: dict[str, list[float]] = {"balanced_accuracy": [], "macro_f1": []}
    for _ in range(draws):
        i = rng.integers(0, len(labels), len(labels))
        recall, f1, present = label_scores(confusion(labels[i], named[i], k))
        got["balanced_accuracy"].append(float(recall[present].mean()))
        got["macro_f1"].append(float(f1[present].mean()))
    return {k: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] for k, v in got.items()}


def set_figures(answers: Any, labels: np.ndarray, names: tuple[str, ...], level: float) -> dict:
    covered = answers.sets[np.arange(len(labels)), labels]
    per_class = {}
    for k, name in enumerate(names):
        c, n = int(covered[labels == k].sum()), int((labels == k).sum())
        if n:
            per_class[name] = {"covered": c, "n": n, "p_below": binomial_at_most(n, c, level)}
    size = answers.sets.sum(1)
    return {
        "level": level,
        "coverage": float(covered.mean()),
        "p_below": binomial_at_most(len(labels), int(covered.sum()), level),
        "per_class": per_class,
        "mean_set_size": float(size.mean()),
        "referral_rate": float(((size > 1) | answers.flagged).mean()),
    }


def ood_figures(manifest: Any, answers: Any, labels: np.ndarray) -> dict[str, Any]:
    ood = manifest.raw["decision"]["ood"]
    val = ood.get("val_flagged_by_label", {})
    out: dict[str, Any] = {"patterns": {}, "by_class": {}}
    for pattern in sorted(set(answers.patterns)):
        mine = np.array([p == pattern for p in answers.patterns])
        k, m = int(answers.flagged[mine].sum()), int(mine.sum())
        counts = val.get(pattern)
        if counts:  # judged against the val draw the threshold was fitted on
            above, n = sum(f for f, _ in counts.values()), sum(c for _, c in counts.values())
            p_more = exceed_tail(n, n - above, m, k)
            expected = above / n
        else:  # fitted before the counts were kept: against the nominal rate
            expected = 1 - ood["pass_rate"]
            p_more = 1 - binomial_at_most(m, k - 1, expected)
        out["patterns"][pattern] = {"flagged": k, "n": m, "val_share": expected, "p_more": p_more}
    for c, name in enumerate(manifest.labels):
        if (labels == c).any():
            out["by_class"][name] = [
                int(answers.flagged[labels == c].sum()),
                int((labels == c).sum()),
            ]
    return out


def capture(manifest: Any, table: Table) -> dict[str, Any]:
    """Frame sizes at the site, and the share of frames with a size, a width/height ratio or
    a pixel count that the training frames seldom or never had (the captures the audit
    re-creates)."""

    def sizes(paths: list[Path]) -> list[tuple[int, int]]:
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(im.size)
        return out

    site = sizes(table.paths)
    found: dict[str, Any] = {"top_sizes": Counter(f"{w}x{h}" for w, h in site).most_common(5)}
    try:
        from training.evaluate import manifest_split

        train = sizes(manifest_split(manifest, "train").paths)
    except (DatasetError, KeyError, OSError):
        return found | {"training_sizes": None}
    # A shape one training frame in a thousand had taught the model little: only shapes of
    # at least COMMON_SHAPE of the training frames count as known.
    counts = Counter(round(w / h, 3) for w, h in train)
    known = np.array(
        [r for r, c in counts.items() if c >= COMMON_SHAPE * len(train)] or list(counts)
    )
    nearest = [np.min(np.abs(known - w / h)) / (w / h) for w, h in site]
    trained = set(train)
    found["training_sizes"] = len(trained)
    found["new_size_share"] = float(np.mean([s not in trained for s in site]))
    found["new_ratio_share"] = float(np.mean(np.asarray(nearest) > RATIO_TOLERANCE))
    # Fewer pixels than all but the smallest training frames: another camera or export
    # setting (half resolution moved 11.6 % of ham10000/2's answers in its audit).
    smallest = float(np.quantile([w * h for w, h in train], COMMON_SHAPE))
    found["smaller_share"] = float(np.mean([w * h < smallest for w, h in site]))
    return found


def analyse(manifest: Any, table: Table, answers: Any, level: float, sets: str) -> dict[str, Any]:
    names = tuple(manifest.labels)
    cases = table.rows(answers.kept)
    y, probs = cases.labels, answers.probs
    figures = summarize(probs, y, names, answers.named)
    null = calibrated_eces(probs, draws=1000, groups=cases.groups)
    figures["ece_15_floor"] = list(floor_of(null))
    figures["ece_15_calibrated_at_least"] = float(np.mean(null >= figures["ece_15"]))
    figures["interval"] = bootstrap(y, answers.named, len(names))
    figures["reliability"] = reliability(probs, y)
    ref, source = reference(manifest)
    patterns = Counter(answers.patterns)
    main = patterns.most_common(1)[0][0]
    report: dict[str, Any] = {
        "model": f"{manifest.name}/{manifest.version}",
        "label_rule": manifest.label_rule.kind,
        "n_cases": len(table),
        "n_answered": len(y),
        "rejected": answers.rejected,
        "per_class_n": {n: int((y == k).sum()) for k, n in enumerate(names)},
        "patterns": dict(patterns),
        "figures": figures,
        "reference": {"source": source, "pattern": main, "figures": ref.get(main)},
        "capture": capture(manifest, cases),
    }
    if manifest.decision is not None:
        report["sets"] = set_figures(answers, y, names, level) | {"kind": sets}
        if manifest.decision.ood_thresholds:
            report["ood"] = ood_figures(manifest, answers, y)
    report["findings"] = findings(report)
    return report


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def findings(r: dict[str, Any]) -> dict[str, list[str]]:
    """``differs``: what differs from the version's own figures beyond sampling, the most
    actionable first; ``holds``: what the site's cases are consistent with."""
    differs: list[str] = []
    holds: list[str] = []

    def judge(beyond: bool, text: str, why: str) -> None:
        (differs if beyond else holds).append(text + (f": {why}" if beyond else "") + ".")

    if r["rejected"]:
        refused = ", ".join(f"{k}: {v}" for k, v in r["rejected"].items())
        differs.append(
            f"{sum(r['rejected'].values())} of {r['n_cases']} cases refused ({refused})."
        )
    s = r.get("sets")
    if s:
        judge(
            s["p_below"] < ALPHA,
            f"Prediction sets at {pct(s['level'])}: {pct(s['coverage'])} of cases covered "
            f"(p = {s['p_below']:.2g})",
            "below the stated level beyond sampling; the sets do not hold for these cases",
        )
        low = [
            f"{k} {c['covered']} of {c['n']}"
            for k, c in s["per_class"].items()
            if c["p_below"] < ALPHA
        ]
        if low and s["kind"] == "class":
            differs.append(f"Classes covered below the stated level: {', '.join(low)}.")
    f = r["figures"]
    p = f["ece_15_calibrated_at_least"]
    judge(
        p < ALPHA,
        f"ECE {f['ece_15']:.3f}; a perfectly calibrated model measures as much on these "
        f"cases in {pct(p)} of draws",
        "the probabilities are miscalibrated for these cases (another case mix, or other "
        "images, shifts them)",
    )
    ref = r["reference"]["figures"] or {}
    if "balanced_accuracy" in ref:
        lo, hi = f["interval"]["balanced_accuracy"]
        judge(
            ref["balanced_accuracy"] > hi,
            f"Balanced accuracy {f['balanced_accuracy']:.3f} (95 % interval {lo:.3f}–{hi:.3f}) "
            f"against {ref['balanced_accuracy']:.3f} on the test split",
            "lower beyond sampling",
        )
    for pattern, o in r.get("ood", {}).get("patterns", {}).items():
        judge(
            o["p_more"] < ALPHA,
            f"Out-of-distribution flag ({pattern}): {o['flagged']} of {o['n']} "
            f"({pct(o['flagged'] / o['n'])}) against {pct(o['val_share'])} of val "
            f"(p = {o['p_more']:.2g})",
            "the site's images differ from the training data; look at the flagged cases first",
        )
    captures = {  # share of the frames -> what it is, and what it means when raised
        "new_ratio_share": (
            f"a width/height ratio that fewer than {pct(COMMON_SHAPE)} of the training frames had",
            "a capture set-up the version was not trained on (its report's capture-shift "
            "audit says how much such changes move its answers)",
        ),
        "smaller_share": (
            f"fewer pixels than {pct(1 - COMMON_SHAPE)} of the training frames",
            "another camera or export resolution than the training data's (its report's "
            "capture-shift audit measures half resolution)",
        ),
    }
    for key, (what, why) in captures.items():
        share = r["capture"].get(key)  # absent where the training data is not reachable
        if share is not None:
            judge(share > NEW_SHAPE, f"{pct(share)} of the frames have {what}", why)
    return {"differs": differs, "holds": holds}


def write_report(r: dict[str, Any], out: Path) -> None:
    from training.validate_plots import plot

    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(r, indent=2))
    plot(r, out / "validation.png")
    (out / "validation.md").write_text("\n".join(markdown(r)) + "\n")
    print(f"{r['model']}: {r['n_answered']} of {r['n_cases']} cases answered ({r['scored_by']})")
    for kind in ("differs", "holds"):
        for line in r["findings"][kind]:
            print(f"- {kind}: {line}")
    print(f"report written to {out}")


def markdown(r: dict[str, Any]) -> list[str]:
    f, ref = r["figures"], r["reference"]["figures"] or {}
    lines = [
        f"# Local validation: {r['model']}",
        "",
        f"{r['n_answered']} of {r['n_cases']} cases answered, {r['scored_by']}; label rule "
        f"`{r['label_rule']}`; inputs: "
        + ", ".join(f"{k} {v}" for k, v in r["patterns"].items())
        + f". Compared with the {r['reference']['source']}, pattern `{r['reference']['pattern']}`.",
        "",
        "## Differs from the test split beyond sampling",
        "",
        *(f"- {line}" for line in r["findings"]["differs"] or ["Nothing."]),
        "",
        "## Consistent with the test split",
        "",
        *(f"- {line}" for line in r["findings"]["holds"] or ["Nothing."]),
        "",
        "## Figures",
        "",
        "| figure | this site | test split |",
        "|---|---|---|",
    ]
    for key, title in FIGURES:
        mine = f"{f[key]:.3f}"
        if key in f["interval"]:
            mine += " ({:.3f}–{:.3f})".format(*f["interval"][key])
        lines.append(
            f"| {title} | {mine} | {ref[key]:.3f} |" if key in ref else f"| {title} | {mine} | |"
        )
    s, o = r.get("sets"), r.get("ood", {})
    lines += [
        "",
        "| class | cases | recall | test recall"
        + (" | covered" if s else "")
        + (" | flagged" if o else "")
        + " |",
        "|---|---|---|---" + ("|---" if s else "") + ("|---" if o else "") + "|",
    ]
    for name, n in r["per_class_n"].items():
        if not n:
            continue
        row = f"| {name} | {n} | {f['per_class_recall'][name]:.3f} | "
        row += f"{ref['per_class_recall'][name]:.3f}" if "per_class_recall" in ref else ""
        if s:
            row += " | {covered} of {n}".format(**s["per_class"][name])
        if o:
            row += " | {} of {}".format(*o["by_class"][name])
        lines.append(row + " |")
    if s:
        lines += [
            "",
            f"Prediction sets (`{s['kind']}`) at {pct(s['level'])}: mean size "
            f"{s['mean_set_size']:.2f}, referred {pct(s['referral_rate'])} (a set of more "
            "than one class, or the flag).",
        ]
    c = r["capture"]
    lines += [
        "",
        "Frame sizes at this site (most common): "
        + ", ".join(f"{k} ({v})" for k, v in c["top_sizes"])
        + (
            f"; {pct(c['new_size_share'])} of the frames have a size no training frame had, "
            f"{pct(c['new_ratio_share'])} a width/height ratio more than "
            f"{pct(RATIO_TOLERANCE)} from any that {pct(COMMON_SHAPE)} of the training frames had, "
            f"{pct(c['smaller_share'])} fewer pixels than {pct(1 - COMMON_SHAPE)} of them."
            if c.get("new_ratio_share") is not None
            else "; the training data is not reachable here, so no comparison."
        ),
    ]
    lines += ["", "![Reliability and recall](validation.png)"]
    return lines
