"""Training's device choice: the CPU by default, a CUDA GPU when asked for, and checkpoints
that load on a machine without one. On a CPU-only machine (CI) ``auto`` is the CPU; run on a
GPU machine, the same tests drive the CUDA path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch", reason="training tests need the 'train' extra (torch)")

from tests.smoke_configs import ALL_METHODS, smoke_config  # noqa: E402
from training.device import cpu_state, cpu_tree, describe, resolve  # noqa: E402


def test_auto_is_the_gpu_where_torch_sees_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve("auto").type == expected
    assert resolve("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_not_replaced(tmp_path: Path) -> None:
    from training import train

    with pytest.raises(SystemExit, match="no CUDA GPU"):
        resolve("cuda")
    # Refused before the run directory is made or a frame decoded.
    config = Path("training/configs/hyperkvasir-lgi.yaml")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        train.main(config, tmp_path / "run", device="cuda")
    assert not (tmp_path / "run").exists()


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        resolve("gpu0")


def test_checkpoint_helpers_leave_no_tensor_on_the_device() -> None:
    dev = resolve("auto")
    layer = torch.nn.Linear(3, 2).to(dev)
    optimiser = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(4, 3, device=dev)).sum().backward()
    optimiser.step()
    state = cpu_tree(optimiser.state_dict())
    tensors = [v for s in state["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert all(t.device.type == "cpu" for t in cpu_state(layer).values())
    assert cpu_tree((torch.ones(1, device=dev), [2]))[1] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("methods", [False, True], ids=["recipe", "all-methods"])
def test_run_on_auto_device_writes_cpu_checkpoints_and_names_its_device(
    tmp_path: Path, methods: bool
) -> None:
    """One epoch of the shipped endoscopy recipe on ``auto`` (with every seed method over
    pixels: pretraining, shift, negatives, curriculum): its report names the device it ran
    on, and every checkpoint loads with no GPU (no map_location needed)."""
    from training import train

    config = smoke_config(tmp_path, "hk2")
    raw = yaml.safe_load(config.read_text())
    raw["train"].update(epochs=1)
    if methods:
        raw["methods"] = ALL_METHODS
    config.write_text(yaml.safe_dump(raw))
    run_dir = train.main(config, tmp_path / "run", device="auto")
    report = json.loads((run_dir / "results.json").read_text())
    assert report["device"] == describe(resolve("auto"))
    names = ["ckpt_best.pt", "ckpt_last.pt"] + (["ckpt_pretrain.pt"] if methods else [])
    for name in names:
        # No map_location: tensors come back on the device they were saved from.
        saved = torch.load(run_dir / name, weights_only=False)
        assert all(t.device.type == "cpu" for t in saved["model"].values()), name
