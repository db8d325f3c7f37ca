"""The queue contract every backend satisfies."""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from service.registry import ModelVersion


@dataclass(eq=False)
class WorkItem:
    """One validated, decoded request: fixed-shape arrays only, never the original upload."""

    model_key: str
    image: np.ndarray  # uint8 [H,W,3]
    tabular: np.ndarray | None = None  # float32 [F]
    tabular_mask: np.ndarray | None = None  # float32 [F]
    image_present: bool = True
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class ItemResult:
    probabilities: np.ndarray  # float32 [K]
    queue_ms: float
    inference_ms: float
    batch_size: int
    reply_ms: float | None = None  # worker -> API hop, redis:// only
    logits: np.ndarray | None = None  # float32 [K], for the out-of-distribution score


T = TypeVar("T")


class IdleSession(abc.ABC):
    """A session held for one request that arrived while nothing of its model ran or waited:
    the request is decoded and run on one thread, without queueing. Each hand-over between
    threads costs 0.5-1 ms on a small VM (docs/performance.md, c=1 overhead)."""

    @abc.abstractmethod
    async def run(
        self, prepare: Callable[[], T], item: Callable[[T], WorkItem], timeout_s: float
    ) -> tuple[T, float, ItemResult]:
        """``prepare()`` then inference of ``item(prepared)``, on the session's thread; returns
        the prepared request, when it was ready (``time.perf_counter``) and its result.
        Raises as ``InferenceQueue.submit`` does, and whatever ``prepare`` raises."""


class InferenceQueue(abc.ABC):
    """Submit one item, get its result. Backends decide where and how items are batched.

    ``submit`` raises :class:`~service.errors.Overloaded` (queue full or the expected wait
    exceeds the timeout), :class:`~service.errors.DeadlineExceeded` (not answered in time) or
    :class:`~service.errors.InferenceFailed` (this item failed; its batch neighbours do not).
    """

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop accepting, finish what was accepted, then release resources."""

    @abc.abstractmethod
    async def submit(self, item: WorkItem, timeout_s: float) -> ItemResult: ...

    @abc.abstractmethod
    def depth(self, model_key: str) -> int: ...

    def idle_session(self, model_key: str) -> IdleSession | None:
        """A session of ``model_key`` held for one request, where this process runs the model
        and nothing waits for it; else None (submit then)."""
        return None

    def reachable(self) -> bool:
        """Whether the backend can take work now (readiness); in-process: always."""
        return True

    async def add_model(self, mv: ModelVersion) -> None:  # noqa: B027 - remote workers: nothing
        """Start serving a version added to the registry while running (hot reload)."""

    async def remove_model(self, mv: ModelVersion) -> None:  # noqa: B027
        """Finish what was accepted for a version the registry no longer routes to."""

    def workers(self) -> dict[str, int] | None:
        """Live workers per model key, as last seen; None where this process runs the models."""
        return None
