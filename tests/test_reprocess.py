"""A version served under another preprocessing version (``endofuse reprocess``): the graph,
its calibration and self-check copied unchanged, refused where the new preprocessing would
change what the model sees on its own data."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from service.api import create_app
from service.cli import app
from tests.conftest import REPO, make_settings, require_data
from tests.images import png

MODELS = REPO / "models"


def _copy(tmp_path: Path, name: str, version: str) -> Path:
    src = MODELS / name / version
    if not (src / "model.onnx").is_file():
        pytest.skip(f"bundled model {name}/{version} not present")
    dst = tmp_path / name / version
    shutil.copytree(src, dst)
    return dst


def _run(model_dir: Path, version: str, preprocessing: int) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        ["reprocess", str(model_dir), "--version", version, "--preprocessing", str(preprocessing)],
    )
    return result.exit_code, result.output


def test_a_preprocessing_that_changes_the_models_own_inputs_is_refused(tmp_path: Path) -> None:
    """hyperkvasir-lgi/2 was trained on version 2's ellipse-masked frames: version 4 would
    show it other pixels for every val frame, so no copy is written."""
    pytest.importorskip("torch")  # the command belongs to the 'train' extra
    require_data("hyperkvasir-lgi")
    model_dir = _copy(tmp_path, "hyperkvasir-lgi", "2")
    code, output = _run(model_dir, "9", 4)
    assert code == 2 and "of val inputs" in output and "needs training" in output, output
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["2"]
    code, output = _run(model_dir, "9", 2)
    assert code == 2 and "already uses version 2" in output


def test_fixed_masks_cannot_be_rebased(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    model_dir = _copy(tmp_path, "hyperkvasir-lgi", "1")
    code, output = _run(model_dir, "9", 4)
    assert code == 2 and "blanks fixed regions" in output, output
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["1"]


@pytest.mark.parametrize(("version", "source"), [("9", "7"), ("10", "8")])
def test_bundled_rebase_keeps_the_graph_and_its_calibration(version: str, source: str) -> None:
    """ham10000/9 is ham10000/7 read with preprocessing version 4, /10 the same of /8 (its
    int8 variant): the same graph file, the same calibration and self-check probes; their own
    decision fit, on val read the new way."""
    if not (MODELS / "ham10000" / version / "model.onnx").is_file():
        pytest.skip(f"bundled model ham10000/{version} not present")
    new = json.loads((MODELS / "ham10000" / version / "manifest.json").read_text())
    old = json.loads((MODELS / "ham10000" / source / "manifest.json").read_text())
    assert new["files"]["model.onnx"] == old["files"]["model.onnx"]
    for key in ("calibration", "labels", "tabular", "inputs", "outputs"):
        assert new[key] == old[key], key
    # Recorded again by the decision fit (on this build's host): the same graph, the same answers.
    assert new["self_check"]["inputs"] == old["self_check"]["inputs"]
    np.testing.assert_allclose(
        new["self_check"]["probabilities"], old["self_check"]["probabilities"], atol=1e-5
    )
    assert new["image"]["preprocessing"]["version"] == 4
    assert old["image"]["preprocessing"]["version"] == 1
    record = new["reprocessed"]
    assert record["from"] == f"ham10000/{source}" and record["preprocessing_before"] == 1
    val = record["inputs_changed"]["val"]
    assert val["n"] == old["data"]["split_sizes"]["val"] and val["changed"] <= 0.02 * val["n"]
    assert new["decision"]["fitted_on"] == {"split": "val", "n": val["n"]}


def test_version_9_reads_a_letterboxed_frame_as_stored() -> None:
    """ham10000/9 is /7's graph served with preprocessing version 4: on stored test images it
    answers as /7, and a frame in a 16:9 letterbox reaches its graph as the stored frame does,
    where /7 squashes the bars in."""
    if not (MODELS / "ham10000" / "9" / "model.onnx").is_file():
        pytest.skip("bundled model ham10000/9 not present")
    root = require_data("ham10000")
    with (root / "metadata.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"][::75]
    with TestClient(create_app(make_settings(MODELS, warmup_runs=0))) as client:
        meta = client.get("/models/ham10000/versions/9").json()
        assert meta["image"]["preprocessing"]["version"] == 4
        moved = _moved_by_letterbox(client, root, rows)
    assert np.mean(moved["9"]) < 0.5 * np.mean(moved["7"]), moved


def _moved_by_letterbox(client: TestClient, root: Path, rows: list[dict]) -> dict[str, list]:
    """Per version, how far (total variation) each image's probabilities move when it comes
    in a 16:9 letterbox; the stored images answered alike by both versions."""
    moved: dict[str, list[float]] = {"7": [], "9": []}
    for row in rows:
        stored = (root / row["path"]).read_bytes()
        with Image.open(io.BytesIO(stored)) as im:
            frame = Image.new("RGB", (1920, 1080))
            frame.paste(im.convert("RGB").resize((1440, 1080)), (240, 0))
        boxed = png(np.asarray(frame))
        answers = {}
        for version in moved:
            url = f"/models/ham10000/versions/{version}/predict"
            answers[version] = [
                np.array(
                    list(
                        client.post(url, files={"image": ("f", data)})
                        .json()["probabilities"]
                        .values()
                    )
                )
                for data in (stored, boxed)
            ]
            moved[version].append(np.abs(answers[version][1] - answers[version][0]).sum() / 2)
        np.testing.assert_allclose(answers["9"][0], answers["7"][0], atol=1e-5)
    return moved
