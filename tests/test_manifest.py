"""Start-up refuses a model whose manifest and ONNX graph disagree, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.errors import ManifestError
from service.registry import Registry
from tests.builders import FIELDS, build_model, write_model_dir
from tests.conftest import make_settings


def load(root: Path) -> Registry:
    return Registry.load(root, providers=["CPUExecutionProvider"], warmup_runs=1)


def edit_manifest(vdir: Path, **changes: object) -> None:
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest.update(changes)
    (vdir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"labels": ["a", "b"]}, "labels"),
        ({"image": {"height": 64, "width": 32}}, "image"),
        ({"tabular": {"fields": FIELDS[:2]}}, "tabular"),
        ({"tabular": None}, "tabular"),
        ({"inputs": {"image_mask": False}}, "image_mask"),
        ({"version": "7"}, "version"),
        ({"labels": ["a", "a", "b"]}, "labels"),
    ],
)
def test_mismatch_names_the_field(tmp_path: Path, change: dict, field: str) -> None:
    vdir = write_model_dir(tmp_path, "derm", "1", fields=FIELDS, image_mask=True)
    edit_manifest(vdir, **change)
    with pytest.raises(ManifestError, match=field):
        load(tmp_path)


def test_missing_or_broken_manifest_is_reported(tmp_path: Path) -> None:
    vdir = write_model_dir(tmp_path, "endo", "1")
    (vdir / "manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load(tmp_path)
    (vdir / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest\.json is missing"):
        load(tmp_path)


def test_graph_without_probabilities_output_is_refused(tmp_path: Path) -> None:
    vdir = write_model_dir(tmp_path, "endo", "1")
    model = build_model()
    model.graph.output.pop(0)  # drop "probabilities"
    onnx.save(model, vdir / "model.onnx")
    with pytest.raises(ManifestError, match="probabilities"):
        load(tmp_path)


def test_app_start_up_fails_on_mismatch(tmp_path: Path) -> None:
    vdir = write_model_dir(tmp_path, "endo", "1")
    edit_manifest(vdir, labels=["only-one"])
    app = create_app(make_settings(tmp_path))
    with pytest.raises(ManifestError, match="labels"), TestClient(app):
        pass


def test_app_loads_models_itself_and_is_ready(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "endo", "1")
    write_model_dir(tmp_path, "endo", "10")
    write_model_dir(tmp_path, "endo", "9")
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/models/endo").json()["versions"] == ["1", "9", "10"]
    assert not app.state.ctx.ready, "shutdown marks the app not ready"


def test_unknown_default_model_is_refused(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "endo", "1")
    with pytest.raises(ManifestError, match="default model"):
        Registry.load(tmp_path, providers=["CPUExecutionProvider"], default_model="nope")


def test_repository_default_left_out_by_the_model_filter_gives_way(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "endo", "1")
    write_model_dir(tmp_path, "derm", "1")
    (tmp_path / "DEFAULT").write_text("endo\n")
    both = Registry.load(tmp_path, providers=["CPUExecutionProvider"], warmup_runs=0)
    assert both.default_model == "endo"
    alone = Registry.load(
        tmp_path, providers=["CPUExecutionProvider"], warmup_runs=0, only=["derm"]
    )
    assert alone.default_model == "derm"
