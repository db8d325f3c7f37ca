"""Inputs a hostile-but-fair client sends: each gets a precise 4xx, never a 500, and no
error message repeats what was sent."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import images

MARKER = "zq-submitted-7731"
FRAME = images.jpeg(np.full((32, 32, 3), 120, np.uint8))


def with_image(client: TestClient, tabular: str, url: str = "/models/derm/predict"):
    return client.post(
        url, files={"image": ("f.jpg", FRAME, "image/jpeg")}, data={"tabular": tabular}
    )


def assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert MARKER not in r.text


@pytest.mark.parametrize("digits", [400, 5000])
def test_integer_of_hundreds_of_digits_is_422(client: TestClient, digits: int) -> None:
    assert_error(with_image(client, '{"age": ' + "9" * digits + "}"), 422, "invalid_tabular")
    image = base64.b64encode(FRAME).decode()
    body = '{"image": "' + image + '", "tabular": {"age": ' + "9" * digits + "}}"
    r = client.post(
        "/models/derm/predict", content=body, headers={"content-type": "application/json"}
    )
    assert_error(r, 422, "invalid_tabular")


def test_deeply_nested_json_is_refused_not_500(client: TestClient) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    assert_error(with_image(client, deep), 422, "invalid_tabular")
    r = client.post(
        "/models/derm/predict",
        content='{"tabular": ' + deep + "}",
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, "bad_request")


def test_405_names_the_allowed_methods(client: TestClient) -> None:
    for path in ("/predict", "/models/endo/predict", "/models/endo/versions/1/predict"):
        r = client.get(path)
        assert r.status_code == 405 and r.headers["allow"] == "POST", path
    r = client.delete("/models")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_submitted_names_are_never_echoed(client: TestClient) -> None:
    r = client.post(
        f"/predict?model=<script>{MARKER}</script>",
        files={"image": ("f.jpg", FRAME, "image/jpeg")},
    )
    assert_error(r, 404, "model_not_found")
    assert_error(client.post(f"/models/endo/versions/{MARKER}/predict"), 404, "model_not_found")
    assert_error(with_image(client, json.dumps({MARKER: 1})), 422, "invalid_tabular")
    r = client.post(
        "/predict",
        files={"image": ("f.jpg", FRAME, "image/jpeg")},
        data={MARKER: "x"},
    )
    assert_error(r, 400, "bad_request")
    r = client.post("/predict", json={"image": "", MARKER: 1})
    assert_error(r, 400, "bad_request")


def test_truncated_multipart_is_400(client: TestClient) -> None:
    head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    for body in (head + FRAME[: len(FRAME) // 2], head + FRAME + b"\r\n--XyZ\r\n"):
        r = client.post(
            "/predict", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
        )
        assert_error(r, 400, "bad_request")
    r = client.post("/predict", content=head, headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "bad_request")


def test_tabular_as_a_json_file_part_is_accepted(client: TestClient) -> None:
    r = client.post(
        "/models/derm/predict",
        files={
            "image": ("f.jpg", FRAME, "image/jpeg"),
            "tabular": ("t.json", b'{"age": 50, "sex": "male"}', "application/json"),
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["modalities"]["tabular"]["used"] == ["age", "sex"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tabular=st.one_of(
        JSON_VALUES,
        st.dictionaries(st.sampled_from(["age", "sex", "site"]), JSON_VALUES, max_size=3),
    )
)
def test_arbitrary_tabular_json_gets_200_or_4xx(client: TestClient, tabular: object) -> None:
    text = json.dumps(tabular, allow_nan=True)
    for r in (
        with_image(client, text),
        client.post(
            "/models/derm/predict",
            content=json.dumps(
                {"image": base64.b64encode(FRAME).decode(), "tabular": tabular}, allow_nan=True
            ),
            headers={"content-type": "application/json"},
        ),
    ):
        assert r.status_code in (200, 400, 422), r.text
