"""Does this host answer as the host that fitted the model's decision parameters did?

The prediction-set thresholds and the out-of-distribution threshold in a manifest were fitted
on one machine's outputs. ONNX Runtime picks its kernels by CPU (an int8 graph runs through
VNNI dot products on one CPU and 16-bit multiply-adds on another) and by execution provider,
so the same graph can answer differently elsewhere, and the thresholds then no longer mean
what the manifest says. At export the graph's outputs on a few synthetic probe inputs are
recorded in the manifest (``self_check``); at load every session runs them again and the
largest difference is reported (``GET /models/{name}``, a gauge, a warning past the
tolerance, or a refusal to serve with ``ENDOFUSE_SELF_CHECK=refuse``).

The probes are generated here from a seed: smooth colour fields with a dark vignette and
grain, not patient data, so nothing of a dataset travels with the model.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.engine import Batch
from service.errors import ManifestError
from service.manifest import Manifest

GENERATOR = "smooth-fields-v1"
PROBES = 8
_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "sve")


class _Runs(Protocol):
    def run_with_logits(self, batch: Batch) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass(frozen=True)
class SelfCheck:
    """``status``: ``pass``, ``drift`` (past the tolerance), ``no reference`` (a manifest
    written before self-checks) or ``inputs differ`` (this host generates other probes: the
    comparison would mean nothing)."""

    status: str
    tolerance: float
    max_probability_diff: float | None = None
    max_ood_relative_diff: float | None = None
    labels_changed: int | None = None
    probes: int = 0
    sessions: int = 0
    recorded_on: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SelfCheckRefused(ManifestError):
    """``ENDOFUSE_SELF_CHECK=refuse`` and a version past the tolerance: that version is left
    out, the others serve."""

    def __init__(self, message: str, result: SelfCheck) -> None:
        super().__init__(message)
        self.result = result


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinear upsampling of a (cells+1)² grid of random colours to h×w."""
    grid = rng.random((cells + 1, cells + 1, 3))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def probe_images(height: int, width: int, count: int = PROBES, seed: int = 0) -> np.ndarray:
    """uint8 [count, height, width, 3]: reddish smooth fields at two scales, grain, a dark
    vignette and, on every other probe, a black ring outside a circular field of view."""
    out = np.empty((count, height, width, 3), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    radius = np.hypot((yy - (height - 1) / 2) / (height / 2), (xx - (width - 1) / 2) / (width / 2))
    vignette = (1 - 0.5 * np.clip(radius, 0, 1) ** 2)[..., None]
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        tint = np.array([0.55, 0.15, 0.1]) + np.array([0.4, 0.35, 0.3]) * rng.random(3)
        field = 0.6 * _smooth(rng, height, width, 2 + i % 4)
        field += 0.4 * _smooth(rng, height, width, 12 + 4 * (i % 3))
        img = field * tint * 408.0 + rng.normal(0, 4 + 2 * (i % 3), (height, width, 3))
        img *= vignette
        if i % 2:
            img[radius > 0.98] = 0
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def probe_batch(manifest: Manifest, count: int = PROBES, seed: int = 0) -> Batch:
    """The probes as one batch. A model with tabular inputs gets fields on every other probe
    and, where the image may be absent, every fourth probe without its image, so the
    tabular branch and the missing-image token are exercised too."""
    spec = manifest.image
    images = probe_images(spec.height, spec.width, count, seed)
    if manifest.tabular is None:
        return Batch(images=images)
    width = len(manifest.tabular.fields)
    rng = np.random.default_rng([seed, count])
    tabular = rng.normal(0, 1, (count, width)).astype(np.float32)
    mask = np.zeros((count, width), np.float32)
    mask[1::2] = 1.0
    tabular *= mask
    image_mask = np.ones((count, 1), np.float32)
    if manifest.image_optional:
        image_mask[3::4] = 0.0
    return Batch(images=images, tabular=tabular, tabular_mask=mask, image_mask=image_mask)


def batch_digest(batch: Batch) -> str:
    h = hashlib.sha256()
    for part in (batch.images, batch.tabular, batch.tabular_mask, batch.image_mask):
        if part is not None:
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def host() -> dict[str, Any]:
    """What decides which kernels run: the CPU, its vector extensions, the runtime."""
    import onnxruntime as ort

    model, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():  # the first processor's entry
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not model:
                model = value
            if key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_features": [f for f in _CPU_FEATURES if f in flags],
        "onnxruntime": ort.__version__,
    }


def _outputs(engine: _Runs, batch: Batch, n_labels: int) -> tuple[np.ndarray, np.ndarray | None]:
    probs, logits = engine.run_with_logits(batch)
    ood = None
    if logits is not None and logits.shape[1] > n_labels:
        ood = logits[:, n_labels:]
    return np.asarray(probs, np.float64), ood


def reference(engine: _Runs, manifest: Manifest, providers: list[str]) -> dict[str, Any]:
    """The manifest's ``self_check`` block: this host's outputs on the probes."""
    batch = probe_batch(manifest)
    probs, ood = _outputs(engine, batch, len(manifest.labels))
    inputs = {"generator": GENERATOR, "seed": 0, "count": PROBES, "sha256": batch_digest(batch)}
    block: dict[str, Any] = {
        "inputs": inputs,
        "probabilities": probs.astype(np.float32).tolist(),
        "recorded_on": {**host(), "providers": providers},
    }
    if ood is not None:
        block["ood_distance"] = ood.astype(np.float32).tolist()
    return block


def check(engines: list[_Runs], manifest: Manifest, tolerance: float) -> SelfCheck:
    """Run the recorded probes on every session and compare with the manifest's outputs."""
    block = manifest.raw.get("self_check")
    if not block:
        return SelfCheck("no reference", tolerance)
    recorded_on = block.get("recorded_on")
    inputs = block["inputs"]
    if inputs.get("generator") != GENERATOR:
        return SelfCheck("inputs differ", tolerance, recorded_on=recorded_on)
    batch = probe_batch(manifest, int(inputs["count"]), int(inputs["seed"]))
    if batch_digest(batch) != inputs["sha256"]:
        return SelfCheck("inputs differ", tolerance, recorded_on=recorded_on)
    want = np.asarray(block["probabilities"], np.float64)
    want_ood = np.asarray(block["ood_distance"], np.float64) if "ood_distance" in block else None
    prob_diff, ood_diff = 0.0, None
    changed = 0
    for engine in engines:
        probs, ood = _outputs(engine, batch, len(manifest.labels))
        prob_diff = max(prob_diff, float(np.abs(probs - want).max()))
        changed = max(changed, int((probs.argmax(1) != want.argmax(1)).sum()))
        if want_ood is not None and ood is not None and ood.shape == want_ood.shape:
            relative = np.abs(ood - want_ood) / np.maximum(np.abs(want_ood), 1e-6)
            ood_diff = max(ood_diff or 0.0, float(relative.max()))
    drift = prob_diff > tolerance or (ood_diff or 0.0) > tolerance
    return SelfCheck(
        "drift" if drift else "pass",
        tolerance,
        round(prob_diff, 7),
        round(ood_diff, 7) if ood_diff is not None else None,  # None: not compared
        changed,
        len(want),
        len(engines),
        recorded_on,
    )


def _cpu_engine(vdir: Path, manifest: Manifest) -> Any:
    from service.engine import Engine

    return Engine(vdir / "model.onnx", manifest, ["CPUExecutionProvider"], 0, 1, False)


def record(vdir: Path) -> dict[str, Any]:
    """Write this host's outputs on the probes (ONNX Runtime, CPU) into ``vdir``'s manifest:
    done by the step that fits the decision thresholds, on the same host and runtime."""
    from service.manifest import load_manifest

    path = vdir / "manifest.json"
    manifest = load_manifest(path)
    block = reference(_cpu_engine(vdir, manifest), manifest, ["CPUExecutionProvider"])
    text = json.dumps(dict(manifest.raw, self_check=block), indent=2)
    path.write_text(text + ("\n" if path.read_text().endswith("\n") else ""))
    return block


def check_dir(vdir: Path, tolerance: float) -> SelfCheck:
    """The load-time check of one version directory, on CPU, outside a server."""
    from service.manifest import load_manifest

    manifest = load_manifest(vdir / "manifest.json")
    return check([_cpu_engine(vdir, manifest)], manifest, tolerance)
