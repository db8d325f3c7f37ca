"""Calibration and its measurement on synthetic cases: temperatures per pattern, bias-corrected
temperature scaling under a shifted prior, the cross-validated choice (groups kept whole,
training rows taken only where honest), the ECE estimator's floor, and the parameters'
round trip through the manifest and the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training tests need the 'train' extra (torch)")

from training.backbone import load_pretrained  # noqa: E402
from training.calibrate import fit_per_pattern, fit_temperature, softmax  # noqa: E402
from training.metrics import calibrated_eces, classwise_ece, ece, ece_floor  # noqa: E402
from training.patterns import ALL, IMAGE_ONLY, TABULAR_ONLY  # noqa: E402


def test_temperature_lowers_ece_on_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 4000)
    logits = rng.normal(size=(4000, 4))
    logits[np.arange(4000), labels] += 1.0
    overconfident = logits * 6  # same ranking, far too sharp
    t = fit_temperature(overconfident, labels)
    assert 3 < t < 12
    before = ece(softmax(overconfident), labels)
    after = ece(softmax(overconfident, t), labels)
    assert before > 0.15 and after < 0.03


def test_ece_floor_is_what_a_calibrated_model_measures_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6000, 5)) * 1.5
    probs = softmax(logits)
    # Labels drawn from the probabilities themselves: calibrated by construction.
    labels = (probs.cumsum(1) < rng.random((6000, 1))).sum(1)
    small, large = ece_floor(probs[:500]), ece_floor(probs)
    assert small[0] > 1.8 * large[0], (small, large)  # the estimator's bias ~ 1/sqrt(n)
    assert ece(probs, labels) <= large[1]
    assert ece(probs[:500], labels[:500]) <= small[1]
    # A miscalibrated model stands out from the floor.
    assert ece(softmax(logits * 3), labels) > 3 * large[1]


def test_ece_floor_counts_a_lesion_once_however_many_images_it_has() -> None:
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(800, 5)) * 1.5)
    # Each lesion photographed three times with one diagnosis: 2,400 images, 800 labels.
    tripled, lesion = np.repeat(probs, 3, axis=0), np.repeat(np.arange(800), 3)
    alone = ece_floor(probs)
    grouped = ece_floor(tripled, groups=lesion)
    independent = ece_floor(tripled)
    assert abs(grouped[0] - alone[0]) < 0.15 * alone[0], (grouped, alone)
    assert grouped[0] > 1.4 * independent[0], (grouped, independent)
    assert grouped[1] > independent[1]


def test_calibrated_draws_give_a_p_value_that_rejects_only_miscalibration() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(1000, 5)) * 1.5
    probs = softmax(logits)
    null = calibrated_eces(probs, draws=300)
    p_values = []
    for _ in range(20):  # test splits labelled by a perfectly calibrated world
        labels = (probs.cumsum(1) < rng.random((1000, 1))).sum(1)
        p_values.append(np.mean(null >= ece(probs, labels)))
    assert np.mean(np.array(p_values) < 0.05) <= 0.2, p_values
    overconfident = softmax(logits * 3)
    assert np.mean(calibrated_eces(overconfident, draws=300) >= ece(overconfident, labels)) == 0


def test_per_pattern_temperatures_differ_when_confidence_does() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3))
    logits[np.arange(3000), labels] += 1.5
    patterns = np.repeat([ALL, IMAGE_ONLY, TABULAR_ONLY], 1000)
    scaled = logits * np.where(patterns == IMAGE_ONLY, 5.0, 1.0)[:, None]
    temps = fit_per_pattern(scaled, labels, patterns)
    assert temps["image_only"] > 3 * temps["all"]
    assert temps["partial"] > 0, "an unseen pattern falls back to the pooled temperature"


def _shifted_prior_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model trained with a rare class over-sampled: its logit is inflated."""
    rng = np.random.default_rng(seed)
    prior = np.log(np.array([0.6, 0.3, 0.1]))
    true_logits = rng.normal(size=(n, 3)) * 1.5 + prior
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = (p.cumsum(1) < rng.random((n, 1))).sum(1)
    return 1.5 * (true_logits + np.array([0.0, 0.7, 2.0])), labels


def test_bias_corrected_calibration_undoes_a_shifted_prior() -> None:
    from training.calibrate import calibrated, fit_bcts, fit_calibration

    logits, labels = _shifted_prior_case(6000, 0)
    test_logits, test_labels = _shifted_prior_case(6000, 1)
    t = fit_temperature(logits, labels)
    t_b, bias = fit_bcts(logits, labels)
    ts_probs = calibrated(test_logits, t, None)
    bcts_probs = calibrated(test_logits, t_b, bias)
    # The rare class is over-predicted after temperature scaling alone, not after BCTS.
    assert ts_probs[:, 2].mean() > 1.5 * (test_labels == 2).mean()
    assert abs(bcts_probs[:, 2].mean() - (test_labels == 2).mean()) < 0.02
    assert classwise_ece(bcts_probs, test_labels) < 0.7 * classwise_ece(ts_probs, test_labels)
    nll = lambda p: -np.log(p[np.arange(len(test_labels)), test_labels]).mean()  # noqa: E731
    assert nll(bcts_probs) < nll(ts_probs)
    assert bias[2] - bias[0] < -1.0  # the inflated logit is pulled back down
    params = fit_calibration(logits, labels, np.zeros(len(labels), np.int64))
    assert params["all"]["method"] == "BCTS"
    # Without a prior shift the extra parameters do not pay for themselves out of sample.
    rng = np.random.default_rng(2)
    fair = rng.integers(0, 3, 3000)
    plain = rng.normal(size=(3000, 3))
    plain[np.arange(3000), fair] += 1.0
    assert fit_calibration(plain, fair, np.zeros(3000, np.int64))["all"]["method"] == "TS"


def test_calibration_cross_validation_keeps_a_group_in_one_fold() -> None:
    """A lesion's images (one diagnosis, and without an image the same input) stay in one
    fold, so the calibrator choice is not scored on rows it was fitted to; the choice under a
    shifted prior holds with groups too."""
    from training.calibrate import _half, fit_calibration

    groups = np.repeat(np.arange(300), 3)
    for seed in range(5):
        half = _half(len(groups), groups, np.random.default_rng(seed))
        assert 0.4 < half.mean() < 0.6
        for g in range(300):
            assert len(set(half[groups == g])) == 1
    plain = _half(900, None, np.random.default_rng(0))
    assert plain.sum() == 450
    assert any(len(set(plain[groups == g])) == 2 for g in range(300))
    logits, labels = _shifted_prior_case(3000, 0)
    lesions = np.arange(3000) // 2
    chosen = fit_calibration(logits, labels, np.zeros(3000, np.int64), groups=lesions)
    assert chosen["all"]["method"] == "BCTS"


def test_calibration_takes_training_rows_only_where_they_are_honest() -> None:
    """Training logits drawn as val's are (a small network that memorises little) make a
    better calibrator from a small val split; training logits overconfident on their own
    rows (a fine-tuned backbone in-sample) are left out. Only val rows decide."""
    from training.calibrate import calibrated, fit_calibration

    val_logits, val_labels = _shifted_prior_case(300, 3)
    train_logits, train_labels = _shifted_prior_case(6000, 4)
    fresh_logits, fresh_labels = _shifted_prior_case(20000, 5)
    pids = np.zeros(300, np.int64)
    honest = (train_logits, train_labels, np.zeros(6000, np.int64))
    chosen = fit_calibration(val_logits, val_labels, pids, train=honest)["all"]
    assert chosen["data"] == "train+val" and set(chosen["cv_nll"]) >= {"BCTS", "BCTS+train"}
    alone = fit_calibration(val_logits, val_labels, pids)["all"]
    assert alone["data"] == "val" and "BCTS+train" not in alone["cv_nll"]

    def nll(params: dict) -> float:
        p = calibrated(fresh_logits, params["temperature"], np.array(params["bias"]))
        return float(-np.log(p[np.arange(len(fresh_labels)), fresh_labels]).mean())

    assert nll(chosen) < nll(alone)
    overconfident = (3.0 * train_logits, train_labels, np.zeros(6000, np.int64))
    refused = fit_calibration(val_logits, val_labels, pids, train=overconfident)["all"]
    assert refused["data"] == "val"
    assert refused["cv_nll"]["BCTS+train"] > refused["cv_nll"]["BCTS"]


def test_calibration_parameters_round_trip_through_manifest_and_onnx(tmp_path: Path) -> None:
    """Per-pattern temperatures and class biases reach the ONNX graph: its probabilities are
    softmax(logits / T_pattern + b_pattern) for the pattern the masks imply."""
    import json

    import onnxruntime as ort

    from service.manifest import parse_manifest
    from service.tabular import FieldSpec, TabularSchema
    from training.calibrate import calibrated
    from training.config import ModelConfig
    from training.export import ServingGraph, export_onnx
    from training.model import FusionModel
    from training.patterns import PATTERN_NAMES

    schema = TabularSchema(
        (FieldSpec("age", "numeric", mean=50.0, std=10.0), FieldSpec("sex", "categorical",
         categories=("female", "male"))),
    )  # fmt: skip
    torch.manual_seed(0)
    model = FusionModel(3, schema, ModelConfig(fusion="mlp", finetune_from_block=None)).eval()
    rng = np.random.default_rng(0)
    temps = {name: float(t) for name, t in zip(PATTERN_NAMES, (0.7, 1.3, 2.1, 0.9), strict=True)}
    biases = {name: rng.normal(size=3).round(3).tolist() for name in PATTERN_NAMES}
    graph = ServingGraph(load_pretrained(), model, temps, None, biases).eval()
    n = 8
    image = torch.from_numpy(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8))
    values = torch.tensor([[60.0, 1.0]] * n)
    # Rows 0-1 all fields, 2-3 none, 4-5 one field (partial), 6-7 no image (tabular only).
    mask = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 0], [1, 0], [0, 1], [1, 1], [1, 0]]).float()
    image_mask = torch.tensor([[1.0]] * 6 + [[0.0]] * 2)
    path = tmp_path / "model.onnx"
    export_onnx(graph, (image, values, mask, image_mask), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": image.numpy(), "tabular": values.numpy(), "tabular_mask": mask.numpy(),
             "image_mask": image_mask.numpy()}  # fmt: skip
    probs, logits = session.run(["probabilities", "logits"], feeds)
    expected_pattern = ["all", "all", "image_only", "image_only", "partial", "partial",
                        "tabular_only", "tabular_only"]  # fmt: skip
    for i, name in enumerate(expected_pattern):
        want = calibrated(logits[i : i + 1], temps[name], np.array(biases[name]))[0]
        np.testing.assert_allclose(probs[i], want, atol=1e-5)
    # The manifest carries the same numbers and the service reads them back.
    calibration = {"temperatures": temps, "biases": biases}
    raw = {"name": "m", "version": "1", "labels": ["a", "b", "c"],
           "image": {"height": 32, "width": 32}, "calibration": calibration}  # fmt: skip
    back = parse_manifest(json.loads(json.dumps(raw))).raw["calibration"]
    assert back["biases"] == biases and back["temperatures"] == temps
