"""What travels through Redis: stream names and the request/reply entry encodings.

A request entry carries the decoded, fixed-shape uint8 image and the validated tabular arrays,
never the uploaded file. Dead-letter entries carry metadata only (:data:`METADATA_FIELDS`).
Deadlines are Unix times, so API and worker hosts need synchronised clocks (NTP).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from service.queue.base import ItemResult, WorkItem

METADATA_FIELDS = ("id", "model", "reply", "deadline")


@dataclass(frozen=True)
class Streams:
    prefix: str = "endofuse"

    def requests(self, model_key: str) -> str:
        return f"{self.prefix}:requests:{model_key}"

    def reply(self, owner: str) -> str:
        return f"{self.prefix}:replies:{owner}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead-letters"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:workers:{consumer}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:workers:*"

    @property
    def group(self) -> str:
        return f"{self.prefix}-workers"


def encode_request(item: WorkItem, reply: str, deadline: float) -> dict[str, bytes | str]:
    if item.image.dtype != np.uint8 or item.image.ndim != 3:
        raise ValueError("request image must be uint8 [H, W, 3]")
    fields: dict[str, bytes | str] = {
        "id": item.request_id,
        "model": item.model_key,
        "reply": reply,
        "deadline": repr(deadline),
        "shape": ",".join(map(str, item.image.shape)),
        "image": np.ascontiguousarray(item.image).tobytes(),
        "image_present": "1" if item.image_present else "0",
    }
    if item.tabular is not None and item.tabular_mask is not None:
        fields["tabular"] = np.asarray(item.tabular, np.float32).tobytes()
        fields["tabular_mask"] = np.asarray(item.tabular_mask, np.float32).tobytes()
    return fields


def entry_ms(entry_id: bytes) -> float:
    """Stream ids start with the Unix time in ms at which Redis appended the entry."""
    return float(entry_id.split(b"-", 1)[0])


def as_text(value: bytes | str) -> str:
    """A stream or entry name as redis-py returns it (bytes unless decode_responses)."""
    return value.decode() if isinstance(value, bytes) else value


def _text(fields: dict[bytes, bytes], key: str) -> str:
    return fields[key.encode()].decode()


def request_metadata(fields: dict[bytes, bytes]) -> dict[str, str]:
    """The fields of an entry that may be logged or dead-lettered (never pixels or values)."""
    return {k: fields[k.encode()].decode() for k in METADATA_FIELDS if k.encode() in fields}


def decode_request(fields: dict[bytes, bytes]) -> tuple[WorkItem, str, float]:
    """-> (item, reply stream, deadline). Raises ValueError/KeyError on a malformed entry."""
    shape = tuple(int(x) for x in _text(fields, "shape").split(","))
    image = np.frombuffer(fields[b"image"], np.uint8).reshape(shape)
    tabular = mask = None
    if b"tabular" in fields:
        tabular = np.frombuffer(fields[b"tabular"], np.float32)
        mask = np.frombuffer(fields[b"tabular_mask"], np.float32)
        if tabular.shape != mask.shape:
            raise ValueError("tabular values and mask differ in length")
    item = WorkItem(
        model_key=_text(fields, "model"),
        image=image,
        tabular=tabular,
        tabular_mask=mask,
        image_present=_text(fields, "image_present") == "1",
        request_id=_text(fields, "id"),
    )
    return item, _text(fields, "reply"), float(_text(fields, "deadline"))


def encode_result(request_id: str, result: ItemResult, worker: str) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {}
    if result.logits is not None:
        fields["logits"] = np.asarray(result.logits, np.float32).tobytes()
    return fields | {
        "id": request_id,
        "status": "ok",
        "probabilities": np.asarray(result.probabilities, np.float32).tobytes(),
        "timing": json.dumps(
            {"queue_ms": result.queue_ms, "inference_ms": result.inference_ms, "sent": time.time()}
        ),
        "batch_size": str(result.batch_size),
        "worker": worker,
    }


def encode_error(request_id: str, code: str, message: str, worker: str) -> dict[str, str]:
    return {"id": request_id, "status": "error", "code": code, "message": message, "worker": worker}


@dataclass(frozen=True)
class Reply:
    request_id: str
    result: ItemResult | None
    code: str = ""
    message: str = ""


def decode_reply(fields: dict[bytes, bytes]) -> Reply:
    request_id = _text(fields, "id")
    if _text(fields, "status") != "ok":
        return Reply(request_id, None, _text(fields, "code"), _text(fields, "message"))
    timing = json.loads(_text(fields, "timing"))
    result = ItemResult(
        probabilities=np.frombuffer(fields[b"probabilities"], np.float32).copy(),
        queue_ms=float(timing["queue_ms"]),
        inference_ms=float(timing["inference_ms"]),
        batch_size=int(_text(fields, "batch_size")),
        reply_ms=max(0.0, (time.time() - float(timing["sent"])) * 1e3),
        logits=(
            np.frombuffer(fields[b"logits"], np.float32).copy() if b"logits" in fields else None
        ),
    )
    return Reply(request_id, result)
