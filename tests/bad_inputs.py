"""The bad-input corpus: requests a careless or hostile client sends, each with the status and
error code the service must answer, run against both bundled models.

``python -m tests.bad_inputs`` prints the table kept in ``docs/bad-inputs.md``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

from tests.bad_images import IMAGES_BAD, IMAGES_ODD_BUT_VALID, JPEG
from tests.bad_requests import (
    MODELS,
    Case,
    json_image,
    multipart,
    raw,
    tabular_only,
    with_tabular,
)


def _image_cases() -> list[Case]:
    cases = []
    for name, data, status, code in IMAGES_BAD:
        cases.append(
            Case("image", f"{name} (multipart)", multipart(data), status, code, undecodable=True)
        )
        cases.append(
            Case("image", f"{name} (JSON base64)", json_image(data), status, code, undecodable=True)
        )
    for name, data in IMAGES_ODD_BUT_VALID:
        cases.append(Case("image (valid)", name, multipart(data), 200, None))
    return cases


def _body_cases() -> list[Case]:
    jpeg_b64 = base64.b64encode(JPEG).decode()
    b = "zzbound"
    multipart_ct = f"multipart/form-data; boundary={b}"
    part = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="f.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + JPEG
        + b"\r\n"
    )
    rows: list[tuple[str, Callable[[str], tuple], int, str]] = [
        ("no content type", raw(JPEG, None), 415, "unsupported_media_type"),
        ("raw JPEG body (image/jpeg)", raw(JPEG, "image/jpeg"), 415, "unsupported_media_type"),
        ("text/plain body", raw(b"hello", "text/plain"), 415, "unsupported_media_type"),
        ("XML body", raw(b"<a/>", "application/xml"), 415, "unsupported_media_type"),
        (
            "form-urlencoded body",
            raw(b"image=abc", "application/x-www-form-urlencoded"),
            415,
            "unsupported_media_type",
        ),
        ("empty JSON body", raw(b"", "application/json"), 400, "bad_request"),
        ("invalid JSON", raw(b'{"image": ', "application/json"), 400, "bad_request"),
        ("JSON array", raw(b"[]", "application/json"), 400, "bad_request"),
        ("JSON string", raw(b'"abc"', "application/json"), 400, "bad_request"),
        ("JSON null", raw(b"null", "application/json"), 400, "bad_request"),
        (
            "JSON nested 100,000 deep",
            raw(b"[" * 100_000 + b"]" * 100_000, "application/json"),
            400,
            "bad_request",
        ),
        (
            "JSON with an unknown key",
            lambda p: ("POST", p, {"json": {"image": jpeg_b64, "extra": 1}}),
            400,
            "bad_request",
        ),
        (
            "JSON image is a number",
            lambda p: ("POST", p, {"json": {"image": 5}}),
            400,
            "bad_request",
        ),
        (
            "JSON image is a list",
            lambda p: ("POST", p, {"json": {"image": [1, 2]}}),
            400,
            "bad_request",
        ),
        (
            "JSON image not base64",
            lambda p: ("POST", p, {"json": {"image": "@@@"}}),
            400,
            "bad_request",
        ),
        (
            "JSON image as a data URL",
            lambda p: ("POST", p, {"json": {"image": "data:image/jpeg;base64," + jpeg_b64}}),
            400,
            "bad_request",
        ),
        (
            "JSON image base64 with line breaks",
            lambda p: ("POST", p, {"json": {"image": jpeg_b64[:60] + "\n" + jpeg_b64[60:]}}),
            400,
            "bad_request",
        ),
        ("multipart without a boundary", raw(part, "multipart/form-data"), 400, "bad_request"),
        (
            "multipart truncated (no closing delimiter)",
            raw(part, multipart_ct),
            400,
            "bad_request",
        ),
        (
            "multipart, wrong boundary",
            raw(part + f"--{b}--\r\n".encode(), "multipart/form-data; boundary=other"),
            400,
            "bad_request",
        ),
        (
            "multipart with an unknown field",
            lambda p: ("POST", p, {"files": {"image": ("f.jpg", JPEG)}, "data": {"notes": "x"}}),
            400,
            "bad_request",
        ),
        (
            "multipart image as a text field",
            lambda p: (
                "POST",
                p,
                {"data": {"image": "abc"}, "files": {"tabular": (None, '{"age": 1}')}},
            ),
            400,
            "bad_request",
        ),
        (
            "multipart with three files",
            lambda p: (
                "POST",
                p,
                {
                    "files": [
                        ("image", ("a", JPEG)),
                        ("tabular", ("b", b"{}")),
                        ("image", ("c", JPEG)),
                    ]
                },
            ),
            400,
            "bad_request",
        ),
        (
            "multipart without an image",
            lambda p: ("POST", p, {"files": {"tabular": (None, "{}")}}),
            422,
            "missing_input",
        ),
        (
            "body declared over the size limit",
            lambda p: (
                "POST",
                p,
                {
                    "content": b"{}",
                    "headers": {"content-type": "application/json", "content-length": str(10**9)},
                },
            ),
            413,
            "payload_too_large",
        ),
        (
            "JSON without an image or tabular",
            lambda p: ("POST", p, {"json": {}}),
            422,
            "missing_input",
        ),
    ]
    cases = [Case("body", name, req, status, code) for name, req, status, code in rows]
    # JSON in UTF-16 or UTF-32 (with a byte-order mark) is read as JSON parsers may.
    utf16 = raw(json.dumps({"image": jpeg_b64}).encode("utf-16"), "application/json")
    return [*cases, Case("body (valid)", "JSON body in UTF-16", utf16, 200, None)]


def _query_cases() -> list[Case]:
    def post(query: str) -> Callable[[str], tuple]:
        return lambda p: ("POST", p + query, {"files": {"image": ("f.jpg", JPEG)}})

    rows = [
        ("coverage not fitted (0.5)", post("?coverage=0.5"), 422, "invalid_request"),
        ("coverage not a number", post("?coverage=abc"), 422, "invalid_request"),
        ("coverage NaN", post("?coverage=nan"), 422, "invalid_request"),
        ("coverage empty", post("?coverage="), 422, "invalid_request"),
        ("coverage 1.5", post("?coverage=1.5"), 422, "invalid_request"),
        ("misspelt query parameter", post("?coverge=0.9"), 422, "invalid_request"),
        ("sets of an unknown kind", post("?sets=conditional"), 422, "invalid_request"),
    ]
    cases = [Case("query", name, req, status, code) for name, req, status, code in rows]
    absolute = [
        (
            "unknown model in ?model=",
            lambda p: ("POST", "/predict?model=nope", {"files": {"image": ("f.jpg", JPEG)}}),
            404,
            "model_not_found",
        ),
        (
            "script tag as model name",
            lambda p: (
                "POST",
                "/predict?model=<script>x</script>",
                {"files": {"image": ("f.jpg", JPEG)}},
            ),
            404,
            "model_not_found",
        ),
        (
            "unknown model in the path",
            lambda p: ("POST", "/models/nope/predict", {}),
            404,
            "model_not_found",
        ),
        (
            "path traversal as model name",
            lambda p: ("POST", "/models/..%2F..%2Fetc/predict", {}),
            404,
            None,
        ),
        ("unknown route", lambda p: ("GET", "/nope", {}), 404, "not_found"),
        ("GET /predict", lambda p: ("GET", "/predict", {}), 405, "method_not_allowed"),
        ("DELETE /models", lambda p: ("DELETE", "/models", {}), 405, "method_not_allowed"),
        ("POST /healthz", lambda p: ("POST", "/healthz", {}), 405, "method_not_allowed"),
    ]
    cases += [Case("route", n, r, s, c, models=(MODELS[0],)) for n, r, s, c in absolute]
    for model in MODELS:
        cases.append(
            Case(
                "route",
                "unknown version",
                lambda p, m=model: ("POST", f"/models/{m}/versions/99/predict", {}),
                404,
                "model_not_found",
                models=(model,),
            )
        )
        cases.append(
            Case(
                "route",
                "PUT on predict",
                lambda p: ("PUT", p, {}),
                405,
                "method_not_allowed",
                models=(model,),
            )
        )
    return cases


def _tabular_cases() -> list[Case]:
    ham = ("ham10000",)
    bad = [
        ("age as text", {"age": "forty"}),
        ("age as boolean", {"age": True}),
        ("age negative", {"age": -1}),
        ("age above 120", {"age": 121}),
        ("age of 400 digits", '{"age": ' + "9" * 400 + "}"),
        ("age NaN literal", '{"age": NaN}'),
        ("age Infinity literal", '{"age": Infinity}'),
        ("age 1e309", '{"age": 1e309}'),
        ("age as a list", {"age": [40]}),
        ("age as an object", {"age": {"v": 40}}),
        ("sex capitalised", {"sex": "Female"}),
        ("sex as a number", {"sex": 1}),
        ("unknown localization", {"localization": "elbow"}),
        ("unknown field", {"weight": 70}),
        ("field name in another case", {"Age": 40}),
        ("tabular as a list", [40, "male"]),
        ("tabular as a string", '"age=40"'),
        ("tabular as a number", "5"),
        ("tabular nested 50,000 deep", "[" * 50_000 + "]" * 50_000),
        ("tabular not JSON", "age: 40"),
        ("tabular empty part", ""),
        ("tabular JSON null part", "null"),
    ]
    cases = [
        Case(
            "tabular",
            f"{name} (multipart)",
            with_tabular(value),
            422,
            "invalid_tabular",
            models=ham,
        )
        for name, value in bad
    ]
    for name, value in bad[:14]:  # the same values inside a JSON body
        parsed = json.loads(value) if isinstance(value, str) and "NaN" not in value else value
        if isinstance(parsed, str):
            continue
        cases.append(
            Case(
                "tabular",
                f"{name} (JSON body)",
                with_tabular(parsed, True),
                422,
                "invalid_tabular",
                models=ham,
            )
        )
    no_value = [
        ("tabular only, all null", {"age": None, "sex": None, "localization": None}),
        ("tabular only, all 'unknown'", {"age": "unknown", "sex": "unknown"}),
        ("tabular only, empty object", {}),
    ]
    cases += [
        Case("tabular", n, tabular_only(v), 422, "missing_input", models=ham) for n, v in no_value
    ]
    good = [
        ("tabular only, one field", tabular_only({"age": 70})),
        ("age at the lower bound 0", with_tabular({"age": 0})),
        ("age at the upper bound 120", with_tabular({"age": 120})),
        ("age as 'unknown' (missing)", with_tabular({"age": "unknown"})),
        (
            "tabular sent as a JSON file part",
            lambda p: (
                "POST",
                p,
                {
                    "files": {
                        "image": ("f.jpg", JPEG),
                        "tabular": ("t.json", b'{"age": 50}', "application/json"),
                    }
                },
            ),
        ),
    ]
    cases += [Case("tabular (valid)", n, r, 200, None, models=ham) for n, r in good]
    cases.append(
        Case(
            "tabular (valid)",
            "tabular sent to an image-only model (ignored)",
            with_tabular({"age": 40}),
            200,
            None,
            models=("hyperkvasir-lgi",),
        )
    )
    cases.append(
        Case(
            "tabular",
            "tabular without an image on an image-only model",
            tabular_only({"age": 40}),
            422,
            "missing_input",
            models=("hyperkvasir-lgi",),
        )
    )
    return cases


def corpus() -> list[tuple[str, Case]]:
    """(model, case) pairs: every case against each model it applies to."""
    cases = _image_cases() + _body_cases() + _query_cases() + _tabular_cases()
    return [(model, case) for case in cases for model in case.models]


def markdown() -> str:
    rows = ["| # | group | case | model | status | error code |", "|---|---|---|---|---|---|"]
    for i, (model, case) in enumerate(corpus(), 1):
        rows.append(
            f"| {i} | {case.group} | {case.name} | {model} | {case.status} | {case.code or '-'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
