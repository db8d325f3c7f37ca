"""Conformal prediction sets: thresholds agree with a kept library's, coverage holds for
every class, and the service turns a manifest's thresholds into sets and referrals."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from service.decision import DecisionParams, decide, nonconformity, pattern_of
from training.conformal import LEVELS, choose_score, class_thresholds, confident_rank, fit

REPO = Path(__file__).resolve().parent.parent


def probabilities(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2 + np.linspace(1.0, -1.0, k)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (p.cumsum(1) < rng.random((n, 1))).sum(1)
    return p, labels


@pytest.mark.parametrize("kind", ["lac", "aps"])
def test_thresholds_match_crepes_mondrian_p_values(kind: str) -> None:
    crepes = pytest.importorskip("crepes", reason="crepes is the reference implementation")
    p, y = probabilities(900, 4, 0)
    cal, test = slice(0, 500), slice(500, 900)
    scores = nonconformity(p, kind)
    reference = crepes.ConformalClassifier()
    reference.fit(scores[cal][np.arange(500), y[cal]], bins=y[cal])
    p_values = np.column_stack(
        [
            reference.predict_p(scores[test][:, [c]], bins=np.full(400, c), smoothing=False)[:, 0]
            for c in range(4)
        ]
    )
    for level in LEVELS:
        q = np.asarray(class_thresholds(scores[cal], y[cal], 4, level))
        ours = scores[test] <= q
        # A label is in a conformal set when its p-value exceeds 1 - level (exactly).
        theirs = p_values > (1 - level) + 1e-9
        np.testing.assert_array_equal(ours, theirs)


def test_every_class_gets_its_coverage() -> None:
    p, y = probabilities(20_000, 5, 1)
    thresholds = fit(p[:6000], y[:6000], "lac")
    params = DecisionParams("lac", {"all": thresholds}, LEVELS)
    scores = nonconformity(p[6000:], "lac")
    for level in LEVELS:
        sets = scores <= np.asarray(params.thresholds["all"][f"{level:g}"])
        covered = sets[np.arange(len(sets)), y[6000:]]
        for k in range(5):
            assert covered[y[6000:] == k].mean() >= level - 0.02, (level, k)


def test_forced_classes_keep_coverage_at_the_level_not_above() -> None:
    """Served sets always hold some classes whatever their score (the argmax, the label
    rule's class). Thresholds fitted as if they did not overshoot the level; counting those
    cases as covered brings every class back to it, and no lower."""
    p, y = probabilities(40_000, 4, 2)
    rng = np.random.default_rng(4)
    # Forced: the argmax, and for 60 % of cases one more class drawn without looking at y.
    extra = np.where(rng.random(len(p)) < 0.6, rng.integers(0, 4, len(p)), p.argmax(1))
    mask = np.zeros(p.shape, bool)
    mask[np.arange(len(p)), p.argmax(1)] = True
    mask[np.arange(len(p)), extra] = True
    cal, test = slice(0, 15_000), slice(15_000, None)
    scores = nonconformity(p[test], "lac")
    got = {}
    for name, given in (("plain", None), ("forced", mask[cal])):
        thresholds = fit(p[cal], y[cal], "lac", given)
        for level in LEVELS:
            sets = (scores <= np.asarray(thresholds[f"{level:g}"])) | mask[test]
            covered = sets[np.arange(len(sets)), y[test]]
            got[name, level] = [covered[y[test] == k].mean() for k in range(4)]
    for level in LEVELS:
        forced_cov, plain_cov = got["forced", level], got["plain", level]
        assert min(forced_cov) >= level - 0.015, got  # still the guarantee, class by class
        assert abs(np.mean(forced_cov) - level) <= 0.015, got
        assert all(f <= c + 1e-9 for f, c in zip(forced_cov, plain_cov, strict=True))
    assert np.mean(got["plain", 0.8]) > 0.8 + 0.02, got  # the overshoot the correction removes


@pytest.mark.parametrize("n", [20, 48, 150])
def test_class_confidence_is_the_share_of_calibration_draws_that_reach_the_level(n: int) -> None:
    """A rare class's coverage depends on which val cases it drew. The plain rank reaches the
    level in only part of the draws; the confident rank in at least the stated share."""
    rng = np.random.default_rng(n)
    level, confidence, draws = 0.9, 0.8, 4000
    labels = np.zeros(n, int)
    reached = {"plain": 0, "confident": 0}
    for _ in range(draws):
        # Uniform scores: a threshold q covers exactly a share q of new cases of the class.
        scores = rng.random((n, 1))
        for name, c in (("plain", None), ("confident", confidence)):
            q = class_thresholds(scores, labels, 1, level, c)[0]
            reached[name] += min(q, 1.0) >= level
    assert reached["confident"] / draws >= confidence - 0.02, reached
    assert reached["plain"] / draws < confidence - 0.05, reached


def test_class_confidence_never_puts_a_certifiable_class_in_every_set() -> None:
    scores = np.random.default_rng(3).random((19, 1))
    labels = np.zeros(19, int)
    plain = class_thresholds(scores, labels, 1, 0.95)[0]
    confident = class_thresholds(scores, labels, 1, 0.95, 0.8)[0]
    assert plain == confident == scores.max()  # 19 cases: the plain rank is the largest score


def test_confident_rank_matches_the_beta_quantile() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n, level, c in ((48, 0.9, 0.8), (300, 0.8, 0.9), (20, 0.95, 0.8), (5000, 0.9, 0.8)):
        r = confident_rank(n, level, c)
        # The r-th smallest of n uniforms is Beta(r, n + 1 - r): r reaches, r - 1 does not.
        if r <= n:
            assert stats.beta.sf(level, r, n + 1 - r) >= c - 1e-9
        if r > 1:
            assert stats.beta.sf(level, r - 1, n + 2 - r) < c


def test_too_few_cases_of_a_class_keep_it_in_every_set() -> None:
    scores = np.random.default_rng(0).random((12, 2))
    labels = np.array([0] * 10 + [1] * 2)
    q = class_thresholds(scores, labels, 2, 0.9)
    assert q[1] > 1.0  # 2 cases cannot certify 90 %: class 1 is never excluded
    assert q[0] <= 1.0


def test_score_choice_prefers_smaller_sets() -> None:
    p, y = probabilities(3000, 6, 2)
    assert choose_score(p, y) in ("lac", "aps")


def test_decide_reports_set_referral_and_pattern() -> None:
    labels = ("a", "b", "c")
    params = DecisionParams(
        "lac", {"all": {"0.9": [0.6, 0.6, 0.6], "0.8": [0.2, 0.2, 0.2]}}, (0.8, 0.9)
    )
    sure = decide(params, labels, np.array([0.9, 0.06, 0.04]), "all", 0.9, 0.0)
    assert sure == {
        "prediction_set": ["a"],
        "coverage": 0.9,
        "sets": "class",
        "refer": False,
        "reason": None,
    }
    unsure = decide(params, labels, np.array([0.45, 0.5, 0.05]), "all", 0.9, 0.0)
    assert unsure["prediction_set"] == ["b", "a"] and unsure["refer"]
    assert unsure["reason"] == "2 diagnoses remain plausible at this coverage"
    # Nothing reaches the 0.8 thresholds: the most probable class stands alone.
    top = decide(params, labels, np.array([0.45, 0.5, 0.05]), "all", 0.8, 0.0)
    assert top["prediction_set"] == ["b"] and not top["refer"]
    floor = decide(None, labels, np.array([0.4, 0.35, 0.25]), "all", 0.9, 0.5)
    assert "prediction_set" not in floor and floor["refer"]
    assert floor["reason"] == "top probability is below the confidence floor"
    assert pattern_of(True, 3, 3) == "all" and pattern_of(True, 0, 3) == "image_only"
    assert pattern_of(True, 1, 3) == "partial" and pattern_of(False, 2, 3) == "tabular_only"
    assert pattern_of(True, 0, 0) == "all"


def test_sets_hold_the_top_class_and_nest_across_levels() -> None:
    p, y = probabilities(4000, 5, 3)
    params = DecisionParams("lac", {"all": fit(p[:2000], y[:2000], "lac")}, LEVELS)
    for probs in p[2000:2300]:
        sets = [params.prediction_set(probs, "all", level) for level in LEVELS]
        assert all(s[np.argmax(probs)] for s in sets)
        for small, large in itertools.pairwise(sets):
            assert not (small & ~large).any()


def test_energy_and_auroc() -> None:
    from service.decision import energy
    from training.ood import separation

    logits = np.array([[10.0, 0.0, 0.0], [0.1, 0.0, -0.1]])
    np.testing.assert_allclose(energy(logits), -np.log(np.exp(logits).sum(1)))
    assert energy(logits)[0] < energy(logits)[1]  # a confident input is more familiar
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    brute = np.mean([[(o > i) + 0.5 * (o == i) for i in inside] for o in outside])
    assert separation(inside, outside) == pytest.approx(brute)
    assert separation(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import LedoitWolf

    from training.ood_embed import ledoit_wolf

    x = np.random.default_rng(3).normal(size=(60, 25))
    x -= x.mean(0)
    cov, shrink = ledoit_wolf(x)
    ref = LedoitWolf(assume_centered=True).fit(x)
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-6)
    assert np.allclose(cov, ref.covariance_)


def test_distance_output_leaves_probabilities_unchanged_and_matches_numpy(tmp_path) -> None:
    import onnxruntime as ort

    from service.engine import Batch, Engine
    from service.manifest import parse_manifest
    from tests.builders import build_manifest, build_model
    from training.ood_embed import add_distance, mahalanobis, pooled_feature, with_outputs

    model = build_model()
    feature = pooled_feature(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 32, 32, 3)).astype(np.uint8)
    probe = ort.InferenceSession(with_outputs(model, [feature]).SerializeToString())
    before, logits, feats = probe.run(["probabilities", "logits", feature], {"image": images})
    means = rng.normal(100, 30, (3, 3))
    precision = np.linalg.inv(np.cov(rng.normal(size=(50, 3)).T) + np.eye(3))
    edited = add_distance(model, feature, means, precision)
    session = ort.InferenceSession(edited.SerializeToString())
    after, dist = session.run(["probabilities", "ood_distance"], {"image": images})
    assert np.array_equal(before, after)
    assert np.allclose(dist, mahalanobis(feats, means, precision), rtol=1e-4)
    # The engine carries the distance after the logits, one row per item.
    (tmp_path / "model.onnx").write_bytes(edited.SerializeToString())
    manifest = parse_manifest(build_manifest("endo", "1", 32, 32))
    engine = Engine(tmp_path / "model.onnx", manifest, ["CPUExecutionProvider"])
    _, row = engine.run_with_logits(Batch(images=images))
    assert row.shape == (6, len(manifest.labels) + 1)
    assert np.allclose(row[:, :-1], logits) and np.allclose(row[:, -1], dist)


@pytest.mark.parametrize("spread", [0, 1, 3, 40, 255])
def test_channel_std_from_the_histogram_is_numpy_std(spread: int) -> None:
    from service.decision import channel_std

    rng = np.random.default_rng(spread)
    offset = np.array([0, 0, 255 - spread])
    image = (rng.integers(0, spread + 1, (57, 43, 3)) + offset).astype(np.uint8)
    want = image.reshape(-1, 3).astype(np.float64).std(axis=0)
    np.testing.assert_allclose(channel_std(image), want, rtol=1e-9, atol=1e-9)


def test_the_subsample_shortcut_gives_the_full_answer() -> None:
    from service.decision import UNIFORM_STD, channel_std, is_uniform

    rng = np.random.default_rng(5)
    cases = [rng.integers(0, 255, (224, 224, 3)).astype(np.uint8)]
    for spread in (1, 2, 3, 4, 6, 12, 24):  # around the threshold, where the shortcut ends
        cases.append((rng.integers(0, spread + 1, (224, 224, 3)) + 100).astype(np.uint8))
    # Flat except the pixels the subsample reads (and the reverse): the subsample alone
    # would answer wrongly both times.
    on_grid = np.full((224, 224, 3), 120, np.uint8)
    on_grid[::4, ::4] = rng.integers(0, 255, (56, 56, 3))
    off_grid = rng.integers(0, 255, (224, 224, 3)).astype(np.uint8)
    off_grid[::4, ::4] = 120
    on_coarse_grid = np.full((150, 200, 3), 120, np.uint8)  # read by the 1-in-64 tier only
    on_coarse_grid[::8, ::8] = rng.integers(0, 255, (19, 25, 3))
    cases += [on_grid, off_grid, on_coarse_grid, np.zeros((5, 3, 3), np.uint8)]
    for image in cases:
        assert is_uniform(image) == bool(channel_std(image).max() < UNIFORM_STD)
    assert not is_uniform(on_grid) and not is_uniform(off_grid)


def test_combined_ood_score_and_flat_images() -> None:
    from service.decision import decide, is_uniform, ood_score, ood_signals

    rows = np.array([[2.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 9.0]])  # 3 logits + a distance
    signals = ood_signals(rows, 3)
    assert np.allclose(signals["distance"], [1.0, 9.0])
    scale = {"energy": (-2.5, -2.0), "distance": (1.0, 3.0)}
    score = ood_score(signals, scale)
    assert score[1] == pytest.approx(4.0)  # (9 - 1) / (3 - 1): the distance dominates
    assert np.array_equal(ood_score(signals, None), signals["energy"])
    flat = np.zeros((32, 32, 3), np.uint8) + np.array([200, 30, 90], np.uint8)
    assert is_uniform(flat) and not is_uniform(
        np.random.default_rng(0).integers(0, 255, (32, 32, 3))
    )
    params = DecisionParams.from_manifest({
        "score": "lac", "levels": [0.9], "thresholds": {"all": {"0.9": [0.5, 0.5, 0.5]}},
        "ood": {"thresholds": {"all": 1.0}, "scale": {"all": {"energy": [-2.5, -2.0],
                                                               "distance": [1.0, 3.0]}}},
    })  # fmt: skip
    probs = np.array([0.8, 0.1, 0.1])
    calm = decide(params, ("a", "b", "c"), probs, "all", 0.9, 0.0, rows[0])
    assert not calm["ood"]["flagged"]
    assert decide(params, ("a", "b", "c"), probs, "all", 0.9, 0.0, rows[1])["ood"]["flagged"]
    blank = decide(params, ("a", "b", "c"), probs, "all", 0.9, 0.0, rows[0], uniform_image=True)
    assert blank["ood"]["flagged"] and "flat colour" in blank["reason"]


@pytest.mark.parametrize("name", ["hyperkvasir-lgi/1", "hyperkvasir-lgi/2", "ham10000/2"])
def test_the_per_request_ood_score_is_the_vectorised_one(name: str) -> None:
    from service.decision import ood_score, ood_signals, request_ood_score
    from service.manifest import load_manifest

    manifest = load_manifest(REPO / "models" / name / "manifest.json")
    params, k = manifest.decision, len(manifest.labels)
    width = k + len(manifest.raw.get("ood_embedding", {}).get("features", []))
    rows = np.random.default_rng(0).normal(size=(50, width)).astype(np.float32) * 3
    for pattern in params.ood_thresholds:
        scale = params.ood_scale.get(pattern) if params.ood_scale else None
        expected = ood_score(ood_signals(rows, k), scale)
        got = [request_ood_score(row, k, params, pattern) for row in rows]
        assert np.array_equal(got, expected), pattern
    # A scale that names the energy beside a distance (manifests fitted before it was dropped).
    both = DecisionParams.from_manifest({
        "score": "lac", "levels": [0.9], "thresholds": {"all": {"0.9": [0.5, 0.5, 0.5]}},
        "ood": {"thresholds": {"all": 1.0}, "scale": {"all": {"energy": [-2.5, -2.0],
                                                               "distance": [1.0, 3.0]}}},
    })  # fmt: skip
    rows = np.array([[2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 9.0], [-9.0, -9.0, -9.0, 0.0]])
    expected = ood_score(ood_signals(rows, 3), both.ood_scale["all"])
    assert [request_ood_score(r, 3, both, "all") for r in rows] == list(expected)


def test_referral_curve_and_roc_points() -> None:
    from training.decision_plots import roc_points, selective_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3))
    logits[np.arange(400), labels] += rng.uniform(0, 3, 400)  # confident cases more often right
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    curve = selective_curve(probs, labels)
    assert curve["referral"][0] == 0 and curve["accuracy"][0] == (probs.argmax(1) == labels).mean()
    assert curve["accuracy"][-1] > curve["accuracy"][0]  # referring the least confident helps
    roc = roc_points(rng.normal(0, 1, 300), rng.normal(3, 1, 300))
    assert roc["fpr"][0] == roc["tpr"][0] == 1.0 and roc["fpr"][-1] == roc["tpr"][-1] == 0.0
    assert np.all(np.diff(roc["tpr"]) <= 0) and np.all(np.diff(roc["fpr"]) <= 0)


def test_marginal_sets_cover_on_average_with_one_threshold() -> None:
    from training.conformal import fit_marginal

    rng = np.random.default_rng(5)
    hits = {level: [] for level in LEVELS}
    for _ in range(60):
        logits = rng.normal(size=(600, 4)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = np.array([rng.choice(4, p=p) for p in probs])  # calibrated by construction
        cal, new = slice(0, 300), slice(300, 600)
        table = fit_marginal(probs[cal], labels[cal], "lac")
        for level in LEVELS:
            q = table[f"{level:g}"]
            assert len(set(q)) == 1 and len(q) == 4  # one threshold, for every class
            sets = nonconformity(probs[new], "lac") <= np.asarray(q)
            hits[level].append(sets[np.arange(300), labels[new]].mean())
    for level in LEVELS:
        assert abs(np.mean(hits[level]) - level) < 0.015


def test_sets_kind_is_chosen_per_request_and_checked() -> None:
    from service.errors import InvalidRequest

    block = {
        "score": "lac", "levels": [0.9],
        "thresholds": {"all": {"0.9": [0.9, 0.05, 0.9]}},
        "marginal_thresholds": {"all": {"0.9": [0.75, 0.75, 0.75]}},
    }  # fmt: skip
    params = DecisionParams.from_manifest(block)
    probs = np.array([0.6, 0.3, 0.1])
    labels = ("a", "b", "c")
    per_class = decide(params, labels, probs, "all", 0.9, 0.0)
    marginal = decide(params, labels, probs, "all", 0.9, 0.0, sets="marginal")
    assert per_class["prediction_set"] == ["a", "c"] and per_class["sets"] == "class"
    assert marginal["prediction_set"] == ["a", "b"] and marginal["sets"] == "marginal"
    params.check_sets("marginal")
    with pytest.raises(InvalidRequest):
        params.check_sets("conditional")
    older = DecisionParams.from_manifest({k: v for k, v in block.items() if "marginal" not in k})
    with pytest.raises(InvalidRequest, match="no marginal sets"):
        older.check_sets("marginal")
