from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.logs import JsonFormatter
from tests import images

SECRET_NUMBER = 987654.321
SECRET_TEXT = "PATIENT-SECRET-7731"


@pytest.fixture()
def json_logs() -> Iterator[io.StringIO]:
    """Capture every log line as the service formats it, at DEBUG level."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def post_image(client: TestClient, data: bytes, url: str = "/predict", **kw: object):
    return client.post(url, files={"image": ("frame.jpg", data, "image/jpeg")}, **kw)


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    return body


def test_predict_real_frame_multipart_and_json_agree(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    for frame in fullres_frames[:5]:
        data = frame.read_bytes()
        multipart = post_image(client, data)
        as_json = client.post("/predict", json={"image": base64.b64encode(data).decode()})
        assert multipart.status_code == 200 and as_json.status_code == 200
        a, b = multipart.json(), as_json.json()
        assert a["model"] == {"name": "endo", "version": "2"}  # default model, newest version
        assert a["probabilities"] == b["probabilities"]
        assert abs(sum(a["probabilities"].values()) - 1) < 1e-5
        assert a["label"] == max(a["probabilities"], key=a["probabilities"].get)
        assert a["modalities"] == {"image": True, "tabular": None}
        assert set(a["timing_ms"]) == {"decode", "queue", "inference", "total"}
        assert multipart.headers["x-request-id"] == a["request_id"]


def test_versions_are_addressable(client: TestClient, fullres_frames: list[Path]) -> None:
    data = fullres_frames[0].read_bytes()
    v1 = post_image(client, data, "/models/endo/versions/1/predict").json()
    v2 = post_image(client, data, "/models/endo/predict").json()
    assert v1["model"]["version"] == "1" and v2["model"]["version"] == "2"
    assert v1["probabilities"] != v2["probabilities"]
    assert_error(post_image(client, data, "/models/endo/versions/9/predict"), 404)
    assert_error(post_image(client, data, "/models/nope/predict"), 404, "model_not_found")
    assert_error(post_image(client, data, "/predict?model=nope"), 404, "model_not_found")


def test_tabular_model_reports_used_and_missing(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    data = fullres_frames[0].read_bytes()
    full = client.post(
        "/models/derm/predict",
        files={"image": ("x.jpg", data, "image/jpeg")},
        data={"tabular": json.dumps({"age": 61, "sex": "female", "site": "back"})},
    ).json()
    assert full["modalities"]["tabular"] == {"used": ["age", "sex", "site"], "missing": []}
    partial = client.post(
        "/models/derm/predict",
        json={"image": base64.b64encode(data).decode(), "tabular": {"age": 61, "sex": None}},
    ).json()
    assert partial["modalities"]["tabular"] == {"used": ["age"], "missing": ["sex", "site"]}
    unknown_value = client.post(
        "/models/derm/predict", json={"tabular": {"age": 61, "site": "unknown"}}
    ).json()
    assert unknown_value["modalities"] == {
        "image": False,
        "tabular": {"used": ["age"], "missing": ["sex", "site"]},
    }
    assert full["probabilities"] != partial["probabilities"]


def test_tabular_sent_to_image_only_model_is_reported_not_rejected(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    data = fullres_frames[0].read_bytes()
    r = client.post(
        "/predict",
        files={"image": ("x.jpg", data, "image/jpeg")},
        data={"tabular": json.dumps({"age": 40})},
    )
    assert r.status_code == 200
    assert r.json()["modalities"]["tabular"] is None
    assert "ignored" in r.json()["warnings"][0]


def test_missing_image_on_image_only_model_is_422(client: TestClient) -> None:
    assert_error(client.post("/predict", json={}), 422, "missing_input")
    assert_error(client.post("/models/derm/predict", json={"tabular": {}}), 422, "missing_input")


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda f: f[: len(f) // 2], 400, "undecodable_image"),
        (lambda f: b"", 400, "undecodable_image"),
        (lambda f: images.HTML, 415, "unsupported_media_type"),
        (lambda f: images.PDF, 415, "unsupported_media_type"),
    ],
    ids=["truncated-jpeg", "zero-bytes", "html", "pdf"],
)
def test_bad_images_get_clear_errors(
    client: TestClient, fullres_frames: list[Path], make, status: int, code: str
) -> None:
    assert_error(post_image(client, make(fullres_frames[0].read_bytes())), status, code)


@pytest.mark.parametrize(
    "data",
    [
        images.encode(Image.fromarray(images.pattern()).convert("CMYK"), "JPEG"),
        images.encode(
            Image.fromarray(np.tile(np.arange(96, dtype=np.uint16) * 600, (64, 1))), "PNG"
        ),
        images.encode(Image.fromarray(images.pattern()).convert("P"), "PNG", transparency=0),
        images.encode(Image.fromarray(images.pattern()[..., 0], "L"), "JPEG"),
        images.with_orientation(images.pattern(), 6, "JPEG"),
    ],
    ids=["cmyk-jpeg", "16bit-png", "palette-alpha-png", "grayscale-jpeg", "exif-rotated"],
)
def test_unusual_but_valid_images_are_accepted(client: TestClient, data: bytes) -> None:
    r = post_image(client, data)
    assert r.status_code == 200, r.text
    assert abs(sum(r.json()["probabilities"].values()) - 1) < 1e-5


def test_png_bomb_is_413(client: TestClient) -> None:
    assert_error(post_image(client, images.png_bomb(20000)), 413, "payload_too_large")


def test_body_over_limit_by_content_length_is_413(client: TestClient) -> None:
    r = client.post(
        "/predict", content=b"x" * 2_100_000, headers={"content-type": "application/json"}
    )
    assert_error(r, 413, "payload_too_large")


def test_wrong_content_type_is_415(client: TestClient) -> None:
    r = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")


def test_invalid_json_and_base64_are_400(client: TestClient) -> None:
    bad_json = client.post(
        "/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(bad_json, 400)
    assert_error(client.post("/predict", json={"image": "@@not-base64@@"}), 400)
    assert_error(client.post("/predict", json={"image": 5}), 400)


@pytest.mark.parametrize(
    "tabular_text",
    [
        '{"age": NaN}',
        '{"age": Infinity}',
        '{"age": -Infinity}',
        f'{{"age": "{SECRET_TEXT}"}}',
        '{"age": true}',
        f'{{"age": {SECRET_NUMBER}}}',
        f'{{"sex": "{SECRET_TEXT}"}}',
        '{"sex": 1}',
        f'{{"{SECRET_TEXT}": 3}}',
        f'["{SECRET_TEXT}"]',
        "{broken",
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "age-string",
        "age-bool",
        "age-out-of-range",
        "unknown-category",
        "category-int",
        "unknown-field",
        "not-object",
        "bad-json",
    ],
)
def test_invalid_tabular_is_422_without_echo(
    client: TestClient, fullres_frames: list[Path], json_logs: io.StringIO, tabular_text: str
) -> None:
    r = client.post(
        "/models/derm/predict",
        files={"image": ("PATIENT-SECRET-7731.jpg", fullres_frames[0].read_bytes(), "image/jpeg")},
        data={"tabular": tabular_text},
    )
    body = assert_error(r, 422, "invalid_tabular")
    unknown_field = SECRET_TEXT in tabular_text and tabular_text.startswith('{"PATIENT')
    if not unknown_field:  # an unknown *field name* is named back; values never are
        assert SECRET_TEXT not in r.text
    assert str(SECRET_NUMBER) not in r.text
    assert "987654" not in r.text
    logs = json_logs.getvalue()
    assert SECRET_TEXT not in logs and "987654" not in logs
    assert '"status": 422' in logs, "the rejected request is still logged"
    assert f'"request_id": "{r.headers["x-request-id"]}"' in logs, "errors carry a request id"
    del body


def test_logs_carry_no_patient_data_on_success(
    client: TestClient, fullres_frames: list[Path], json_logs: io.StringIO
) -> None:
    r = client.post(
        "/models/derm/predict",
        files={"image": ("PATIENT-SECRET-7731.jpg", fullres_frames[0].read_bytes(), "image/jpeg")},
        data={"tabular": json.dumps({"age": 87.25, "sex": "male"})},
    )
    assert r.status_code == 200
    logs = json_logs.getvalue()
    assert SECRET_TEXT not in logs and "87.25" not in logs and '"male"' not in logs
    assert r.json()["request_id"] in logs


def test_poisoned_input_fails_alone_with_500(
    client: TestClient, fullres_frames: list[Path]
) -> None:
    black = images.png(np.zeros((40, 40, 3), np.uint8))
    assert_error(post_image(client, black), 500, "inference_failed")
    assert post_image(client, fullres_frames[0].read_bytes()).status_code == 200


def test_models_endpoints(client: TestClient) -> None:
    listing = client.get("/models").json()
    assert listing["default"] == "endo"
    names = {m["name"]: m for m in listing["models"]}
    assert names["endo"]["versions"] == ["1", "2"] and names["endo"]["latest"] == "2"
    assert names["derm"]["tabular"] is True
    detail = client.get("/models/derm").json()
    assert detail["latest"]["tabular"]["fields"][0]["name"] == "age"
    assert "inputs" not in detail["latest"], "graph plumbing is not part of the public view"
    assert_error(client.get("/models/nope"), 404)
    assert_error(client.get("/no/such/route"), 404)


def test_health_ready_and_metrics(client: TestClient, fullres_frames: list[Path]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "endo:2" in ready.json()["models"]
    post_image(client, fullres_frames[0].read_bytes())
    post_image(client, images.HTML)
    text = client.get("/metrics").text
    assert 'endofuse_requests_total{model="endo",outcome="ok"}' in text
    assert 'endofuse_requests_total{model="endo",outcome="unsupported_media_type"}' in text
    for stage in ("decode", "queue", "inference"):
        assert f'stage="{stage}"' in text
    assert "endofuse_batch_size_bucket" in text
    assert 'endofuse_queue_depth{model="endo",version="2"}' in text
    assert 'endofuse_model_info{default="true",model="endo"' in text
    assert "endofuse_event_loop_lag_seconds_bucket" in text


def test_model_without_fitted_sets_says_so(client: TestClient) -> None:
    """An old manifest without a decision block still serves; the answer has no set, and its
    warnings say why."""
    r = post_image(client, images.jpeg(np.full((32, 32, 3), 90, np.uint8)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "prediction_set" not in body and body["refer"] is False and body["reason"] is None
    assert "this model version has no fitted prediction sets" in body["warnings"]
