"""Model cards: generated from the recorded reports, in step with them, and honest about
what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from training.card import card, main

REPO = Path(__file__).resolve().parents[1]
BUNDLED = sorted(p.parent for p in (REPO / "models").glob("*/*/manifest.json"))


@pytest.mark.parametrize("model_dir", BUNDLED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_card_matches_its_reports(model_dir: Path) -> None:
    """docs/models/<name>/<version>/card.md is what `endofuse card` writes from the version's
    manifest and reports today: a refit or re-evaluation that left the card behind fails."""
    reports = REPO / "docs" / "models" / model_dir.parent.name / model_dir.name
    committed = reports / "card.md"
    assert committed.is_file(), f"no card for {model_dir.name}: run `endofuse card {model_dir}`"
    assert committed.read_text() == card(model_dir, reports)


def test_card_carries_the_recorded_figures() -> None:
    model_dir = REPO / "models" / "hyperkvasir-lgi" / "2"
    reports = REPO / "docs" / "models" / "hyperkvasir-lgi" / "2"
    text = card(model_dir, reports)
    results = json.loads((reports / "results.json").read_text())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    first = results["patterns"]["all"]
    assert f"| all inputs | {first['n']} | {first['balanced_accuracy']:.3f} |" in text
    assert f"| {first['macro_f1']:.3f} |" in text
    assert manifest["files"]["model.onnx"]["sha256"] in text
    assert manifest["data"]["licence"] in text
    worst = results["audit"]["counterfactual"]["worst_flip_rate"]
    assert f"| {worst:.1%} |" in text
    ood = json.loads((reports / "decision.json").read_text())["ood"]
    flagged = ood["in_distribution_flagged_by_class"]
    over = [k for k, (f, n) in flagged.items() if f / n > 0.05]
    for label in flagged:
        assert (f"`{label}` {flagged[label][0] / flagged[label][1]:.1%}" in text) == (label in over)


def test_card_of_an_int8_variant_says_how_it_was_rounded() -> None:
    """The card names the learned rounding where the manifest records it, and only there."""
    for name, version, learned in (("ham10000", "6", True), ("hyperkvasir-lgi", "4", False)):
        model_dir = REPO / "models" / name / version
        quant = json.loads((model_dir / "manifest.json").read_text())["quantization"]
        text = card(model_dir, REPO / "docs" / "models" / name / version)
        layers = (quant.get("rounding") or {}).get("layers")
        assert ("rounding learned and biases corrected" in text) == learned
        if learned:
            assert f"corrected in {layers} layers" in text


def test_card_follows_an_edited_report(tmp_path: Path) -> None:
    """The card reads the reports: change one figure and the card says the new one."""
    model_dir = REPO / "models" / "hyperkvasir-lgi" / "2"
    reports = tmp_path / "reports"
    shutil.copytree(REPO / "docs" / "models" / "hyperkvasir-lgi" / "2", reports)
    results = json.loads((reports / "results.json").read_text())
    results["patterns"]["all"]["per_class_recall"]["polyp"] = 0.123
    (reports / "results.json").write_text(json.dumps(results))
    text = card(model_dir, reports)
    assert "| polyp | 0.123 |" in text
    assert "Weakest class: `polyp`, recall 0.123" in text


def test_card_of_an_unevaluated_version(tmp_path: Path) -> None:
    """A version outside the repository with no reports yet gets a card that says so."""
    model_dir = tmp_path / "m" / "7"
    model_dir.mkdir(parents=True)
    raw = json.loads((REPO / "models" / "ham10000" / "2" / "manifest.json").read_text())
    raw.pop("decision", None)
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    out = main(model_dir)
    assert out == model_dir / "decision-report" / "card.md"
    text = out.read_text()
    assert "Not evaluated: no `results.json`" in text
    assert "No `decision.json` beside this card" in text
    assert "No audit in `results.json`" in text
    assert "age, sex, localization" in text  # the tabular schema, from the manifest


def test_card_command(tmp_path: Path) -> None:
    runner = CliRunner()
    a, b = (str(REPO / "models" / "hyperkvasir-lgi" / v) for v in ("1", "2"))
    refused = runner.invoke(app, ["card", a, b, "--out", str(tmp_path / "c.md")])
    assert refused.exit_code != 0
    done = runner.invoke(app, ["card", b, "--out", str(tmp_path / "c.md")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "c.md").read_text().startswith("# hyperkvasir-lgi/2: model card")
