"""The models shipped in models/ load, pass the manifest checks and answer real data."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.api import create_app
from service.manifest import load_manifest
from service.registry import Registry
from tests.conftest import REPO, make_settings, require_data
from tests.images import png

MODELS = REPO / "models"


def bundled(name: str, version: str = "1") -> Path:
    path = MODELS / name / version
    if not (path / "model.onnx").is_file():
        pytest.skip(f"bundled model {name}/{version} not present")
    return path


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    if not any(MODELS.glob("*/*/model.onnx")):
        pytest.skip("no bundled models")
    app = create_app(make_settings(MODELS, warmup_runs=1, max_body_bytes=20_000_000))
    with TestClient(app) as c:
        yield c


def test_default_model_is_the_endoscopy_model(client: TestClient) -> None:
    assert client.get("/models").json()["default"] == "hyperkvasir-lgi"


def test_newest_endoscopy_version_serves_by_default(client: TestClient) -> None:
    bundled("hyperkvasir-lgi", "2")
    frame = png(np.full((64, 64, 3), 120, np.uint8))
    r = client.post("/predict", files={"image": ("f.png", frame, "image/png")})
    assert r.status_code == 200 and r.json()["model"] == {"name": "hyperkvasir-lgi", "version": "2"}
    manifest = client.get("/models/hyperkvasir-lgi/versions/2").json()
    assert manifest["image"]["preprocessing"]["version"] == 2


@pytest.mark.parametrize("version", ["1", "2"])
def test_endoscopy_model_classifies_untouched_fullres_frames(
    client: TestClient, fullres_frames: list[Path], version: str
) -> None:
    """40 original-resolution frames, as a client would post them. 30 of them are training
    images seen at 320 px: this checks the full-resolution serving path, not generalisation
    (the test split does that, in docs/models/). Version 1 (no preprocessing version in its
    manifest) still serves as before."""
    bundled("hyperkvasir-lgi", version)
    correct = 0
    for frame in fullres_frames:
        r = client.post(
            f"/models/hyperkvasir-lgi/versions/{version}/predict",
            files={"image": (frame.name, frame.read_bytes(), "image/jpeg")},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
        correct += body["label"] == frame.parent.name
    assert correct / len(fullres_frames) >= 0.85, f"{correct}/{len(fullres_frames)} correct"


def test_endoscopy_v2_keeps_its_answer_on_another_capture_card(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    """The same frames as a 16:9 capture card delivers them (black pillarbox, 1920x1080):
    version 2 reads the tissue, so the class stays."""
    bundled("hyperkvasir-lgi", "2")
    same = 0
    for frame in fullres_frames:
        original = Image.open(io.BytesIO(frame.read_bytes())).convert("RGB")
        wide = letterbox(original, 1920, 1080)
        answers = []
        for data in (frame.read_bytes(), jpeg_bytes(wide)):
            r = client.post(
                "/models/hyperkvasir-lgi/versions/2/predict",
                files={"image": ("frame.jpg", data, "image/jpeg")},
            )
            assert r.status_code == 200, r.text
            answers.append(r.json()["label"])
        same += answers[0] == answers[1]
    assert same >= len(fullres_frames) - 1, f"{same}/{len(fullres_frames)} kept their class"


def letterbox(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    size = (round(image.width * scale), round(image.height * scale))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize(size), ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_fusion_model_answers_every_pattern_on_real_rows(client: TestClient) -> None:
    model_dir = bundled("ham10000")
    root = require_data("ham10000")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    with (root / "metadata.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"][:6]
    for row in rows:
        image = (root / row["path"]).read_bytes()
        full = {
            "age": float(row["age"]) if row["age"] else None,
            "sex": row["sex"],
            "localization": row["localization"],
        }
        for tabular, with_image in (
            (full, True),
            ({}, True),
            ({"sex": row["sex"]}, True),
            (full, False),
        ):
            files = {"image": ("x.jpg", image, "image/jpeg")} if with_image else None
            data = {"tabular": json.dumps(tabular)}
            if files is None:
                r = client.post("/models/ham10000/predict", json={"tabular": tabular})
            else:
                r = client.post("/models/ham10000/predict", files=files, data=data)
            assert r.status_code == 200, r.text
            probs = r.json()["probabilities"]
            assert list(probs) == manifest["labels"]
            assert abs(sum(probs.values()) - 1) < 1e-4
            assert r.json()["modalities"]["image"] is with_image


def test_prediction_sets_and_referral_through_the_api(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    """The bundled models carry fitted conformal thresholds: every answer has a set holding
    its label, sets grow with the coverage asked, and an unfitted level is a clear 422."""
    bundled("hyperkvasir-lgi", "2")
    data = fullres_frames[0].read_bytes()
    sets = {}
    for coverage in ("0.8", "0.9", "0.95"):
        r = client.post(
            f"/predict?coverage={coverage}", files={"image": ("f.jpg", data, "image/jpeg")}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["coverage"] == float(coverage)
        assert body["label"] == body["prediction_set"][0]
        assert body["refer"] == (len(body["prediction_set"]) > 1)
        assert (body["reason"] is None) != body["refer"]
        sets[coverage] = set(body["prediction_set"])
    assert sets["0.8"] <= sets["0.9"] <= sets["0.95"]
    default = client.post("/predict", files={"image": ("f.jpg", data, "image/jpeg")}).json()
    assert default["coverage"] == 0.9 and default["sets"] == "class"
    marginal = {}
    for coverage in ("0.8", "0.9", "0.95"):
        r = client.post(
            f"/predict?coverage={coverage}&sets=marginal",
            files={"image": ("f.jpg", data, "image/jpeg")},
        )
        assert r.status_code == 200, r.text
        assert r.json()["sets"] == "marginal" and r.json()["label"] in r.json()["prediction_set"]
        marginal[coverage] = set(r.json()["prediction_set"])
    assert marginal["0.8"] <= marginal["0.9"] <= marginal["0.95"]
    r = client.post("/predict?coverage=0.5", files={"image": ("f.jpg", data, "image/jpeg")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    # The fusion model answers with sets in every pattern, tabular only included.
    bundled("ham10000")
    r = client.post("/models/ham10000/predict", json={"tabular": {"age": 70, "sex": "male"}})
    assert r.status_code == 200, r.text
    assert r.json()["label"] in r.json()["prediction_set"]


def test_out_of_distribution_flag_on_the_endoscopy_model(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    """A solid colour, noise and a dermoscopy image are flagged and referred; real
    endoscopy frames pass (the threshold lets 95 % of val through)."""
    bundled("hyperkvasir-lgi", "2")
    rng = np.random.default_rng(0)
    odd = [np.full((240, 320, 3), (40, 160, 40), np.uint8), rng.integers(0, 256, (240, 320, 3))]
    bodies = [png(a.astype(np.uint8)) for a in odd]
    ham = require_data("ham10000")
    bodies.append(next(iter(sorted((ham / "images" / "nv").glob("*.jpg")))).read_bytes())
    for body in bodies:
        r = client.post("/predict", files={"image": ("x", body, "application/octet-stream")})
        assert r.status_code == 200, r.text
        assert r.json()["ood"]["flagged"] is True and r.json()["refer"] is True
        assert any(why in r.json()["reason"] for why in ("does not look like", "flat colour"))
    metrics = client.get("/metrics").text
    assert 'endofuse_decisions_total{kind="ood_flagged",model="hyperkvasir-lgi"}' in metrics
    passed = 0
    for frame in fullres_frames:
        r = client.post("/predict", files={"image": (frame.name, frame.read_bytes(), "image/jpeg")})
        passed += not r.json()["ood"]["flagged"]
    assert passed >= 0.9 * len(fullres_frames), f"{passed}/{len(fullres_frames)} passed"


def test_out_of_distribution_flag_on_the_dermoscopy_model(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    """ham10000/1's graph carries the Mahalanobis distance of its image features: endoscopy
    frames are flagged, which its logits alone could not do (AUROC 0.66); its own test images
    mostly pass; a flat colour is flagged by the input check."""
    bundled("ham10000", "1")
    flagged = 0
    for frame in fullres_frames:
        r = client.post("/models/ham10000/predict", files={"image": ("f", frame.read_bytes())})
        assert r.status_code == 200, r.text
        flagged += r.json()["ood"]["flagged"]
    assert flagged >= 0.9 * len(fullres_frames), f"{flagged}/{len(fullres_frames)} flagged"
    ham = require_data("ham10000")
    own = sorted((ham / "images" / "nv").glob("*.jpg"))[:20]
    passed = sum(
        not client.post("/models/ham10000/predict", files={"image": ("f", p.read_bytes())}).json()[
            "ood"
        ]["flagged"]
        for p in own
    )
    assert passed >= 16, f"{passed}/20 of its own images passed"
    flat = png(np.full((150, 200, 3), (190, 120, 110), np.uint8))
    r = client.post("/models/ham10000/predict", files={"image": ("f", flat)}).json()
    assert r["ood"]["flagged"] and "flat colour" in r["reason"]


def _unnamed_and_int8(
    client: TestClient, name: str, frames: list[Path], version: str, fp32: str = "2"
) -> list[tuple]:
    """Each frame posted to ``name`` without a version (answered by the newest fp32 version,
    ``fp32``) and to its int8 ``version``: the two responses, their versions checked."""
    pairs = []
    for frame in frames:
        files = {"image": ("f", frame.read_bytes())}
        unnamed = client.post(f"/models/{name}/predict", files=files).json()
        int8 = client.post(f"/models/{name}/versions/{version}/predict", files=files).json()
        assert unnamed["model"]["version"] == fp32 and int8["model"]["version"] == version
        pairs.append((unnamed, int8))
    return pairs


@pytest.mark.parametrize("version", ["4", "5"])
def test_int8_variant_is_served_only_when_preferred_and_agrees_with_fp32(
    client: TestClient, fullres_frames: list[Path], version: str
) -> None:
    """hyperkvasir-lgi/4 (8-bit weights) and /5 (7-bit) are int8 variants of /2: requests
    that name no version keep getting /2 (ENDOFUSE_PRECISION=fp32, the default); named, each
    answers like /2; preferring int8 serves the newest, /5."""
    bundled("hyperkvasir-lgi", version)
    meta = client.get(f"/models/hyperkvasir-lgi/versions/{version}").json()
    assert meta["precision"] == "int8" and meta["quantization"]["source"] == "hyperkvasir-lgi/2"
    pairs = _unnamed_and_int8(client, "hyperkvasir-lgi", fullres_frames, version)
    same = sum(default["label"] == int8["label"] for default, int8 in pairs)
    assert same >= len(fullres_frames) - 1, f"{same}/{len(fullres_frames)} labels agree"
    registry = Registry.load(
        MODELS,
        providers=["CPUExecutionProvider"],
        warmup_runs=0,
        only=["hyperkvasir-lgi"],
        precision="int8",
    )
    assert registry.get("hyperkvasir-lgi").version == "5"


@pytest.mark.parametrize(("version", "source"), [("6", "2"), ("8", "7"), ("10", "7")])
def test_dermoscopy_int8_variant_agrees_with_fp32_on_test_images(
    client: TestClient, version: str, source: str
) -> None:
    """ham10000/6 (int8 variant of /2), /8 (of /7, 7-bit weights) and /10 (/8 read with
    preprocessing version 4), rounding learned, each with its own decision fit: requests that
    name no version get the newest fp32 version, /9 (/7 read with version 4; /7 is /2 with
    its tabular-only calibration refitted: the same answers wherever there is an image);
    named, each names the same diagnosis for nearly every image."""
    bundled("ham10000", version)
    meta = client.get(f"/models/ham10000/versions/{version}").json()
    quantization = meta["quantization"]
    assert meta["precision"] == "int8" and quantization["source"] == f"ham10000/{source}"
    assert quantization["rounding"]["layers"] == 49 - len(quantization["kept_in_float"])
    require_data("ham10000")
    from training.config import load_config
    from training.data import load_split, read_rows

    spec = load_config(REPO / "training" / "configs" / "ham10000.yaml").dataset
    paths = sorted(load_split(spec, "test", None, read_rows(spec)).paths)[::37][:40]
    pairs = _unnamed_and_int8(client, "ham10000", paths, version, fp32="9")
    assert all(int8["label"] in int8["prediction_set"] and "ood" in int8 for _, int8 in pairs)
    same = sum(fp32["label"] == int8["label"] for fp32, int8 in pairs)
    assert same >= 0.9 * len(paths), f"{same}/{len(paths)} labels agree"


def test_seven_bit_variants_keep_every_int8_weight_within_64() -> None:
    """The variants recorded with 7-bit weights hold them (no 16-bit pair sum can saturate,
    so a CPU without VNNI sums their products exactly); the 8-bit ones use the whole range."""
    onnx = pytest.importorskip("onnx", reason="reading the graphs needs the 'train' extra")
    from onnx import numpy_helper

    widest = {}
    for vdir in sorted(MODELS.glob("*/*/manifest.json")):
        manifest = load_manifest(vdir)
        if manifest.precision != "int8":
            continue
        bits = manifest.raw["quantization"].get("weight_bits", 8)
        graph = onnx.load(str(vdir.parent / "model.onnx"))
        values = [numpy_helper.to_array(i) for i in graph.graph.initializer]
        widest[(manifest.name, manifest.version, bits)] = max(
            int(np.abs(v.astype(int)).max()) for v in values if v.dtype == np.int8
        )
    assert {k[:2] for k in widest if k[2] == 7} == {
        ("hyperkvasir-lgi", "5"),
        ("ham10000", "8"),
        ("ham10000", "10"),
    }
    for (name, version, bits), value in widest.items():
        assert value == (64 if bits == 7 else 127), (name, version, value)


def _samples(client: TestClient, name: str, **labels: str) -> dict[str, float]:
    """The samples of metric family ``name`` with these label values, by sample name + le."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith(name) and all(s.labels.get(k) == v for k, v in labels.items()):
                key = s.name + (f"@{s.labels['le']}" if "le" in s.labels else "")
                key += f"#{s.labels['label']}" if "label" in s.labels else ""
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_drift_metrics_follow_what_is_sent(client: TestClient, fullres_frames: list[Path]) -> None:
    """What a hospital watches for drift: the labels given, how sure the answers are, and
    the out-of-distribution margin. Real frames land below the threshold; dermoscopy images
    sent to the endoscopy model land above it."""
    bundled("hyperkvasir-lgi", "2")
    ids = {"model": "hyperkvasir-lgi", "version": "2"}
    before = _samples(client, "endofuse_", **ids)
    before_shapes = _samples(client, "endofuse_input_aspect_ratio", model="hyperkvasir-lgi")
    labels = []
    for frame in fullres_frames:
        r = client.post("/predict", files={"image": ("f", frame.read_bytes(), "image/jpeg")})
        labels.append(r.json()["label"])
    after = _samples(client, "endofuse_", **ids)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    for label in set(labels):
        assert delta(f"endofuse_predictions_total#{label}") == labels.count(label)
    assert delta("endofuse_top_probability_count") == len(fullres_frames)
    assert delta("endofuse_ood_margin_count") == len(fullres_frames)
    below = delta("endofuse_ood_margin_bucket@0.0")
    assert below >= 0.9 * len(fullres_frames), f"{below} of {len(fullres_frames)} below 0"

    # The capture's geometry, per model: every one of these frames is 1.03-1.19 wide.
    shapes = _samples(client, "endofuse_input_aspect_ratio", model="hyperkvasir-lgi")
    assert shapes["endofuse_input_aspect_ratio_bucket@1.2"] - before_shapes.get(
        "endofuse_input_aspect_ratio_bucket@1.2", 0.0
    ) == len(fullres_frames)
    # Another capture card's 16:9 frames show as a new frame shape, answers or not.
    with Image.open(fullres_frames[0]) as frame:
        wide = jpeg_bytes(letterbox(frame.convert("RGB"), 1920, 1080))
    for _ in range(3):
        client.post("/predict", files={"image": ("f", wide, "image/jpeg")})
    after_wide = _samples(client, "endofuse_input_aspect_ratio", model="hyperkvasir-lgi")
    key, wider = "endofuse_input_aspect_ratio_bucket@1.8", "endofuse_input_aspect_ratio_bucket@1.7"
    assert (after_wide[key] - shapes[key]) - (after_wide[wider] - shapes[wider]) == 3

    skin = sorted((require_data("ham10000") / "images" / "nv").glob("*.jpg"))[:10]
    before = _samples(client, "endofuse_", **ids)
    for path in skin:
        client.post("/predict", files={"image": ("f", path.read_bytes(), "image/jpeg")})
    after = _samples(client, "endofuse_", **ids)
    above = delta("endofuse_ood_margin_count") - delta("endofuse_ood_margin_bucket@0.0")
    assert above >= 9, f"{above} of 10 dermoscopy images above the threshold"
