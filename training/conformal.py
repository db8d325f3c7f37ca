"""Fit conformal prediction sets for an exported model and measure them. Torch-free.

    endofuse decision models/<name>/<version>

Split conformal on the val split, per missingness pattern, class-conditional (Mondrian), so
rare classes get their coverage too: for class k and level 1 - a, the threshold is the
ceil((n_k + 1)(1 - a))-th smallest score among val rows of class k (every class is in the set
when n_k is too small for that rank). That rank gives coverage >= 1 - a on average over
calibration draws, but with 20-50 val cases of a class a given draw falls short about half the
time. With a class confidence c, the rank is raised until the class's coverage reaches 1 - a
with probability c over the draw (a training-conditional guarantee, Vovk 2012): the coverage
of the r-th smallest of n scores is Beta(r, n + 1 - r), so P(coverage >= 1 - a) =
P(Binomial(n, 1 - a) <= r - 1). It is raised at most to the class's largest val score.
Marginal thresholds (one for every class, the plain split-conformal rank over all val rows)
are fitted beside them for requests that ask for ``sets=marginal``. LAC (1 - p_k) and APS
(cumulative mass) are both fitted; the one with the smaller sets in 2-fold cross-validation
on val is kept. The thresholds go into the manifest's ``decision``
block; the test split measures coverage, set size, referral rate and accuracy on the cases
not referred.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service import selfcheck
from service.decision import DecisionParams, is_uniform, nonconformity
from service.label_rule import LabelRule
from service.manifest import load_manifest
from service.sessions import open_session
from training import card, decision_plots, ood
from training.decision_report import write_report
from training.evaluate import decode_all, manifest_split, run_session
from training.ood_embed import prototypes_of
from training.patterns import PATTERN_NAMES, apply_eval_pattern, eval_patterns
from training.ranks import confident_rank, conformal_rank

LEVELS = (0.8, 0.9, 0.95)
# Served sets: each class covered at the stated level with this probability over the val draw.
CLASS_CONFIDENCE = 0.8
SCORES = ("lac", "aps")
_ALWAYS = 2.0  # above every score: the class is always in the set
_FREE = -1.0  # below every score: a case whose true class the set holds anyway


def class_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    level: float,
    confidence: float | None = None,
) -> list[float]:
    """Per class k, the conformal quantile of the true-class scores of class-k rows; with
    ``confidence``, no lower than the rank that reaches ``level`` with that probability."""
    out = []
    for k in range(n_classes):
        s = np.sort(scores[labels == k, k])
        rank = conformal_rank(len(s), level)
        if confidence and rank <= len(s):
            # Raised at most to the largest val score: a class the plain rank can certify is
            # never put in every set for want of cases (impacted stool, 19 val frames, at 0.95).
            rank = max(rank, min(confident_rank(len(s), level, confidence), len(s)))
        out.append(float(s[rank - 1]) if 0 < rank <= len(s) else _ALWAYS)
    return out


def fit(
    probs: np.ndarray,
    labels: np.ndarray,
    kind: str,
    forced: np.ndarray | None = None,
    confidence: float | None = None,
) -> dict[str, list[float]]:
    """Thresholds per coverage level and class. ``forced`` [N, K] marks classes every set holds
    whatever its score (the class the label rule names): a case whose
    true class is forced counts as covered, so the thresholds give the stated coverage for
    the sets as served, not more. It is split conformal on the score with forced classes at
    the bottom, so the guarantee holds as before."""
    scores = nonconformity(probs, kind)
    if forced is not None:
        scores = np.where(forced, _FREE, scores)
    k = probs.shape[1]
    return {f"{lv:g}": class_thresholds(scores, labels, k, lv, confidence) for lv in LEVELS}


def fit_marginal(
    probs: np.ndarray, labels: np.ndarray, kind: str, forced: np.ndarray | None = None
) -> dict[str, list[float]]:
    """One threshold for every class per level: split conformal over all val rows, so the
    coverage holds on average over cases (a rare class may get less), with smaller sets."""
    scores = nonconformity(probs, kind)
    if forced is not None:
        scores = np.where(forced, _FREE, scores)
    true = np.sort(scores[np.arange(len(labels)), labels])
    out = {}
    for level in LEVELS:
        rank = conformal_rank(len(true), level)
        q = float(true[rank - 1]) if rank <= len(true) else _ALWAYS
        out[f"{level:g}"] = [q] * probs.shape[1]
    return out


def forced(probs: np.ndarray, rule: LabelRule) -> np.ndarray:
    """[N, K]: the class a served set always holds, the one the label rule names
    (service/decision.py)."""
    mask = np.zeros(probs.shape, bool)
    mask[np.arange(len(probs)), rule.pick(probs)] = True
    return mask


def mean_set_size(probs: np.ndarray, kind: str, thresholds: dict[str, list[float]]) -> float:
    scores = nonconformity(probs, kind)
    return float(np.mean([(scores <= np.asarray(q)).sum(1).mean() for q in thresholds.values()]))


def choose_score(probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> str:
    """The score with the smaller sets on held-out halves of val (coverage holds for both)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    sizes = {}
    for kind in SCORES:
        sizes[kind] = np.mean(
            [
                mean_set_size(probs[b], kind, fit(probs[a], labels[a], kind))
                for a, b in (halves, halves[::-1])
            ]
        )
    return min(sizes, key=sizes.get)


def measure(
    params: DecisionParams,
    probs: np.ndarray,
    labels: np.ndarray,
    pattern: str,
    rule: LabelRule | None = None,
    set_kind: str = "class",
) -> dict[str, Any]:
    """Per level: coverage (overall and per class), set sizes, referral and selective accuracy
    (of the class ``rule`` names, which every set holds), for sets of kind ``set_kind``."""
    out = {}
    n_classes = probs.shape[1]
    named = (rule or LabelRule()).pick(probs)
    for level in params.levels:
        sets = np.stack(
            [
                params.prediction_set(p, pattern, level, int(k), set_kind)
                for p, k in zip(probs, named, strict=True)
            ]
        )
        covered = sets[np.arange(len(labels)), labels]
        size = sets.sum(1)
        accepted = size == 1
        correct = sets.argmax(1) == labels
        out[f"{level:g}"] = {
            "coverage": float(covered.mean()),
            "class_coverage": [
                float(covered[labels == k].mean()) if (labels == k).any() else None
                for k in range(n_classes)
            ],
            "mean_set_size": float(size.mean()),
            "referral_rate": float(1 - accepted.mean()),
            "accuracy_not_referred": float(correct[accepted].mean()) if accepted.any() else None,
            "accuracy_all": float((named == labels).mean()),
        }
    return out


@dataclass
class Scored:
    """The exported graph run on one split, per evaluation pattern."""

    manifest: Any
    out: dict[str, tuple[np.ndarray, np.ndarray]]  # pattern -> (probabilities, logits rows)
    labels: np.ndarray
    session: Any
    table: Any
    uniform: np.ndarray  # per frame: a blank or flat-colour model input


def pattern_probs(model_dir: Path, split: str, group_column: str | None = None) -> Scored:
    """Calibrated probabilities and logits of the exported graph on ``split``, per evaluation
    pattern, with what else the decision fit needs from the same decoded frames."""
    manifest = load_manifest(model_dir / "manifest.json")
    table = manifest_split(manifest, split, group_column)
    images = decode_all(table, manifest)
    session = open_session(model_dir / "model.onnx")
    out = {}
    for pattern in eval_patterns(manifest.tabular is not None):
        image_mask, tab_mask = apply_eval_pattern(
            pattern, table.mask if manifest.tabular else None, len(table)
        )
        out[pattern] = run_session(
            session, images, table.tabular, tab_mask, image_mask, with_distance=True
        )
    uniform = np.array([is_uniform(im) for im in images])
    return Scored(manifest, out, table.labels, session, table, uniform)


def main(
    model_dir: Path,
    out: Path | None = None,
    ood_study: bool = True,
    class_confidence: float | None = CLASS_CONFIDENCE,
    prune: bool = True,
    first_fit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the decision block into ``model_dir``'s manifest and write its report to ``out``
    (default: ``docs/models/<name>/<version>`` for a version under the repository's
    ``models/``, else ``<model_dir>/decision-report``). With ``prune``, distance layers
    the out-of-distribution score does not read are taken out of the graph, and the fit is
    redone on it (``first_fit``: the first fit's record of every layer)."""
    val_scored = pattern_probs(model_dir, "val")
    manifest, session = val_scored.manifest, val_scored.session
    val_out, val_labels = val_scored.out, val_scored.labels
    layers = manifest.raw.get("ood_embedding", {}).get("features", [])
    ood_block = ood.fit_thresholds(
        {p: logits for p, (_, logits) in val_out.items()},
        len(manifest.labels),
        ood.shifted_val_rows(manifest, session, val_scored.table, val_out),
        [f["tensor"] for f in layers],
        [f["dims"] for f in layers],
        prototypes_of(manifest.raw.get("ood_embedding", {})),
    )
    if prune and ood_block.get("unused"):  # before the test split is scored on this graph
        ood.prune_layers(model_dir, list(ood_block["unused"]))
        return main(model_dir, out, ood_study, class_confidence, False, ood_block)
    first_fit = first_fit or ood.removed_earlier(manifest, ood_block, layers)
    if first_fit:
        ood_block["capture_shift_flagged"] = first_fit.get("capture_shift_flagged", {})
        ood_block["unused"] = first_fit["unused"]
    test_scored = pattern_probs(model_dir, "test")
    test_out, test_labels, test_table = test_scored.out, test_scored.labels, test_scored.table
    val = {p: probs for p, (probs, _) in val_out.items()}
    test = {p: probs for p, (probs, _) in test_out.items()}
    pooled = np.concatenate(list(val.values()))
    kind = choose_score(pooled, np.concatenate([val_labels] * len(val)))
    block = {
        "method": "split conformal, class-conditional (Mondrian), per missingness pattern",
        "score": kind,
        # P(a class's coverage >= the level) over the val draw; null: on average only
        "class_confidence": class_confidence,
        "levels": list(LEVELS),
        "fitted_on": {"split": "val", "n": len(val_labels)},
        "thresholds": {
            p: fit(val[p], val_labels, kind, forced(val[p], manifest.label_rule), class_confidence)
            for p in val
        },
        "marginal_thresholds": {
            p: fit_marginal(val[p], val_labels, kind, forced(val[p], manifest.label_rule))
            for p in val
        },
        "ood": ood_block,
    }
    if manifest.tabular is None:  # image-only: one pattern; the others never occur
        for key in ("thresholds", "marginal_thresholds"):
            block[key] = {p: block[key]["all"] for p in PATTERN_NAMES}
        block["ood"]["thresholds"] = {p: block["ood"]["thresholds"]["all"] for p in PATTERN_NAMES}
        if "scale" in block["ood"]:
            block["ood"]["scale"] = {p: block["ood"]["scale"]["all"] for p in PATTERN_NAMES}
    params = DecisionParams.from_manifest(block)
    by_label = ood.flagged_by_label(val_out, manifest, params, val_scored.uniform)
    block["ood"]["val_flagged_by_label"] = {
        p: by_label[p if p in by_label else "all"] for p in block["ood"]["thresholds"]
    }
    report = {
        "model": f"{manifest.name}/{manifest.version}",
        "score": kind,
        "class_confidence": class_confidence,
        "label_rule": manifest.label_rule.kind,
        "test": {p: measure(params, test[p], test_labels, p, manifest.label_rule) for p in test},
        "test_marginal": {
            p: measure(params, test[p], test_labels, p, manifest.label_rule, "marginal")
            for p in test
        },
        "curves": {p: decision_plots.selective_curve(test[p], test_labels) for p in test},
        "labels": list(manifest.labels),
    }
    if ood_study:
        # Out-of-distribution inputs arrive as pictures alone: compare with the test split
        # posted the same way.
        pattern = "image_only" if manifest.tabular is not None else "all"
        report["ood"] = {
            k: block["ood"][k]
            for k in ("score", "pass_confidence", "capture_shift_flagged", "unused")
            if k in block["ood"]
        } | {"val_flagged_by_label": by_label[pattern]}
        threshold = block["ood"]["thresholds"][pattern]
        scale = params.ood_scale.get(pattern) if params.ood_scale else None
        report["ood"] |= ood.study(
            session, manifest, test_out[pattern][1], test_scored.uniform,
            ood.ood_inputs(manifest, test_table), threshold, scale, np.asarray(test_labels),
        )  # fmt: skip
        n_in = report["ood"]["n_in"]
        flagged = round(report["ood"]["in_distribution_flagged"] * n_in)
        report["ood"] |= ood.against_val(
            val_out[pattern][1], len(manifest.labels), threshold, scale, flagged, n_in
        )
    raw = dict(manifest.raw, decision=block)
    (model_dir / "manifest.json").write_text(json.dumps(raw, indent=2))
    # The thresholds hold for this host's answers: record them, so that a server elsewhere
    # can tell whether it answers the same (service/selfcheck.py).
    selfcheck.record(model_dir)
    out = out or report_dir(model_dir, manifest)
    write_report(report, out)
    card.refresh(model_dir, out)
    return report


REPO = Path(__file__).resolve().parent.parent


def report_dir(model_dir: Path, manifest: Any) -> Path:
    """Where a version's decision report goes by default: beside its evaluation report for a
    bundled version, beside the model for any other (a scratch copy must not overwrite the
    published report)."""
    if model_dir.resolve().is_relative_to((REPO / "models").resolve()):
        return REPO / "docs" / "models" / manifest.name / manifest.version
    return model_dir / "decision-report"
