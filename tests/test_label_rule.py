"""The label a response names: argmax by default, or the balanced rule a manifest asks for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.errors import ManifestError
from service.label_rule import LabelRule
from service.manifest import parse_manifest
from tests import images
from tests.builders import build_manifest, write_model_dir
from tests.conftest import add_decision, make_settings


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float(np.mean([(pred[labels == c] == c).mean() for c in range(k)]))


def test_balanced_rule_raises_balanced_accuracy_under_a_skewed_prior() -> None:
    """Labels drawn from known calibrated probabilities with one dominant class: dividing by
    the prior is the Bayes rule for balanced accuracy, so it must beat the argmax there."""
    rng = np.random.default_rng(0)
    prior = np.array([0.80, 0.12, 0.05, 0.03])
    n, k = 20_000, len(prior)
    # Posterior = prior x a noisy per-class likelihood; labels sampled from that posterior.
    likelihood = rng.dirichlet(np.ones(k) * 0.7, size=n)
    posterior = prior * likelihood
    posterior /= posterior.sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in posterior])
    rule = LabelRule.balanced(labels, k)
    assert np.allclose(rule.prior, np.bincount(labels) / n)
    argmax = balanced_accuracy(posterior.argmax(1), labels, k)
    balanced = balanced_accuracy(rule.pick(posterior), labels, k)
    assert balanced > argmax + 0.05, (balanced, argmax)
    # ... and the plain accuracy pays for it: the argmax is the Bayes rule for that one.
    assert (posterior.argmax(1) == labels).mean() > (rule.pick(posterior) == labels).mean()


def test_rule_round_trips_and_old_manifests_keep_argmax() -> None:
    raw = build_manifest("m", "1")
    assert parse_manifest(raw).label_rule == LabelRule()
    rule = LabelRule("balanced", (0.5, 0.3, 0.2))
    raw["label_rule"] = rule.to_manifest("test shares")
    parsed = parse_manifest(json.loads(json.dumps(raw))).label_rule
    assert parsed.kind == "balanced" and parsed.prior == pytest.approx(rule.prior)
    assert int(parsed.pick(np.array([0.45, 0.35, 0.20]))) == 1  # 0.35/0.3 > 0.45/0.5
    assert int(LabelRule().pick(np.array([0.45, 0.35, 0.20]))) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "balanced", "class_prior": [0.5, 0.5]},  # 3 labels
        {"kind": "balanced"},
        {"kind": "balanced", "class_prior": [0.5, 0.5, 0.0]},
        {"kind": "cheapest"},
    ],
)
def test_an_invalid_rule_is_a_manifest_error(bad: dict) -> None:
    raw = build_manifest("m", "1") | {"label_rule": bad}
    with pytest.raises(ManifestError, match="label_rule"):
        parse_manifest(raw)


# One class nearly the whole training prior: the rule names it only on overwhelming evidence.
# It is the class the seeded test model favours on noise, so some answers must change.
SKEWED = LabelRule("balanced", (0.01, 0.01, 0.98))


@pytest.fixture()
def balanced_client(tmp_path: Path) -> Iterator[TestClient]:
    vdir = write_model_dir(tmp_path, "endo", "1", seed=5)
    add_decision(vdir)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["label_rule"] = SKEWED.to_manifest("test")
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    app = create_app(make_settings(tmp_path))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_service_names_the_label_by_the_manifest_rule(balanced_client: TestClient) -> None:
    differs = 0
    for seed in range(12):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        frame = images.jpeg(pixels)
        r = balanced_client.post("/predict", files={"image": ("f.jpg", frame, "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        labels = list(body["probabilities"])
        probs = np.array([body["probabilities"][n] for n in labels])
        assert body["label_rule"] == "balanced"
        assert body["label"] == labels[int(SKEWED.pick(probs))]
        assert body["label"] in body["prediction_set"]  # the named class is always in the set
        differs += body["label"] != labels[int(probs.argmax())]
    assert differs > 0  # the rule changed at least one answer, so it was applied
