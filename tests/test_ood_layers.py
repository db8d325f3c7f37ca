"""Out-of-distribution distances from several feature layers, and which of them the score
uses: graph edits checked against numpy, the capture-shift rule, the pass threshold."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from training.ood import PASS_RATE, choose_signals, fit_thresholds, pass_threshold

REPO = Path(__file__).resolve().parent.parent


def _model_with_feature_map() -> onnx.ModelProto:
    """The test model plus an NCHW view of its input: a feature map to pool in the graph."""
    from tests.builders import build_model

    model = build_model()
    model.graph.node.append(helper.make_node("Transpose", ["img_f"], ["fmap"], perm=[0, 3, 1, 2]))
    return model


def test_two_layer_distances_match_numpy_and_strip_back_to_the_original(tmp_path) -> None:
    import onnxruntime as ort

    from service.decision import ood_signals
    from service.engine import Batch, Engine
    from service.manifest import parse_manifest
    from tests.builders import build_manifest
    from training.ood_embed import (
        LayerFit,
        add_distances,
        mahalanobis,
        run,
        with_outputs,
        without_distance,
    )

    model = _model_with_feature_map()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (7, 32, 32, 3)).astype(np.uint8)
    probe = ort.InferenceSession(with_outputs(model, ["img_mean", "fmap"]).SerializeToString())
    before, logits, pooled, fmap = run(
        probe, images, ["probabilities", "logits", "img_mean", "fmap"], 0
    )
    assert fmap.shape == (7, 3)  # the map comes back spatially averaged
    fits = []
    for name, feats, pool in (("img_mean", pooled, False), ("fmap", fmap, True)):
        means = feats[:3] + rng.normal(0, 5, (3, 3))
        precision = np.linalg.inv(np.cov(rng.normal(size=(50, 3)).T) + np.eye(3))
        fits.append(LayerFit(name, means, precision, pool))
    edited = add_distances(model, fits)
    session = ort.InferenceSession(edited.SerializeToString())
    after, dist = session.run(["probabilities", "ood_distance"], {"image": images})
    assert np.array_equal(before, after) and dist.shape == (7, 2)
    for j, (fit, feats) in enumerate(zip(fits, (pooled, fmap), strict=True)):
        assert np.allclose(dist[:, j], mahalanobis(feats, fit.means, fit.precision), rtol=1e-4)
    # The engine carries both columns after the logits; the decision code names them.
    (tmp_path / "model.onnx").write_bytes(edited.SerializeToString())
    manifest = parse_manifest(build_manifest("endo", "1", 32, 32))
    engine = Engine(tmp_path / "model.onnx", manifest, ["CPUExecutionProvider"])
    _, row = engine.run_with_logits(Batch(images=images))
    k = len(manifest.labels)
    assert row.shape == (7, k + 2) and np.allclose(row[:, :k], logits)
    signals = ood_signals(row, k)
    assert np.allclose(signals["distance"], dist[:, 0])
    assert np.allclose(signals["distance_1"], dist[:, 1])
    # Refitting starts from the graph as it was.
    stripped = without_distance(edited)
    assert [n.output for n in stripped.graph.node] == [n.output for n in model.graph.node]
    assert {i.name for i in stripped.graph.initializer} == {i.name for i in model.graph.initializer}
    assert [o.name for o in stripped.graph.output] == [o.name for o in model.graph.output]


def _rows(rng: np.random.Generator, n: int, shift: tuple[float, float]) -> np.ndarray:
    """Three logits, then two distances: the second moves ``shift`` under capture change."""
    logits = rng.normal(0, 1, (n, 3)) + np.array([3.0, 0, 0])
    stable = rng.normal(10, 1, n) + shift[0]
    fragile = rng.normal(10, 1, n) + shift[1]
    return np.column_stack([logits, stable, fragile])


def test_a_layer_that_reads_the_capture_is_left_out() -> None:
    rng = np.random.default_rng(1)
    val, shifted = _rows(rng, 400, (0, 0)), _rows(rng, 200, (0.0, 4.0))
    chosen, rates = choose_signals(val, shifted, 3)
    assert chosen == ["distance"]
    assert rates["distance"] < 0.1 < rates["distance_1"]
    block = fit_thresholds({"all": val}, 3, shifted, ["pooled", "middle"])
    assert block["signals"] == ["distance"] and set(block["scale"]["all"]) == {"distance"}
    assert "pooled" in block["score"] and "middle" not in block["score"]
    assert block["capture_shift_flagged"]["middle"] > 0.5
    # Energy is the score only where the graph has no distance.
    assert choose_signals(val[:, :3], None, 3) == (["energy"], {})
    assert fit_thresholds({"all": val[:, :3]}, 3)["score"] == "energy"
    # If every layer moves, the model reads the capture: the energy score stands in.
    both = _rows(rng, 200, (2.0, 4.0))
    assert choose_signals(val, both, 3)[0] == ["energy"]
    fallback = fit_thresholds({"all": val}, 3, both)
    assert fallback["score"].startswith("energy") and "scale" not in fallback
    assert set(fallback["capture_shift_flagged"]) == {"distance", "distance_1"}


def test_the_narrowest_layer_that_passes_is_the_one_read() -> None:
    rng = np.random.default_rng(2)
    val, steady = _rows(rng, 400, (0, 0)), _rows(rng, 200, (0.0, 0.0))
    # Both layers pass the capture test: the narrower one (column 1 here) is the score.
    chosen, rates = choose_signals(val, steady, 3, dims=[1280, 112])
    assert chosen == ["distance_1"] and set(rates) == {"distance", "distance_1"}
    assert choose_signals(val, steady, 3, dims=[64, 112])[0] == ["distance"]
    # A narrow layer that reads the capture is never preferred.
    fragile_narrow = _rows(rng, 200, (0.0, 4.0))
    assert choose_signals(val, fragile_narrow, 3, dims=[1280, 112])[0] == ["distance"]
    # Without widths, every layer that passes is kept (as for a graph fitted before).
    assert choose_signals(val, steady, 3)[0] == ["distance", "distance_1"]
    block = fit_thresholds({"all": val}, 3, steady, ["pooled", "middle"], [1280, 112])
    assert block["signals"] == ["distance_1"]
    assert block["unused"] == {"pooled": "a narrower layer passes the capture test"}
    block = fit_thresholds({"all": val}, 3, fragile_narrow, ["pooled", "middle"], [1280, 112])
    assert block["unused"] == {"middle": "moves under capture change"}


def test_a_scratch_copy_does_not_overwrite_the_published_decision_report(tmp_path) -> None:
    from types import SimpleNamespace

    from training.conformal import REPO, report_dir

    manifest = SimpleNamespace(name="hyperkvasir-lgi", version="2")
    bundled = REPO / "models" / "hyperkvasir-lgi" / "2"
    assert report_dir(bundled, manifest) == REPO / "docs/models/hyperkvasir-lgi/2"
    assert report_dir(tmp_path / "2", manifest) == tmp_path / "2" / "decision-report"


@pytest.mark.parametrize("n", [19, 40, 300])
def test_pass_threshold_lets_at_least_the_rate_of_new_inputs_through(n: int) -> None:
    rng = np.random.default_rng(n)
    fresh_pass, plain_pass = [], []
    for _ in range(3000):
        val = rng.normal(size=n)
        fresh = rng.normal(size=1)[0]
        fresh_pass.append(fresh <= pass_threshold(val))
        plain_pass.append(fresh <= np.quantile(val, PASS_RATE))
    assert np.mean(fresh_pass) >= PASS_RATE - 0.01  # guaranteed on average over draws
    assert pass_threshold(np.arange(1.0, 101.0)) == 96.0  # ceil(101 * 0.95) = 96th smallest
    if n < 40:
        assert np.mean(plain_pass) < np.mean(fresh_pass)


@pytest.mark.parametrize("n", [60, 300])
def test_confident_threshold_lets_the_rate_through_for_most_val_draws(n: int) -> None:
    rng = np.random.default_rng(n)
    plain, confident = [], []
    for _ in range(2000):
        # Uniform scores: a threshold t lets exactly the share t of new inputs through.
        val = rng.random(n)
        plain.append(pass_threshold(val))
        confident.append(pass_threshold(val, confidence=0.8))
    plain, confident = np.array(plain), np.array(confident)
    assert np.mean(plain < PASS_RATE) > 0.3  # the plain rank: many draws fall short
    assert np.mean(confident < PASS_RATE) <= 0.2 + 0.03
    assert (confident >= plain).all()


def test_flagged_count_tail_matches_simulated_val_and_test_draws() -> None:
    """The chance of a test split flagging k or more, given the val fit, agrees with drawing
    val and test from one distribution many times, and with scipy's beta-binomial."""
    from training.ood import against_val
    from training.ranks import exceed_tail

    n, m, k = 60, 50, 6
    rng = np.random.default_rng(5)
    hits, draws = 0, 10000
    for _ in range(draws):
        val = rng.random(n)
        t = pass_threshold(val)
        assert np.sum(val <= t) == 58  # ceil(61 * 0.95): the same rank whatever the draw
        hits += np.sum(rng.random(m) > t) >= k
    assert abs(hits / draws - exceed_tail(n, 58, m, k)) < 0.02
    stats = pytest.importorskip("scipy.stats")
    assert exceed_tail(300, 289, 298, 18) == pytest.approx(stats.betabinom(298, 12, 289).sf(17))
    assert exceed_tail(300, 289, 298, 0) == 1.0
    tails = [exceed_tail(300, 289, 298, j) for j in range(0, 40)]
    assert all(a >= b for a, b in itertools.pairwise(tails))
    # against_val counts val rows above the threshold on the served score.
    rows = np.column_stack([np.zeros((10, 3)), np.arange(10.0)])  # energy-free: distance only
    out = against_val(rows, 3, 6.5, {"distance": (0.0, 1.0)}, flagged=2, n_in=10)
    assert out["val_above"] == 3 and out["n_val"] == 10
    assert out["p_as_many_flagged"] == pytest.approx(exceed_tail(10, 7, 10, 2))


def test_a_refit_keeps_the_record_of_layers_an_earlier_fit_took_out() -> None:
    from types import SimpleNamespace

    from training.ood import removed_earlier

    earlier = {
        "unused": {"pool": "a narrower layer passes the capture test", "stage5": "moves"},
        "capture_shift_flagged": {"pool": 0.045, "stage5": 0.5, "token": 0.04},
    }
    manifest = SimpleNamespace(raw={"decision": {"ood": earlier}})
    now = {"capture_shift_flagged": {"token": 0.035}}
    kept = removed_earlier(manifest, now, [{"tensor": "token", "dims": 128}])
    assert kept == {
        "capture_shift_flagged": {"pool": 0.045, "stage5": 0.5, "token": 0.035},
        "unused": earlier["unused"],
    }
    assert list(kept["capture_shift_flagged"]) == ["pool", "stage5", "token"]  # first fit's order
    # Layers back in the graph (a fresh ood-distance) are judged again, not carried over.
    layers = [{"tensor": t, "dims": 1} for t in ("pool", "stage5", "token")]
    assert removed_earlier(manifest, now, layers) is None
    assert removed_earlier(SimpleNamespace(raw={}), now, layers[2:]) is None


def test_int8_variant_leaves_out_what_is_refitted_on_its_own_outputs(tmp_path) -> None:
    from training.quantize import variant_manifest

    (tmp_path / "model.onnx").write_bytes(b"graph")
    source = {
        "name": "m", "version": "2", "labels": ["a", "b"],
        "outputs": ["probabilities", "logits", "ood_distance"],
        "decision": {"score": "lac"}, "ood_embedding": {"output": "ood_distance"},
        "metrics": {"all": {}}, "files": {"model.onnx": {"sha256": "old"}},
    }  # fmt: skip
    raw = variant_manifest(source, tmp_path, "3", 16, {"layers": 49, "kept_in_float": {}})
    assert raw["precision"] == "int8" and raw["version"] == "3"
    assert raw["quantization"]["layers"] == 49 and raw["quantization"]["source"] == "m/2"
    assert raw["outputs"] == ["probabilities", "logits"]
    assert not {"decision", "ood_embedding"} & set(raw)
    assert raw["files"]["model.onnx"]["bytes"] == 5


def test_each_answer_carries_how_often_its_label_is_flagged_on_val() -> None:
    """Per pattern and per label named (by the label rule, not the most probable), the val
    inputs above the threshold or flat: counted at the fit, carried by the manifest, and
    returned beside the flag; a manifest without the counts answers without them."""
    from types import SimpleNamespace

    from service.decision import DecisionParams, decide
    from service.label_rule import LabelRule
    from training.ood import flagged_by_label

    rng = np.random.default_rng(0)
    labels = ("a", "b", "c")
    probs = rng.dirichlet(np.ones(3), size=200)
    rows = np.c_[np.log(probs), rng.normal(size=200) + 5 * (np.argmax(probs, 1) == 2)]
    uniform = np.zeros(200, bool)
    uniform[:3] = True
    rule = LabelRule("balanced", (0.6, 0.3, 0.1))
    raw = {
        "score": "lac", "levels": [0.9],
        "thresholds": {p: {"0.9": [0.5] * 3} for p in ("all", "tabular_only")},
        "ood": {"thresholds": {"all": 1.0, "tabular_only": 1.0},
                "scale": {"all": {"distance": [0.0, 1.0]}}},
    }  # fmt: skip
    params = DecisionParams.from_manifest(raw)
    manifest = SimpleNamespace(labels=labels, label_rule=rule)
    counts = flagged_by_label(
        {"all": (probs, rows), "tabular_only": (probs, rows)}, manifest, params, uniform
    )
    named = rule.pick(probs)
    # With an image, the scaled distance or a flat image; tabular only, the energy of the
    # logits (log-probabilities here: 0, below the threshold), and no image to be flat.
    flagged = {"all": (rows[:, 3] > 1.0) | uniform, "tabular_only": np.zeros(200, bool)}
    for pattern, marked in flagged.items():
        expected = {k: [int(marked[named == i].sum()), int((named == i).sum())]
                    for i, k in enumerate(labels)}  # fmt: skip
        assert counts[pattern] == expected, pattern
    assert counts["all"]["c"][0] > counts["all"]["a"][0]  # the distance was raised for c

    params = DecisionParams.from_manifest(
        raw | {"ood": raw["ood"] | {"val_flagged_by_label": counts}}
    )
    i = int(np.flatnonzero(named != np.argmax(probs, 1))[0])  # the rule names a rarer class
    answer = decide(params, labels, probs[i], "all", 0.9, 0.0, rows[i], named=int(named[i]))
    row = answer["ood"]["val_flagged"]
    f, n = counts["all"][labels[named[i]]]
    assert row == {
        "label": labels[named[i]], "flagged": f, "of": n, "share": round(f / n, 4),
        "share_all_labels": round(sum(c[0] for c in counts["all"].values()) / 200, 4),
    }  # fmt: skip
    old = decide(DecisionParams.from_manifest(raw), labels, probs[0], "all", 0.9, 0.0, rows[0])
    assert "val_flagged" not in old["ood"] and "flagged" in old["ood"]


@pytest.mark.parametrize(
    "model_dir",
    sorted(p.parent for p in (REPO / "models").glob("*/*/manifest.json")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_bundled_val_flag_counts_agree_with_the_decision_report(model_dir) -> None:
    """The counts each answer carries cover every val input once per pattern, and on the
    pattern the report studies add up to the val inputs it found above the threshold (two
    computations of the same flag)."""
    raw = json.loads((model_dir / "manifest.json").read_text())
    decision = raw["decision"]
    counts = decision["ood"]["val_flagged_by_label"]
    assert set(counts) == set(decision["ood"]["thresholds"])
    for pattern, by_label in counts.items():
        assert list(by_label) == raw["labels"], pattern
        assert sum(n for _, n in by_label.values()) == decision["fitted_on"]["n"], pattern
    report = REPO / "docs" / "models" / model_dir.parent.name / model_dir.name / "decision.json"
    ood = json.loads(report.read_text())["ood"]
    studied = ood["val_flagged_by_label"]
    assert sum(f for f, _ in studied.values()) == ood["val_above"]
    assert studied in counts.values()
