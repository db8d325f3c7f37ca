"""ONNX Runtime engine: a session per model version (or several: an instance group), batch
in, calibrated probabilities out."""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InferenceFailed, ManifestError
from service.manifest import Manifest, check_against_graph
from service.sessions import open_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 [N,H,W,3]
    tabular: np.ndarray | None = None  # float32 [N,F]
    tabular_mask: np.ndarray | None = None  # float32 [N,F]
    image_mask: np.ndarray | None = None  # float32 [N,1]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def cpu_count() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def instance_layout(providers: list[str], instances: int, intra_op_threads: int) -> tuple[int, int]:
    """(sessions, intra-op threads per session) for a model version. 0 means "by device":
    on CPU one single-threaded session per core (measured in docs/performance.md: two
    one-thread sessions run 1.7x the images of one two-thread session on two cores); on
    CUDA one session, whose threads only feed the GPU."""
    on_gpu = providers[0] != "CPUExecutionProvider"
    if instances <= 0:
        instances = 1 if on_gpu else cpu_count()
    if intra_op_threads <= 0 and not on_gpu and instances > 1:
        intra_op_threads = max(1, cpu_count() // instances)
    return instances, intra_op_threads


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
            self.session = open_session(model_path, options, providers)
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
        score: float32 [N,K], or [N,K+D] with the graph's ``ood_distance`` columns (one per
        feature layer) appended (None for a graph without logits). Raises InferenceFailed on
        any runtime error."""
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
        if len(rest) > 1:  # one row travels through every queue backend: append the distances
            distance = np.asarray(rest[1], dtype=np.float32).reshape(len(batch), -1)
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


class EnginePool:
    """An instance group: several sessions of one graph. A batch runs on whichever session is
    free, so up to ``size`` batches run at once (one per calling thread); it has the
    ``Engine`` interface, so the batcher and workers use either.

    With a ``solo`` session (every core's threads), a batch that arrives while nothing else
    runs takes it: a lone request on a quiet service is answered as fast as one session on the
    whole CPU answers it, and load still spreads over the single-threaded sessions."""

    def __init__(self, engines: list[Engine], solo: Engine | None = None) -> None:
        if not engines:
            raise ValueError("an instance group needs at least one session")
        self.engines = engines
        self.solo = solo
        self._lock = threading.Lock()
        self._running = 0
        self.manifest = engines[0].manifest
        self.providers = engines[0].providers
        self.threads_per_instance = 0  # as configured; 0: ONNX Runtime's choice
        self._free: queue.SimpleQueue[Engine] = queue.SimpleQueue()
        for engine in engines:
            self._free.put(engine)
        # Set from a measured batch profile (service/batch_profile.py), else by the caller.
        self.max_batch_size: int | None = None
        self.profile: Any = None
        self.self_check: Any = None  # service/selfcheck.py, at load

    def sessions(self) -> list[Engine]:
        return [*self.engines, *([self.solo] if self.solo else [])]

    @property
    def size(self) -> int:
        return len(self.engines)

    def run(self, batch: Batch) -> np.ndarray:
        return self.run_with_logits(batch)[0]

    def run_with_logits(self, batch: Batch) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            alone = self._running == 0
            self._running += 1
        try:
            if alone and self.solo is not None:
                return self.solo.run_with_logits(batch)
            engine = self._free.get()  # blocks while every session is busy
            try:
                return engine.run_with_logits(batch)
            finally:
                self._free.put(engine)
        finally:
            with self._lock:
                self._running -= 1

    def warm_up(self, runs: int, max_batch_size: int = 16) -> None:
        for engine in self.sessions():
            engine.warm_up(runs, max_batch_size)

    def describe(self) -> dict[str, Any]:
        """What ``GET /models/{name}`` shows of how this version runs."""
        out: dict[str, Any] = {
            "instances": self.size,
            "intra_op_threads": self.threads_per_instance or "auto",
            # ONNX Runtime picks the solo session's threads (one per physical core).
            "solo_session": self.solo is not None,
            "providers": self.providers,
            "max_batch_size": self.max_batch_size,
        }
        if self.profile is not None:
            out["batch_profile"] = self.profile.to_dict()
        if self.self_check is not None:
            out["self_check"] = self.self_check.to_dict()
        return out


def open_pool(
    model_path: Path,
    manifest: Manifest,
    providers: list[str],
    instances: int = 1,
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    spinning: bool = True,
    solo: bool = False,
) -> EnginePool:
    """``solo``: add a session on every core for lone requests, where the group's sessions
    each use fewer threads than the CPU has (CPU only)."""
    instances, threads = instance_layout(providers, instances, intra_op_threads)

    def session(n_threads: int) -> Engine:
        return Engine(model_path, manifest, providers, n_threads, inter_op_threads, spinning)

    cores = cpu_count()
    on_cpu = providers[0] == "CPUExecutionProvider"
    with_solo = solo and on_cpu and instances > 1 and 0 < threads < cores
    # The solo session takes ONNX Runtime's own thread choice, as a one-session layout does.
    pool = EnginePool(
        [session(threads) for _ in range(instances)], session(0) if with_solo else None
    )
    pool.threads_per_instance = threads
    return pool
