"""Where training runs: the CPU, or a CUDA GPU when asked for. The draws made outside the
model (numpy and CPU generators) stay on the CPU and their results move to the device, so a
seed draws the same augmentations, masks and orders on either; checkpoints are written with
CPU tensors, so a run trained on a GPU exports, resumes and evaluates on a machine without
one."""

from __future__ import annotations

import platform
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve(name: str) -> torch.device:
    """``auto``: the GPU if torch sees one, else the CPU. ``cuda`` without a GPU is an error,
    not a silent fall-back: an hour-long run on the wrong device is worth a line at the start."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    return torch.device(name)


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def cpu_tree(value: Any) -> Any:
    """``value`` (an optimiser state, say) with every tensor in it moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: cpu_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_tree(v) for v in value)
    return value


def describe(device: torch.device) -> str:
    """What the run's report says it trained on."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
