"""The request lifecycle: decode -> validate -> (queue: batch -> infer -> unbatch) -> encode.

Each stage is a small function; the HTTP layer only parses the transport into
:class:`RawRequest` and turns the returned dict into JSON.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.admission import AdmissionControl
from service.config import Settings
from service.decision import decide, is_uniform, pattern_of
from service.errors import MissingInput
from service.manifest import Manifest
from service.metrics import Metrics
from service.preprocess import decode_frame, from_pixels
from service.queue import InferenceQueue, ItemResult, WorkItem
from service.registry import ModelVersion, Registry
from service.tabular import parse_tabular


@dataclass
class RawRequest:
    """What the client sent, transport-independent. ``tabular`` is parsed JSON or None."""

    image: bytes | None
    tabular: Any = None
    request_id: str = ""
    coverage: float | None = None  # of the prediction set; None: the settings' default
    sets: str | None = None  # "class" | "marginal"; None: the settings' default
    # Decoded RGB pixels [H, W, 3] uint8 instead of encoded bytes (tensor protocols).
    pixels: np.ndarray | None = None
    timeout_s: float | None = None  # a client's own deadline, within the settings' one


@dataclass
class Prepared:
    item: WorkItem
    modalities: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    coverage: float = 0.9
    sets: str = "class"
    confidence_floor: float = 0.0
    uniform_image: bool = False  # blank or one flat colour: out of distribution whatever the model
    frame: tuple[int, int] | None = None  # (width, height) as sent, when an image was
    pattern: str = "all"  # the missingness pattern the inputs make (decision.pattern_of)


@dataclass
class ServiceContext:
    settings: Settings
    registry: Registry
    queue: InferenceQueue
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    ready: bool = False
    admission: AdmissionControl | None = None
    holders: dict[str, int] = field(default_factory=dict)  # model key -> requests using it

    def admit(self) -> AbstractContextManager[None]:
        """A place for one request within the latency budget (raises Overloaded if none)."""
        return self.admission.admit() if self.admission is not None else nullcontext()

    @contextmanager
    def hold(self, model: ModelVersion) -> Iterator[None]:
        """Mark ``model`` in use by one request from resolution to answer: a version removed
        meanwhile (hot reload) is dropped only once its holders are done."""
        self.holders[model.key] = self.holders.get(model.key, 0) + 1
        try:
            yield
        finally:
            self.holders[model.key] -= 1

    async def released(self, model: ModelVersion, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self.holders.get(model.key, 0) > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether a gateway should send requests here, and why not. Behind a shared queue a
        replica is ready only when a live worker serves every model version it must route to
        (``ENDOFUSE_READY_WORKERS``): otherwise its requests could only wait or fail."""
        if not self.ready:
            return False, {"status": "not ready", "reason": "starting or stopping"}
        if not self.queue.reachable():
            # A gateway should stop sending here: every predict would be a 503 until it is back.
            return False, {"status": "not ready", "reason": "queue unreachable"}
        body: dict[str, Any] = {"models": [mv.key for mv in self.registry.all()]}
        # Refused by a self-check: answered at once with 503 model_unavailable, never waited
        # for, so they do not hold the replica out of the gateway.
        refused = set(self.registry.refused)
        if refused:
            body["refused"] = sorted(refused)
        workers = self.queue.workers()
        if workers is not None:
            body["workers"] = {mv.key: workers.get(mv.key, 0) for mv in self.registry.all()}
            missing = [k for k in self._must_serve() if not workers.get(k) and k not in refused]
            if missing:
                reason = "no live worker for " + ", ".join(missing)
                return False, {"status": "not ready", "reason": reason, **body}
        return True, {"status": "ready", **body}

    def _must_serve(self) -> list[str]:
        rule = self.settings.ready_workers.strip()
        if rule == "none":
            return []
        names = None if rule == "all" else {n.strip() for n in rule.split(",") if n.strip()}
        return [mv.key for mv in self.registry.all() if names is None or mv.name in names]


def prepare(raw: RawRequest, model: ModelVersion, settings: Settings) -> Prepared:
    """Decode the image and validate tabular fields against the model's manifest."""
    manifest = model.manifest
    coverage = settings.default_coverage if raw.coverage is None else raw.coverage
    sets = settings.default_sets if raw.sets is None else raw.sets
    if manifest.decision is not None:  # refuse an unfitted level before any work
        manifest.decision.level_key(coverage)
        manifest.decision.check_sets(sets)
    warnings: list[str] = []
    tabular_report: dict[str, list[str]] | None = None
    tab_values = tab_mask = None
    if manifest.tabular is not None:
        parsed = parse_tabular(raw.tabular, manifest.tabular)
        tab_values, tab_mask = parsed.values, parsed.mask
        tabular_report = {"used": parsed.used, "missing": parsed.missing}
    elif raw.tabular not in (None, {}):
        warnings.append(
            f"model '{manifest.name}' takes no tabular input; the tabular fields were ignored"
        )
    image_present = raw.image is not None or raw.pixels is not None
    frame = None
    if raw.pixels is not None:
        image = from_pixels(raw.pixels, manifest.image, settings.max_image_pixels)
        frame = (int(raw.pixels.shape[1]), int(raw.pixels.shape[0]))
    elif raw.image is not None:
        image, frame = decode_frame(raw.image, manifest.image, settings.max_image_pixels)
    else:
        _require_image_or_tabular(manifest, tabular_report)
        image = np.zeros((manifest.image.height, manifest.image.width, 3), np.uint8)
    item = WorkItem(
        model_key=model.key,
        image=image,
        tabular=tab_values,
        tabular_mask=tab_mask,
        image_present=image_present,
        request_id=raw.request_id,
    )
    modalities = {"image": image_present, "tabular": tabular_report}
    # Only a model with an out-of-distribution flag uses it: skip the pass over the pixels.
    has_ood = manifest.decision is not None and bool(manifest.decision.ood_thresholds)
    uniform = has_ood and image_present and is_uniform(image)
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    used = len(tabular_report["used"]) if tabular_report else 0
    return Prepared(
        item,
        modalities,
        warnings,
        coverage,
        sets,
        settings.confidence_floor,
        uniform,
        frame,
        pattern_of(image_present, used, n_fields),
    )


def _require_image_or_tabular(manifest: Manifest, report: dict[str, list[str]] | None) -> None:
    if not manifest.image_optional:
        raise MissingInput(f"model '{manifest.name}' requires an image")
    if not report or not report["used"]:
        raise MissingInput("send an image, at least one tabular field, or both")


def encode_response(
    model: ModelVersion,
    prepared: Prepared,
    result: ItemResult,
    timings: dict[str, float],
) -> dict[str, Any]:
    manifest = model.manifest
    labels = manifest.labels
    probs = result.probabilities
    pattern = prepared.pattern
    warnings = prepared.warnings
    if manifest.decision is None:
        warnings = [*warnings, "this model version has no fitted prediction sets"]
    chosen = int(manifest.label_rule.pick(np.asarray(probs)))
    return {
        "request_id": prepared.item.request_id,
        "model": {"name": model.name, "version": model.version},
        "label": labels[chosen],
        "label_rule": manifest.label_rule.kind,
        "probabilities": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        **decide(
            manifest.decision,
            labels,
            np.asarray(probs, np.float64),
            pattern,
            prepared.coverage,
            prepared.confidence_floor,
            result.logits,
            prepared.uniform_image,
            chosen,
            prepared.sets,
        ),
        "modalities": prepared.modalities,
        "warnings": warnings,
        "batch_size": result.batch_size,
        "timing_ms": {k: round(v, 3) for k, v in timings.items()},
    }


async def predict(ctx: ServiceContext, raw: RawRequest, model: ModelVersion) -> dict[str, Any]:
    """Run one request through the lifecycle, recording metrics on success."""
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    timeout_s = ctx.settings.request_timeout_s
    if raw.timeout_s is not None:
        timeout_s = min(timeout_s, raw.timeout_s)
    held = ctx.queue.idle_session(model.key)
    if held is not None:  # decode and inference on one thread: nothing waits for the model
        work = functools.partial(prepare, raw, model, ctx.settings)
        prepared, decoded, result = await held.run(work, _item_of, timeout_s)
    else:
        prepared = await loop.run_in_executor(ctx.decode_pool, prepare, raw, model, ctx.settings)
        decoded = time.perf_counter()
        result = await ctx.queue.submit(prepared.item, timeout_s)
    total = time.perf_counter() - start
    timings = {
        "decode": (decoded - start) * 1e3,
        "queue": result.queue_ms,
        "inference": result.inference_ms,
        "total": total * 1e3,
    }
    if result.reply_ms is not None:
        timings["reply"] = result.reply_ms
    observe_success(ctx.metrics, model.name, timings)
    body = encode_response(model, prepared, result, timings)
    observe_answer(ctx.metrics, model, prepared, body)
    return body


def _item_of(prepared: Prepared) -> WorkItem:
    return prepared.item


def observe_answer(
    metrics: Metrics, model: ModelVersion, prepared: Prepared, body: dict[str, Any]
) -> None:
    """Referrals and flags, and what a drift of the inputs shows in first: the mix of labels
    given, how sure the answers are, and how near the out-of-distribution threshold."""
    name, version = model.name, model.version
    if body["refer"]:
        metrics.decisions.labels(name, "referred").inc()
    ood = body.get("ood")
    if ood and ood["flagged"]:
        metrics.decisions.labels(name, "ood_flagged").inc()
    if prepared.frame is not None:
        width, height = prepared.frame
        metrics.frame_aspect.labels(name).observe(width / height)
        metrics.frame_megapixels.labels(name).observe(width * height / 1e6)
    metrics.predicted.labels(name, version, body["label"]).inc()
    metrics.top_probability.labels(name, version).observe(max(body["probabilities"].values()))
    decision = model.manifest.decision
    if ood and decision is not None and decision.ood_thresholds:
        margin = ood["score"] - decision.ood_thresholds[prepared.pattern]
        metrics.ood_margin.labels(name, version, prepared.pattern).observe(margin)


def observe_success(metrics: Metrics, model: str, timings: dict[str, float]) -> None:
    metrics.requests.labels(model, "ok").inc()
    metrics.latency.labels(model).observe(timings["total"] / 1e3)
    for stage in ("decode", "queue", "inference", "reply"):
        if stage in timings:
            metrics.stage.labels(model, stage).observe(timings[stage] / 1e3)
