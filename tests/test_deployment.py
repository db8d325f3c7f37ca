"""The container deployment, checked structurally: compose services, networks, Redis
hardening, GPU reservation, scrape targets and dashboard queries. What an engine cannot show
on this CPU machine (the GPU target, Grafana) is checked here only; the rest also runs for real
in tests/test_compose_e2e.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from service import errors
from service.config import Settings
from service.metrics import Metrics, WorkerMetrics

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_the_scaled_topology() -> None:
    assert {"redis", "api", "worker", "prometheus", "grafana", "gateway"} <= set(SERVICES)
    assert SERVICES["api"]["build"]["target"] == "cpu"
    assert SERVICES["worker"]["build"]["target"] == "gpu"
    for name in ("api", "worker"):
        env = SERVICES[name]["environment"]
        assert env["ENDOFUSE_QUEUE_URL"].startswith("redis://:${REDIS_PASSWORD")
        # Replicas scale: no fixed host port on what `--scale` multiplies.
        assert "ports" not in SERVICES[name], name
    assert SERVICES["worker"]["command"][:2] == ["endofuse", "worker"]
    for path in re.findall(
        r"\./(service/deploy/[\w./-]+):", (REPO / "docker-compose.yml").read_text()
    ):
        assert (REPO / path).exists(), path


def test_redis_is_internal_password_protected_and_never_persists() -> None:
    redis = SERVICES["redis"]
    assert redis["networks"] == ["backend"] and "ports" not in redis
    assert COMPOSE["networks"]["backend"]["internal"] is True
    cmd = redis["command"]
    opts = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1, 2)}
    assert opts["--save"] == "" and opts["--appendonly"] == "no"
    assert opts["--maxmemory-policy"] == "noeviction" and opts["--maxmemory"]
    assert "REDIS_PASSWORD" in opts["--requirepass"]
    assert "backend" in SERVICES["worker"]["networks"]
    assert "frontend" not in SERVICES["worker"]["networks"]


def test_worker_reserves_a_gpu() -> None:
    (device,) = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_dockerfile_targets_are_torch_free_non_root_and_healthchecked() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = {stage: base for base, stage in re.findall(r"^FROM (\S+) AS ([\w-]+)", text, re.M)}
    assert stages["gpu"].startswith("nvidia/cuda:") and stages["cpu"] == "${BASE}"
    # The public slim image by default; build-images.sh passes a Debian-built one.
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    for target in ("cpu", "gpu"):
        body = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER endofuse" in body and "HEALTHCHECK" in body, target
        installs = " ".join(re.findall(r"pip\S* install[^\n]*", body))
        assert "torch" not in installs.replace("onnxruntime", ""), target
    assert "onnxruntime-gpu" in text


# The newest onnxruntime-gpu on PyPI built for each CUDA major (read from each wheel's
# libonnxruntime_providers_cuda.so: 1.26 links libcudart.so.12, 1.27 libcudart.so.13).
ORT_GPU_BEFORE = {12: "1.27"}


def test_gpu_extra_matches_the_gpu_images_cuda() -> None:
    """A wheel for another CUDA major than the image's cannot load its CUDA provider, and the
    session quietly runs on the CPU: the gpu extra's bound follows the image's base."""
    text = (REPO / "Dockerfile").read_text()
    cuda = int(re.search(r"^FROM nvidia/cuda:(\d+)\.\S* AS gpu$", text, re.M).group(1))
    # (tomllib is 3.11+; the project supports 3.10)
    spec = re.search(r'^gpu = \["([^"]+)"\]$', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert spec.startswith("onnxruntime-gpu") and f"<{ORT_GPU_BEFORE[cuda]}" in spec, spec


def test_prometheus_scrapes_every_api_and_worker_replica() -> None:
    config = yaml.safe_load((REPO / "service/deploy/prometheus.yml").read_text())
    targets = {
        sd["names"][0]: sd["port"]
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    assert targets == {"api": Settings().port, "worker": Settings().worker_port}
    assert all(
        sd["type"] == "A" for job in config["scrape_configs"] for sd in job["dns_sd_configs"]
    )


def exported_names() -> set[str]:
    names = set()
    for metrics in (Metrics(), WorkerMetrics()):
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            names.add(family.name)
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count", "total"))
    return names


def test_dashboard_queries_name_metrics_we_export() -> None:
    dashboard = json.loads((REPO / "service/deploy/grafana/dashboards/endofuse.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queue depth", "batch size"):
        assert topic in titles, topic
    known = exported_names()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bendofuse_\w+", target["expr"]):
                assert name in known, f"{panel['title']}: {name} is not exported"


def test_alert_rules_are_loaded_and_name_what_we_export() -> None:
    """Each rule queries metrics and outcomes the service has; Prometheus is pointed at the
    file and compose mounts it there (tests/test_compose_e2e.py: the real Prometheus loads
    and evaluates every rule)."""
    config = yaml.safe_load((REPO / "service/deploy/prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mount = "./service/deploy/alerts.yml:/etc/prometheus/alerts.yml:ro"
    assert mount in SERVICES["prometheus"]["volumes"]
    rules = yaml.safe_load((REPO / "service/deploy/alerts.yml").read_text())
    known = exported_names()
    codes = {cls.code for cls in vars(errors).values() if isinstance(cls, type)
             and issubclass(cls, errors.ServiceError)}  # fmt: skip
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in alerts}) == len(alerts) >= 10
    for rule in alerts:
        for name in re.findall(r"\bendofuse_\w+", rule["expr"]):
            assert name in known, f"{rule['alert']}: {name} is not exported"
        for outcome in re.findall(r'outcome=~?"([^"]+)"', rule["expr"]):
            assert set(outcome.split("|")) <= codes, f"{rule['alert']}: {outcome}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_rules_fire_on_synthetic_series() -> None:
    """tests/alerts_test.yml through Prometheus' own promtool, from the image the compose
    test builds (service/deploy/build-images.sh): the drift, out-of-distribution and worker
    alerts fire when they should and stay quiet when they should."""
    infra = "localhost/endofuse-infra:bookworm"
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (make test installs it from Debian's packages)")
    env = {**os.environ}
    conf = Path(tempfile.gettempdir()) / "endofuse-containers.conf"
    if "CONTAINERS_CONF" not in env and conf.is_file():
        env["CONTAINERS_CONF"] = str(conf)  # the rlimits build-images.sh chose for this host
    if subprocess.run([podman, "image", "exists", infra], env=env).returncode != 0:
        pytest.skip(f"{infra} is not built yet (service/deploy/build-images.sh builds it)")
    out = subprocess.run(
        [podman, "run", "--rm",
         "-v", f"{REPO / 'service/deploy'}:/rules:ro", "-v", f"{REPO / 'tests'}:/t:ro",
         infra, "promtool", "test", "rules", "/t/alerts_test.yml"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_cpu_override_drops_the_gpu_and_keeps_the_rest() -> None:
    override = (REPO / "service/deploy/compose.cpu.yml").read_text()
    # `!reset` is a compose tag: read it as plain YAML to see what it replaces.
    worker = yaml.safe_load(override.replace("!reset ", ""))["services"]["worker"]
    assert worker["build"]["target"] == "cpu" and worker["image"] == "endofuse:cpu"
    assert "deploy: !reset" in override


def test_gateway_resolver_comes_from_the_container() -> None:
    conf = (REPO / "service/deploy/nginx.conf").read_text()
    assert "resolver @RESOLVER@" in conf
    command = " ".join(SERVICES["gateway"]["command"])
    assert "@RESOLVER@" in command and "/etc/resolv.conf" in command
