"""``memory://``: one in-process dynamic batcher per loaded model version."""

from __future__ import annotations

from collections.abc import Callable

from service.errors import ModelNotFound
from service.queue.base import IdleSession, InferenceQueue, ItemResult, WorkItem
from service.queue.batcher import DynamicBatcher
from service.registry import ModelVersion, Registry


class EmbeddedQueue(InferenceQueue):
    def __init__(
        self,
        registry: Registry,
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.002,
        max_queue_size: int = 256,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self._batchers: dict[str, DynamicBatcher] = {}
        self._registry = registry
        self._options = dict(
            max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_queue_size=max_queue_size
        )
        self._on_batch = on_batch

    async def start(self) -> None:
        for mv in self._registry.all():
            await self.add_model(mv)

    async def add_model(self, mv: ModelVersion) -> None:
        hook = None
        if self._on_batch is not None:
            hook = _bind(self._on_batch, mv.name)
        options = dict(self._options)
        # A measured limit (service/batch_profile.py) replaces the configured bound.
        measured = getattr(mv.engine, "max_batch_size", None)
        if measured:
            options["max_batch_size"] = measured
        batcher = DynamicBatcher(mv.engine, on_batch=hook, **options)  # type: ignore[arg-type]
        batcher.start()
        self._batchers[mv.key] = batcher

    async def remove_model(self, mv: ModelVersion) -> None:
        batcher = self._batchers.get(mv.key)
        if batcher is not None:
            await batcher.stop()  # answers what it holds, then ends
            self._batchers.pop(mv.key, None)

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()

    async def submit(self, item: WorkItem, timeout_s: float) -> ItemResult:
        batcher = self._batchers.get(item.model_key)
        if batcher is None:
            raise ModelNotFound(f"model '{item.model_key}' is not served by this queue")
        return await batcher.submit(item, timeout_s)

    def idle_session(self, model_key: str) -> IdleSession | None:
        batcher = self._batchers.get(model_key)
        return batcher.idle_session() if batcher is not None else None

    def depth(self, model_key: str) -> int:
        batcher = self._batchers.get(model_key)
        return batcher.depth if batcher else 0


def _bind(hook: Callable[[str, int], None], name: str) -> Callable[[int], None]:
    return lambda size: hook(name, size)
