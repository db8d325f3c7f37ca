"""ONNX Runtime engine: one session per model version, batch in, calibrated probabilities out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import InferenceFailed, ManifestError
from service.manifest import Manifest, check_against_graph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 [N,H,W,3]
    tabular: np.ndarray | None = None  # float32 [N,F]
    tabular_mask: np.ndarray | None = None  # float32 [N,F]
    image_mask: np.ndarray | None = None  # float32 [N,1]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def resolve_providers(choice: str) -> list[str]:
    """``auto`` = CUDA when this onnxruntime build and machine offer it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "providers=cuda but this onnxruntime build offers only "
                f"{available}; install the 'gpu' extra (onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Engine:
    def __init__(
        self,
        model_path: Path,
        manifest: Manifest,
        providers: list[str],
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spinning: bool = True,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=providers
            )
        except Exception as exc:
            raise ManifestError(f"{model_path}: ONNX Runtime could not load it ({exc})") from exc
        self.manifest = manifest
        self.providers = self.session.get_providers()
        inputs = {i.name: (i.type, list(i.shape)) for i in self.session.get_inputs()}
        outputs = {o.name: (o.type, list(o.shape)) for o in self.session.get_outputs()}
        check_against_graph(manifest, inputs, outputs, where=str(model_path))
        self._input_names = set(inputs)
        self._outputs = ["probabilities", "logits"] if "logits" in outputs else ["probabilities"]
        if "logits" in outputs and "ood_distance" in outputs:
            self._outputs.append("ood_distance")

    def run(self, batch: Batch) -> np.ndarray:
        """Return probabilities float32 [N,K]; raises InferenceFailed on any runtime error."""
        return self.run_with_logits(batch)[0]

    def run_with_logits(self, batch: Batch) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities float32 [N,K], and the logits row that feeds the out-of-distribution
        score: float32 [N,K], or [N,K+1] with the graph's ``ood_distance`` appended (None for
        a graph without logits). Raises InferenceFailed on any runtime error."""
        feeds: dict[str, np.ndarray] = {"image": np.ascontiguousarray(batch.images, np.uint8)}
        if "tabular" in self._input_names:
            n_fields = len(self.manifest.tabular.fields) if self.manifest.tabular else 0
            tab = batch.tabular
            mask = batch.tabular_mask
            if tab is None:
                tab = np.zeros((len(batch), n_fields), np.float32)
                mask = np.zeros((len(batch), n_fields), np.float32)
            feeds["tabular"] = np.ascontiguousarray(tab, np.float32)
            feeds["tabular_mask"] = np.ascontiguousarray(mask, np.float32)
        if "image_mask" in self._input_names:
            image_mask = batch.image_mask
            if image_mask is None:
                image_mask = np.ones((len(batch), 1), np.float32)
            feeds["image_mask"] = np.ascontiguousarray(image_mask, np.float32)
        try:
            probs, *rest = self.session.run(self._outputs, feeds)
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
        probs = np.asarray(probs, dtype=np.float32)
        if probs.shape != (len(batch), len(self.manifest.labels)):
            raise InferenceFailed(f"model returned shape {probs.shape}")
        if not rest:
            return probs, None
        logits = np.asarray(rest[0], dtype=np.float32)
        if len(rest) > 1:  # one row travels through every queue backend: append the distance
            distance = np.asarray(rest[1], dtype=np.float32).reshape(len(batch), 1)
            logits = np.concatenate([logits, distance], axis=1)
        return probs, logits

    def warm_up(self, runs: int, max_batch_size: int = 16) -> None:
        """Run dummy batches so the first real request pays no lazy-initialisation cost.

        The lone-request shape first, then the largest batch: ONNX Runtime's memory arena grows
        to the biggest batch it has seen and keeps that size, so the memory a replica reports
        once ready is the memory it keeps under load, not a step up the first time load peaks.
        """
        spec = self.manifest.image
        sizes = [1, max_batch_size]
        for i in range(runs):
            size = sizes[i % 2]
            self.run(Batch(images=np.zeros((size, spec.height, spec.width, 3), np.uint8)))
