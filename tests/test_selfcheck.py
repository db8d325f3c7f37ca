"""The load-time self-check (service/selfcheck.py): a host that answers the manifest's probe
inputs differently from the host the decision thresholds were fitted on is reported, warned
about, or refused; on real ONNX Runtime sessions of tiny graphs and of the bundled models."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service import selfcheck
from service.api.app import create_app
from service.cli import app as cli
from service.engine import Engine
from service.errors import ManifestError, ModelNotFound, ModelUnavailable
from service.manifest import load_manifest
from service.metrics import Metrics
from service.registry import Registry
from service.sessions import open_session
from tests.builders import FIELDS, build_model, write_model_dir
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parent.parent
BUNDLED = sorted(p.parent for p in (REPO / "models").glob("*/*/manifest.json"))


def _recorded(root: Path, name: str = "endo", version: str = "1", **kw: object) -> Path:
    vdir = write_model_dir(root, name, version, seed=5, **kw)  # type: ignore[arg-type]
    selfcheck.record(vdir)
    return vdir


def _swap_graph(vdir: Path) -> None:
    """Another graph of the same shapes under the same manifest: it answers differently."""
    onnx.save(build_model(32, 32, seed=6), vdir / "model.onnx")


def test_probes_are_deterministic_varied_and_of_the_model_shape() -> None:
    a = selfcheck.probe_images(40, 56)
    assert a.shape == (selfcheck.PROBES, 40, 56, 3) and a.dtype == np.uint8
    assert np.array_equal(a, selfcheck.probe_images(40, 56))
    assert not np.array_equal(a, selfcheck.probe_images(40, 56, seed=1))
    assert min(float(img.std()) for img in a) > 5  # structure, not flat colour
    assert len({img.tobytes() for img in a}) == selfcheck.PROBES
    assert (a[1, 0, 0] == 0).all() and (a[0, 0, 0] > 0).any()  # ring on odd probes only


def test_a_tabular_model_gets_fields_and_a_missing_image_among_its_probes(
    tmp_path: Path,
) -> None:
    vdir = write_model_dir(tmp_path, "derm", fields=FIELDS, image_mask=True)
    batch = selfcheck.probe_batch(load_manifest(vdir / "manifest.json"))
    assert batch.tabular is not None and batch.tabular_mask is not None
    assert batch.tabular_mask[1::2].all() and not batch.tabular_mask[0::2].any()
    assert not batch.tabular[0::2].any() and batch.tabular[1::2].any()
    assert batch.image_mask is not None and batch.image_mask[:, 0].tolist() == [1, 1, 1, 0] * 2


def test_recorded_outputs_pass_and_another_graph_is_drift(tmp_path: Path) -> None:
    vdir = _recorded(tmp_path)
    block = json.loads((vdir / "manifest.json").read_text())["self_check"]
    assert block["inputs"]["generator"] == selfcheck.GENERATOR
    assert len(block["probabilities"]) == selfcheck.PROBES
    assert block["recorded_on"]["onnxruntime"] == ort.__version__
    same = selfcheck.check_dir(vdir, 0.01)
    assert (same.status, same.max_probability_diff, same.labels_changed) == ("pass", 0.0, 0)
    _swap_graph(vdir)
    other = selfcheck.check_dir(vdir, 0.01)
    assert other.status == "drift" and other.max_probability_diff > 0.01


def test_a_drifting_version_is_served_with_a_warning_a_gauge_and_its_figures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _swap_graph(_recorded(tmp_path))
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        registry = Registry.load(tmp_path, providers=["CPUExecutionProvider"], warmup_runs=0)
    mv = registry.get("endo", "1")
    check = mv.engine.describe()["self_check"]
    assert check["status"] == "drift" and check["sessions"] == mv.engine.size
    assert any("probe inputs differently" in r.getMessage() for r in caplog.records)
    metrics = Metrics()
    metrics.serving.publish(registry)
    text = metrics.render().decode()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("endofuse_model_self_check_difference{") and 'output="probabilities"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(check["max_probability_diff"])


def test_refuse_mode_leaves_out_only_the_drifting_version(tmp_path: Path) -> None:
    selfcheck.record(write_model_dir(tmp_path, "endo", "1", seed=5))
    _swap_graph(_recorded(tmp_path, "endo", "2"))
    registry = Registry.load(
        tmp_path, providers=["CPUExecutionProvider"], warmup_runs=0, self_check="refuse"
    )
    # Version 2, the newest, is left out: unnamed requests get version 1, named ones a 503.
    assert [mv.version for mv in registry.versions("endo")] == ["1"]
    assert registry.get("endo").version == "1"
    with pytest.raises(ModelUnavailable, match="version '2' is not served"):
        registry.get("endo", "2")
    refused = registry.refused["endo:2"]
    assert refused.check.status == "drift" and "ENDOFUSE_SELF_CHECK=refuse" in refused.reason
    with pytest.raises(ModelNotFound):
        registry.get("endo", "3")
    # Off: no probes run at all, and both versions serve.
    registry = Registry.load(
        tmp_path, providers=["CPUExecutionProvider"], warmup_runs=0, self_check="off"
    )
    assert "self_check" not in registry.get("endo").engine.describe()
    assert [mv.version for mv in registry.versions("endo")] == ["1", "2"]
    assert not registry.refused


def test_refuse_mode_with_every_version_drifting_does_not_start(tmp_path: Path) -> None:
    _swap_graph(_recorded(tmp_path))
    load = {"providers": ["CPUExecutionProvider"], "warmup_runs": 0, "self_check": "refuse"}
    with pytest.raises(ManifestError, match=r"no models under .* to serve; .*SELF_CHECK=refuse"):
        Registry.load(tmp_path, **load)
    # Another model serves, but the default one named in the settings has nothing left.
    selfcheck.record(write_model_dir(tmp_path, "plain", seed=1))
    with pytest.raises(ManifestError, match="no default model 'endo' to serve; "):
        Registry.load(tmp_path, default_model="endo", **load)
    assert Registry.load(tmp_path, **load).names() == ["plain"]


def test_a_refused_version_is_named_answered_503_and_measured_over_http(tmp_path: Path) -> None:
    from tests.test_hot_reload import predict

    selfcheck.record(write_model_dir(tmp_path, "endo", "1", seed=5))
    _swap_graph(_recorded(tmp_path, "endo", "2"))
    app = create_app(make_settings(tmp_path, self_check="refuse"))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert predict(client, 0).json()["model"]["version"] == "1"
        refused = predict(client, 0, "/models/endo/versions/2/predict")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_unavailable"
        assert refused.headers["Retry-After"] == "60"
        view = client.get("/models/endo").json()
        assert view["versions"] == ["1"]
        assert [r["version"] for r in view["refused"]] == ["2"]
        assert view["refused"][0]["self_check"]["status"] == "drift"
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["refused"] == ["endo:2"]
        lines = client.get("/metrics").text.splitlines()
    gauge = [
        x
        for x in lines
        if x.startswith("endofuse_model_self_check_difference{")
        and 'version="2"' in x
        and 'output="probabilities"' in x
    ]
    assert len(gauge) == 1 and float(gauge[0].rsplit(" ", 1)[1]) > 0.01


def test_without_a_reference_or_with_other_probes_the_version_still_serves(
    tmp_path: Path,
) -> None:
    write_model_dir(tmp_path, "plain", seed=1)
    vdir = _recorded(tmp_path)
    raw = json.loads((vdir / "manifest.json").read_text())
    raw["self_check"]["inputs"]["sha256"] = "0" * 64  # probes this host cannot regenerate
    raw["self_check"]["probabilities"][0][0] += 0.5  # would be drift if compared
    (vdir / "manifest.json").write_text(json.dumps(raw))
    registry = Registry.load(
        tmp_path, providers=["CPUExecutionProvider"], warmup_runs=0, self_check="refuse"
    )
    assert registry.get("plain").engine.self_check.status == "no reference"
    assert registry.get("endo").engine.self_check.status == "inputs differ"


def test_tabular_model_passes_and_drifts_through_its_tabular_branch(tmp_path: Path) -> None:
    vdir = _recorded(tmp_path, "derm", fields=FIELDS, image_mask=True)
    assert selfcheck.check_dir(vdir, 1e-6).status == "pass"
    raw = json.loads((vdir / "manifest.json").read_text())
    # Only the probe without an image changes: the tabular-only path is compared too.
    raw["self_check"]["probabilities"][3][0] += 0.05
    (vdir / "manifest.json").write_text(json.dumps(raw))
    assert selfcheck.check_dir(vdir, 0.01).status == "drift"


def test_models_view_and_command_line_report_the_check(tmp_path: Path) -> None:
    vdir = _recorded(tmp_path)
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as client:
        serving = client.get("/models/endo").json()["latest"]["serving"]
    assert serving["self_check"]["status"] == "pass"
    assert "self_check" not in client.app.state.ctx.registry.get("endo").manifest.public_view()
    runner = CliRunner()
    ok = runner.invoke(cli, ["self-check", str(vdir)])
    assert ok.exit_code == 0 and json.loads(ok.output)["status"] == "pass"
    _swap_graph(vdir)
    bad = runner.invoke(cli, ["self-check", str(vdir)])
    assert bad.exit_code == 1 and json.loads(bad.output)["status"] == "drift"


@pytest.mark.parametrize("vdir", BUNDLED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bundled_versions_answer_as_recorded(vdir: Path) -> None:
    """fp32 graphs answer the same on any x86 CPU within the tolerance. An int8 graph must
    where the CPU offers the vector extensions and runtime it was recorded with; elsewhere
    its figures are what the check is for, and only their being measured is asserted."""
    manifest = load_manifest(vdir / "manifest.json")
    result = selfcheck.check_dir(vdir, 0.01)
    recorded = result.recorded_on or {}
    same_host = {k: recorded.get(k) for k in ("cpu_features", "onnxruntime")} == {
        k: selfcheck.host()[k] for k in ("cpu_features", "onnxruntime")
    }
    if manifest.precision == "fp32" or same_host:
        assert result.status == "pass", result
    else:
        assert result.status in ("pass", "drift") and result.max_probability_diff is not None


def test_an_int8_graph_on_other_kernels_is_caught() -> None:
    """ONNX Runtime without its QDQ fusions runs the int8 arithmetic of hyperkvasir-lgi/4
    through other kernels, as another CPU's would; its fp32 source stays within 1e-6."""
    results = {}
    for version in ("2", "4"):
        vdir = REPO / "models" / "hyperkvasir-lgi" / version
        manifest = load_manifest(vdir / "manifest.json")
        engine = Engine(vdir / "model.onnx", manifest, ["CPUExecutionProvider"], 0, 1, False)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        engine.session = open_session(vdir / "model.onnx", options)
        results[version] = selfcheck.check([engine], manifest, 0.01)
    assert results["2"].status == "pass" and results["2"].max_probability_diff < 1e-5
    assert results["4"].status == "drift" and results["4"].max_probability_diff > 0.01


def test_refuse_mode_leaves_out_a_drifting_version_added_while_serving(tmp_path: Path) -> None:
    from tests.test_hot_reload import metric, predict, wait_for

    models = tmp_path / "models"
    selfcheck.record(write_model_dir(models, "endo", "1", seed=1))
    staged = write_model_dir(tmp_path / "staging", "endo", "2", seed=2)
    selfcheck.record(staged)
    _swap_graph(staged)
    settings = make_settings(models, reload_s=0.1, self_check="refuse")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        staged.rename(models / "endo" / "2")  # whole at once: the refusal is the check's
        wait_for(lambda: metric(client, "failed") >= 1, 10, "the refused version to be counted")
        view = client.get("/models/endo").json()
        assert view["versions"] == ["1"] and [r["version"] for r in view["refused"]] == ["2"]
        assert predict(client, 0).json()["model"]["version"] == "1"
        named = predict(client, 0, "/models/endo/versions/2/predict")
        assert named.json()["error"]["code"] == "model_unavailable"
        # Taken away: no longer named as refused, and a request for it is a plain 404.
        shutil.rmtree(models / "endo" / "2")
        wait_for(
            lambda: "refused" not in client.get("/models/endo").json(), 10, "the refusal to go"
        )
        assert predict(client, 0, "/models/endo/versions/2/predict").status_code == 404


def test_behind_redis_a_version_the_workers_refused_is_answered_without_waiting(
    tmp_path: Path,
) -> None:
    """The worker leaves the drifting version out and says so in its heartbeat; the API
    answers requests for it with 503 model_unavailable at once (waiting for a worker would
    end in 'overloaded' at the deadline), routes the rest to version 1, and stays ready."""
    from tests.redis_harness import RedisServer, WorkerProcess
    from tests.test_hot_reload import predict, wait_for

    models = tmp_path / "models"
    selfcheck.record(write_model_dir(models, "endo", "1", seed=5))
    _swap_graph(_recorded(models, "endo", "2"))
    server = RedisServer().start()
    worker = WorkerProcess(server.url, models, self_check="refuse", heartbeat_s=0.3, reload_s=0.3)
    try:
        worker.wait_ready()
        settings = make_settings(
            models, queue_url=server.url, heartbeat_s=0.3, latency_budget_s=0, reload_s=0.1
        )
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, 15, "ready")
            ready = client.get("/readyz").json()
            assert ready["refused"] == ["endo:2"] and ready["workers"]["endo:1"] == 1
            named = predict(client, 0, "/models/endo/versions/2/predict")
            assert named.status_code == 503, named.text
            assert named.json()["error"]["code"] == "model_unavailable"
            assert predict(client, 1).json()["model"]["version"] == "1"
            view = client.get("/models/endo").json()
            assert view["versions"] == ["1"]
            assert view["refused"] == [{"version": "2", "refused_by": "workers"}]
            # The API's gauges now name version 1 alone, as the default.
            info = [
                x
                for x in client.get("/metrics").text.splitlines()
                if x.startswith("endofuse_model_info{")
            ]
            assert len(info) == 1 and 'version="1"' in info[0] and 'default="true"' in info[0]
            # A drifting version added while serving: refused by the worker, never published
            # by the API, and answered 503 model_unavailable by name all the same.
            staged = _recorded(tmp_path / "staging", "endo", "3")
            _swap_graph(staged)
            staged.rename(models / "endo" / "3")
            wait_for(
                lambda: len(client.get("/models/endo").json().get("refused", [])) == 2,
                15,
                "version 3 to be refused",
            )
            later = predict(client, 2, "/models/endo/versions/3/predict")
            assert later.json()["error"]["code"] == "model_unavailable", later.text
            assert predict(client, 3).json()["model"]["version"] == "1"
        # The worker's figures for the version it left out (labels as its exposition sorts them).
        gauge = 'endofuse_model_self_check_difference{model="endo",output="probabilities",'
        assert worker.metric(gauge + 'version="2"}') > 0.01
    finally:
        worker.stop()
        server.kill()
