"""Open Inference Protocol v2, driven by the real ``tritonclient[http]`` against a real server
on the bundled models: metadata, readiness, binary and JSON tensors, batches, missing tabular,
errors; and the same frame gives the same probabilities as ``/predict``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.api import create_app
from service.config import Settings
from service.registry import Registry
from tests.http_server import running
from tests.redis_harness import REPO

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

HAM_FIELDS = ("age", "sex", "localization")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    settings = Settings(models_dir=REPO / "models", providers="cpu", warmup_runs=0)
    registry = Registry.load(REPO / "models", providers=["CPUExecutionProvider"], warmup_runs=0)
    with running(create_app(settings, registry), settings) as (host, port):
        yield f"{host}:{port}"


@pytest.fixture()
def client(server: str) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server, network_timeout=60)
    yield c
    c.close()


def predict(server: str, path: str, image: bytes, tabular: dict | None = None) -> dict:
    data = {"tabular": json.dumps(tabular)} if tabular is not None else None
    r = httpx.post(f"http://{server}{path}", files={"image": ("f", image)}, data=data, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def bytes_input(frames: list[bytes], binary: bool = True) -> httpclient.InferInput:
    tensor = np.array(frames, dtype=object).reshape(-1, 1)
    inp = httpclient.InferInput("image", list(tensor.shape), "BYTES")
    inp.set_data_from_numpy(tensor, binary_data=binary)
    return inp


def test_metadata_readiness_and_config(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("hyperkvasir-lgi") and client.is_model_ready("ham10000", "1")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("ham10000")
    assert {i["name"] for i in meta["inputs"]} == {"image", "tabular", "tabular_mask"}
    assert {"probabilities", "prediction_set", "refer", "ood_flagged"} <= {
        o["name"] for o in meta["outputs"]
    }
    config = client.get_model_config("hyperkvasir-lgi")
    assert config["max_batch_size"] >= 1
    assert config["input"][0] == {
        "name": "image", "data_type": "TYPE_STRING", "dims": [1], "optional": False
    }  # fmt: skip


def test_binary_batch_matches_predict(
    server: str, client: httpclient.InferenceServerClient, fullres_frames: list[Path]
) -> None:
    frames = [p.read_bytes() for p in fullres_frames[:3]]
    result = client.infer("hyperkvasir-lgi", [bytes_input(frames)])
    probs = result.as_numpy("probabilities")
    labels = result.as_numpy("label")
    assert probs.shape == (3, 5)
    for i, frame in enumerate(frames):
        ref = predict(server, "/models/hyperkvasir-lgi/predict", frame)
        assert np.allclose(probs[i], list(ref["probabilities"].values()), atol=1e-5)
        assert labels[i].decode() == ref["label"]
        assert json.loads(result.as_numpy("prediction_set")[i]) == ref["prediction_set"]
        assert bool(result.as_numpy("refer")[i]) == ref["refer"]


def test_json_pixels_match_predict_on_the_same_frame(
    server: str, client: httpclient.InferenceServerClient, fullres_frames: list[Path]
) -> None:
    pixels = np.asarray(Image.open(fullres_frames[0]).convert("RGB").resize((160, 136)))
    inp = httpclient.InferInput("image", [1, *pixels.shape], "UINT8")
    inp.set_data_from_numpy(pixels[None], binary_data=False)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=False)
    result = client.infer("hyperkvasir-lgi", [inp], outputs=[out])
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    ref = predict(server, "/models/hyperkvasir-lgi/predict", png.getvalue())
    assert np.allclose(result.as_numpy("probabilities")[0], list(ref["probabilities"].values()),
                       atol=1e-5)  # fmt: skip
    assert result.get_response()["outputs"][0].get("data") is not None  # JSON, not binary


def test_tabular_fields_and_missing_tabular(
    server: str, client: httpclient.InferenceServerClient, fullres_frames: list[Path]
) -> None:
    frame = fullres_frames[1].read_bytes()
    manifest = httpx.get(f"http://{server}/models/ham10000", timeout=10).json()["latest"]
    sexes = next(f for f in manifest["tabular"]["fields"] if f["name"] == "sex")["categories"]
    values = np.array([[63.0, sexes.index("male"), 0.0]], np.float32)
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)  # localization missing
    inputs = [bytes_input([frame])]
    for name, array in (("tabular", values), ("tabular_mask", mask)):
        inputs.append(httpclient.InferInput(name, list(array.shape), "FP32"))
        inputs[-1].set_data_from_numpy(array)
    with_fields = client.infer("ham10000", inputs).as_numpy("probabilities")[0]
    ref = predict(server, "/models/ham10000/predict", frame, {"age": 63, "sex": "male"})
    assert np.allclose(with_fields, list(ref["probabilities"].values()), atol=1e-5)
    image_only = client.infer("ham10000", [bytes_input([frame])]).as_numpy("probabilities")[0]
    ref = predict(server, "/models/ham10000/predict", frame)
    assert np.allclose(image_only, list(ref["probabilities"].values()), atol=1e-5)
    assert not np.allclose(with_fields, image_only)


@pytest.mark.parametrize(
    ("model", "frames", "status"),
    [
        ("nope", [b"x"], "404"),
        ("hyperkvasir-lgi", [b"not an image"], "415"),
        ("hyperkvasir-lgi", [b"\x89PNG\r\n\x1a\n" + b"\0" * 40], "400"),
    ],
)
def test_errors_have_the_protocol_shape(
    client: httpclient.InferenceServerClient, model: str, frames: list[bytes], status: str
) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [bytes_input(frames)])
    assert err.value.status() == status
    assert err.value.message() and "{" not in err.value.message()


def test_timeout_parameter_is_honoured(
    client: httpclient.InferenceServerClient, fullres_frames: list[Path]
) -> None:
    frames = [p.read_bytes() for p in fullres_frames[:8]]
    with pytest.raises(InferenceServerException) as err:
        client.infer("hyperkvasir-lgi", [bytes_input(frames)], timeout=1)  # 1 microsecond
    assert err.value.status() in ("503", "504")


def test_raw_protocol_errors(server: str) -> None:
    url = f"http://{server}/v2/models/hyperkvasir-lgi/infer"
    cases = [
        (b"not json", {}, 400),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}', {}, 400),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', {}, 422),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400),
        (
            b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3],'
            b' "data": [1, 2, 3]}]}',
            {},
            400,
        ),
    ]
    for body, headers, status in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=10)
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["error"], str)
