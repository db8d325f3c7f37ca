"""Real-data smoke run: a few dozen real images, one epoch at tiny resolution -> export ->
torch/ONNX parity -> served by the service with the same probabilities, every pattern."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

torch = pytest.importorskip("torch", reason="training tests need the 'train' extra (torch)")

from service.api import create_app  # noqa: E402
from service.preprocess import ImageSpec, decode_image  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.smoke_configs import smoke_config  # noqa: E402
from training.ood_embed import PROTOTYPES  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["hk", "hk2", "ham", "ham2", "methods"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, object]]:
    from training import export, train

    tmp = tmp_path_factory.mktemp(f"smoke-{request.param}")
    mp = pytest.MonkeyPatch()
    mp.setattr(train, "CACHE_DIR", tmp / "cache")
    config = smoke_config(tmp, request.param)
    run_dir = train.main(config, tmp / "run")
    models = tmp / "models"
    out = export.main(run_dir, models, "1")  # raises if parity exceeds 1e-4
    assert [p.name for p in out.parent.iterdir()] == ["1"]  # built aside, nothing left there
    _, _, graph, _ = export.load_run(run_dir)
    yield out, graph
    mp.undo()


def test_run_directory_is_complete_and_resumable(exported: tuple[Path, object]) -> None:
    from training import train

    model_dir, _ = exported
    run_dir = model_dir.parents[2] / "run"
    for name in ("config.json", "ckpt_best.pt", "ckpt_last.pt", "history.json", "results.json"):
        assert (run_dir / name).is_file(), name
    before = json.loads((run_dir / "history.json").read_text())
    # Running again resumes: no epoch is trained twice.
    train.main(Path(run_dir.parent / f"{model_dir.parent.name.split('-')[1]}.yaml"), run_dir)
    assert json.loads((run_dir / "history.json").read_text()) == before


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Same seed, same config: stopping after epoch 1 and resuming gives the same weights
    and figures as training straight through (augmentation included)."""
    from training import train

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "CACHE_DIR", tmp_path / "cache")
    try:
        config = smoke_config(tmp_path, "hk2")
        raw = yaml.safe_load(config.read_text())
        raw["train"].update(epochs=2)
        config.write_text(yaml.safe_dump(raw))
        straight = train.main(config, tmp_path / "straight")
        train.main(config, tmp_path / "resumed", stop_after=1)
        assert not (tmp_path / "resumed" / "results.json").exists()
        resumed = train.main(config, tmp_path / "resumed")
    finally:
        mp.undo()
    a = torch.load(straight / "ckpt_last.pt", weights_only=False)
    b = torch.load(resumed / "ckpt_last.pt", weights_only=False)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((resumed / "results.json").read_text())
    assert ra["test"] == rb["test"] and ra["temperatures"] == rb["temperatures"]


def test_second_stage_starts_from_the_first_runs_best_weights(tmp_path: Path) -> None:
    """``train.init_from``: a stage trained at learning rate 0 keeps the weights it started
    from (BatchNorm statistics aside, which move in train mode whatever the rate)."""
    from training import train

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "CACHE_DIR", tmp_path / "cache")
    try:
        config = smoke_config(tmp_path, "hk2")
        first = train.main(config, tmp_path / "first")
        raw = yaml.safe_load(config.read_text())
        raw["train"].update(lr=0.0, backbone_lr=0.0, init_from=str(first), seed=1)
        config.write_text(yaml.safe_dump(raw))
        second = train.main(config, tmp_path / "second")
    finally:
        mp.undo()
    a = torch.load(first / "ckpt_best.pt", weights_only=False)["model"]
    b = torch.load(second / "ckpt_best.pt", weights_only=False)["model"]
    learned = [k for k in a if "running_" not in k and "num_batches" not in k]
    assert learned and all(torch.equal(a[k], b[k]) for k in learned)


def test_manifest_contract(exported: tuple[Path, object]) -> None:
    model_dir, _ = exported
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["training"]["parity_max_abs_diff"] <= 1e-4
    assert set(manifest["calibration"]["temperatures"]) == {
        "all",
        "image_only",
        "tabular_only",
        "partial",
    }
    assert manifest["versions"]["torch"] and manifest["data"]["licence"]
    if manifest["training"]["config"]["train"]["calibration"] == "auto":
        # Each pattern says which rows its calibration was fitted on (the training frames,
        # scored without augmentation, are a candidate).
        fitted_on = manifest["calibration"]["fitted_on"]
        assert set(fitted_on) == set(manifest["calibration"]["temperatures"])
        assert set(fitted_on.values()) <= {"val", "train+val"}
    decision = manifest["decision"]  # fitted at export, for every missingness pattern
    assert set(decision["thresholds"]) == {"all", "image_only", "tabular_only", "partial"}
    assert all(len(q) == len(manifest["labels"]) for q in decision["thresholds"]["all"].values())
    assert set(decision["marginal_thresholds"]) == set(decision["thresholds"])
    # The out-of-distribution distances are added at export too, and judged on val.
    # Every layer is judged; the graph keeps only those the score reads.
    layers = [f["tensor"] for f in manifest["ood_embedding"]["features"]]
    unused = set(decision["ood"].get("unused", {}))
    assert layers and not unused & set(layers)
    assert set(decision["ood"]["capture_shift_flagged"]) == set(layers) | unused
    assert any(k.startswith("/image_proj/") for k in [*layers, *unused])  # the image token
    assert manifest["ood_embedding"]["prototypes_per_class"] == PROTOTYPES
    assert "prototypes per class" in manifest["ood_embedding"]["method"]
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert "ood_distance" in [o.name for o in model.graph.output]
    if decision["ood"].get("signals"):
        assert len(decision["ood"]["signals"]) == len(layers)


def test_manifest_records_the_preprocessing_version(exported: tuple[Path, object]) -> None:
    model_dir, _ = exported
    manifest = json.loads((model_dir / "manifest.json").read_text())
    expected = manifest["training"]["config"]["image"]["preprocessing"]
    assert manifest["image"]["preprocessing"]["version"] == expected
    assert ImageSpec.from_manifest(manifest["image"]).version == expected


def test_served_probabilities_equal_torch(exported: tuple[Path, object]) -> None:
    model_dir, graph = exported
    manifest = json.loads((model_dir / "manifest.json").read_text())
    spec = ImageSpec.from_manifest(manifest["image"])
    csv_path = model_dir.parents[2] / (manifest["name"].removeprefix("smoke-") + ".csv")
    with csv_path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"][:4]
    app = create_app(make_settings(model_dir.parents[1], warmup_runs=1))
    fields = [f["name"] for f in (manifest["tabular"] or {}).get("fields", [])]
    with TestClient(app) as client:
        for row in rows:
            data = Path(row["path"]).read_bytes()
            pixels = torch.from_numpy(np.array(decode_image(data, spec)[None]))
            cases = [({}, True)]
            if fields:
                present = {f: _typed(row[f], f) for f in fields if row[f] not in ("", "unknown")}
                half = dict(list(present.items())[:1])
                cases = [(present, True), ({}, True), (half, True), (present, False)]
            for tabular, with_image in cases:
                if not with_image and not tabular:
                    continue
                body: dict = {"tabular": tabular} if fields else {}
                if with_image:
                    body["image"] = base64.b64encode(data).decode()
                r = client.post(f"/models/{manifest['name']}/predict", json=body)
                assert r.status_code == 200, r.text
                served = np.array([r.json()["probabilities"][k] for k in manifest["labels"]])
                assert abs(served.sum() - 1) < 1e-5 and (served >= 0).all()
                expected = _torch_probs(graph, manifest, pixels, tabular, with_image)
                np.testing.assert_allclose(served, expected, atol=1e-4)


def _typed(value: str, field: str) -> object:
    return float(value) if field == "age" else value


def _torch_probs(graph, manifest, pixels, tabular, with_image) -> np.ndarray:
    fields = manifest["tabular"]["fields"] if manifest["tabular"] else []
    if not fields:
        with torch.no_grad():
            return graph(pixels)[0][0].numpy()
    values = torch.zeros(1, len(fields))
    mask = torch.zeros(1, len(fields))
    for j, f in enumerate(fields):
        if f["name"] in tabular:
            v = tabular[f["name"]]
            values[0, j] = v if f["type"] == "numeric" else f["categories"].index(v)
            mask[0, j] = 1
    if not with_image:
        pixels = torch.zeros_like(pixels)
    with torch.no_grad():
        return graph(pixels, values, mask, torch.tensor([[1.0 if with_image else 0.0]]))[0][
            0
        ].numpy()


def test_curriculum_scores_difficulty_on_the_whole_backbone(tmp_path: Path) -> None:
    """CLIMD on a full fine-tune: difficulty comes from the training frames as stored, run
    through the whole backbone; the epoch order is the curriculum's, and training completes."""
    from training import curriculum, train

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "CACHE_DIR", tmp_path / "cache")
    seen: list[np.ndarray] = []
    original = curriculum.difficulty

    def recorded(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    mp.setattr(train, "difficulty", recorded)
    try:
        config = smoke_config(tmp_path, "ham2")
        raw = yaml.safe_load(config.read_text())
        raw["methods"] = {"curriculum": {"enabled": True}}
        config.write_text(yaml.safe_dump(raw))
        run = train.main(config, tmp_path / "run")
    finally:
        mp.undo()
    assert (run / "results.json").is_file()
    assert len(seen) == 1 and len(seen[0]) == 6 * 7  # one epoch, every labelled training row
    assert np.all((seen[0] >= 0) & (seen[0] <= 1))


@pytest.mark.parametrize("name", ["ham2", "hk2"])
def test_mics_pretraining_runs_over_pixels_on_the_whole_backbone(tmp_path: Path, name: str) -> None:
    """MICS on a full fine-tune, with tabular fields and without: the label-free stage draws
    augmented views of each training frame through the whole backbone, moves the backbone's
    weights, then the fine-tune starts from them and completes."""
    from training import pretrain, train

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "CACHE_DIR", tmp_path / "cache")
    moved: list[float] = []
    original = pretrain.pretrain_pixels

    def recorded(model, *args, **kwargs):
        before = [p.detach().clone() for p in model.tail.parameters()]
        history = original(model, *args, **kwargs)
        after = list(model.tail.parameters())
        moved.append(max((a - b).abs().max().item() for a, b in zip(after, before, strict=True)))
        return history

    mp.setattr(train, "pretrain_pixels", recorded)
    try:
        config = smoke_config(tmp_path, name)
        raw = yaml.safe_load(config.read_text())
        raw["methods"] = {"pretrain": {"enabled": True, "epochs": 2}}
        config.write_text(yaml.safe_dump(raw))
        run = train.main(config, tmp_path / "run")
    finally:
        mp.undo()
    assert (run / "results.json").is_file()
    assert len(moved) == 1 and moved[0] > 0
    history = json.loads((run / "pretrain.json").read_text())
    assert len(history) == 2
    for epoch in history:
        assert set(epoch) == {"consistency", "reconstruction", "alignment"}
        assert all(np.isfinite(v) and v > 0 for v in epoch.values())


def test_run_stopped_inside_pretraining_resumes_it(tmp_path: Path) -> None:
    """MICS over pixels is the longest stage of a run and saves its state every epoch: a run
    stopped after its first pretraining epoch resumes at the second, not from scratch, and
    ends with the weights of a run never stopped (same seed, augmentation included)."""
    from training import train

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "CACHE_DIR", tmp_path / "cache")
    try:
        config = smoke_config(tmp_path, "hk2")
        raw = yaml.safe_load(config.read_text())
        raw["methods"] = {"pretrain": {"enabled": True, "epochs": 2}}
        config.write_text(yaml.safe_dump(raw))
        straight = train.main(config, tmp_path / "straight")
        resumed = train.main(config, tmp_path / "resumed", stop_after=1)
        assert not (resumed / "pretrain.json").exists()
        assert not (resumed / "ckpt_last.pt").exists()
        stage = torch.load(resumed / "ckpt_pretrain.pt", weights_only=False)
        assert stage["epoch"] == 1 and len(stage["history"]) == 1
        train.main(config, resumed)
    finally:
        mp.undo()
    a = json.loads((straight / "pretrain.json").read_text())
    b = json.loads((resumed / "pretrain.json").read_text())
    assert len(b) == 2
    for ea, eb in zip(a, b, strict=True):
        assert ea == pytest.approx(eb, rel=1e-5)
    wa = torch.load(straight / "ckpt_last.pt", weights_only=False)["model"]
    wb = torch.load(resumed / "ckpt_last.pt", weights_only=False)["model"]
    for key, value in wa.items():
        torch.testing.assert_close(wb[key], value, rtol=0, atol=1e-6, msg=key)
