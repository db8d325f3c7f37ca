"""Request queues between the HTTP layer and inference engines.

One interface (:class:`~service.queue.base.InferenceQueue`), several backends selected by URL:
``memory://`` (embedded, in-process dynamic batching; the default) and ``redis://`` (Redis
Streams between API replicas and ``endofuse worker`` processes).
"""

from service.queue.base import InferenceQueue, ItemResult, WorkItem
from service.queue.factory import create_queue

__all__ = ["InferenceQueue", "ItemResult", "WorkItem", "create_queue"]
