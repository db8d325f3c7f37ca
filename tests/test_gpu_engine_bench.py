"""bench/gpu_engine.py's CPU side, as it runs on any machine: without a CUDA build it measures
the two CPU layouts alone and says so, and its table has no GPU ratio to invent."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO, require_data

spec = importlib.util.spec_from_file_location("gpu_engine", REPO / "bench" / "gpu_engine.py")
gpu_engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_engine)


def test_cpu_layouts_are_measured_and_reported_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_cuda(choice: str) -> list[str]:
        raise RuntimeError("this onnxruntime build offers only CPUExecutionProvider")

    monkeypatch.setattr(gpu_engine, "resolve_providers", no_cuda)
    monkeypatch.setattr(gpu_engine, "cpu_count", lambda: 2)
    raw = gpu_engine.frames(require_data("hyperkvasir-lgi-fullres").parent)[:4]
    result = gpu_engine.measure(REPO / "models" / "hyperkvasir-lgi" / "2", raw, [1, 2], 0.2)
    assert "no CUDA" in capsys.readouterr().out
    assert "max_abs_prob_diff" not in result  # no GPU, no parity figure
    for round_ in result["images_per_s"]:
        assert set(round_) == {"cpu 1x2 b1", "cpu 2x1 b1", "cpu 1x2 b2", "cpu 2x1 b2"}
        assert all(v > 0 for v in round_.values())
    table = gpu_engine.report([result], [1, 2])
    assert table[0].startswith("| model | batch | cpu 1x2") and len(table) == 4
    assert all(row.endswith("|  |") for row in table[2:])  # the ratio column stays empty


def test_best_cpu_ratio_uses_the_faster_cpu_layout_of_each_round() -> None:
    rounds = [
        {"cuda b8": 900.0, "cpu 1x4 b8": 100.0, "cpu 4x1 b8": 300.0},
        {"cuda b8": 800.0, "cpu 1x4 b8": 400.0, "cpu 4x1 b8": 200.0},
    ]
    (row,) = gpu_engine.report([{"model": "m/1", "images_per_s": rounds}], [8])[2:]
    assert row.endswith("| 3.0×, 2.0× |")
