"""Hot reload of the model repository, in API replicas and workers alike.

Every ``ENDOFUSE_RELOAD_S`` seconds (0: off) the repository is listed again. A version
directory that appeared is checked (manifest against directory, graph against the digest the
manifest records), opened and warmed off the event loop, and only then added to the registry,
where it is the newest at once. A directory still being copied fails the check and is tried
again when its files change. A version whose directory disappeared stops being routed to
first, then drains: what was accepted for it is answered before it is dropped.

An API replica behind a shared queue publishes a new version only once a live worker serves
it, so there is no moment when the API routes to a version no worker runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import Counter

from service.errors import ManifestError
from service.registry import ModelVersion, Refused, Registry, version_key
from service.repository import discover
from service.selfcheck import SelfCheckRefused

log = logging.getLogger(__name__)
Key = tuple[str, str]
Hook = Callable[[ModelVersion], Awaitable[None]]


def _signature(vdir: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes while a directory is being written: names, sizes, modification times."""
    out = []
    for path in sorted(vdir.iterdir()):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ModelWatcher:
    def __init__(
        self,
        registry: Registry,
        models_dir: Path,
        events: Counter,
        on_added: Hook,
        on_removed: Hook,
        *,
        only: list[str] | None = None,
        publishable: Callable[[ModelVersion], bool] = lambda _: True,
        on_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._registry = registry
        self._dir = models_dir
        self._events = events
        self._on_added = on_added
        self._on_removed = on_removed
        self._only = only
        self._publishable = publishable
        self._on_changed = on_changed  # after the registry changed (either way)
        self._failed: dict[Key, tuple] = {}  # -> the directory's signature when it failed
        self._staged: dict[Key, ModelVersion] = {}  # opened, waiting to be publishable
        self._kept: set[Key] = set()  # removal refused (the default model's last version)

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan()
            except Exception:  # a bad directory must never stop the watching
                log.exception("model repository scan failed")

    async def scan(self) -> None:
        """One pass: open what appeared, publish what is ready, drain what disappeared."""
        try:
            found = {(name, version): vdir for name, version, vdir in discover(self._dir)}
        except ManifestError as exc:
            log.warning("model repository unreadable; nothing changed", extra={"error": str(exc)})
            return
        if self._only:
            found = {k: v for k, v in found.items() if k[0] in self._only}
        current = {(mv.name, mv.version) for mv in self._registry.all()}
        for key in found.keys() - current - self._staged.keys():
            await self._open(key, found[key])
        for key in list(self._staged):
            if key not in found:
                del self._staged[key]
            elif self._publishable(self._staged[key]):
                await self._publish(self._staged.pop(key))
        for refused in list(self._registry.refused.values()):
            # This process's own refusals; those of the workers are the queue's to lift.
            if refused.check is not None and (refused.name, refused.version) not in found:
                self._registry.unrefuse(refused.name, refused.version)
        for key in current - found.keys() - self._kept:
            await self._retire(key)
        self._kept &= current - found.keys()  # back on disk: removable again later

    async def _open(self, key: Key, vdir: Path) -> None:
        signature = _signature(vdir)
        if self._failed.get(key) == signature:
            return  # failed as it is now; tried again once it changes
        try:
            mv = await asyncio.to_thread(self._registry.options.open, key[0], key[1], vdir)
        except Exception as exc:  # whatever the directory holds, serving goes on
            self._failed[key] = signature
            self._events.labels(key[0], key[1], "failed").inc()
            if isinstance(exc, SelfCheckRefused):
                self._registry.refuse(Refused(key[0], key[1], str(exc), exc.result))
            log.warning(
                "model version not loaded",
                extra={"model": key[0], "version": key[1], "error": str(exc)[:300]},
            )
            return
        self._failed.pop(key, None)
        refused = self._registry.refused.get(version_key(*key))
        if refused is not None and refused.check is not None:  # this process's own refusal
            self._registry.unrefuse(*key)
        self._staged[key] = mv

    async def _publish(self, mv: ModelVersion) -> None:
        await self._on_added(mv)  # the queue serves it before any request can name it
        self._registry.add(mv)
        self._on_changed()
        self._events.labels(mv.name, mv.version, "loaded").inc()
        log.info("model version added", extra={"model": mv.name, "version": mv.version})

    async def _retire(self, key: Key) -> None:
        try:
            mv = self._registry.remove(*key)
        except ManifestError as exc:
            self._kept.add(key)  # said once, not at every scan
            log.warning("model version kept", extra={"model": key[0], "error": str(exc)})
            return
        self._on_changed()
        await self._on_removed(mv)  # routed nowhere now; answer what it holds
        self._events.labels(key[0], key[1], "removed").inc()
        log.info("model version removed", extra={"model": key[0], "version": key[1]})
