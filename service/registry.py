"""The served versions: each opened from the model repository (``service/repository.py``),
checked, profiled and warmed, and the routing table requests are answered from."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service import batch_profile, selfcheck
from service.config import Settings
from service.engine import EnginePool, open_pool, resolve_providers
from service.errors import ManifestError, ModelNotFound, ModelUnavailable
from service.manifest import Manifest
from service.repository import (
    DEFAULT_FILE,
    checked_manifest,
    discover,
    serving_config,
    version_order,
)
from service.selfcheck import SelfCheck, SelfCheckRefused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    manifest: Manifest
    # None on an API replica that forwards to remote workers: it validates against the
    # manifest but never runs the graph itself.
    engine: EnginePool | None

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)


@dataclass(frozen=True)
class Refused:
    """A version on disk that is not served: its self-check was refused, by this process
    (``check`` holds the figures) or, behind a shared queue, by every live worker (None)."""

    name: str
    version: str
    reason: str
    check: SelfCheck | None

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)


def version_key(name: str, version: str) -> str:
    """How a version is named in routing, metrics, Redis streams and readiness."""
    return f"{name}:{version}"


@dataclass(frozen=True)
class LoadOptions:
    """How a version is opened: the same for start-up and for versions added later."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    warmup_runs: int = 2
    spinning: bool = True
    load_engines: bool = True
    # The batch size bound; with ``profile_batches`` the limit is measured up to it.
    max_batch_size: int = 16
    instances: int = 1  # sessions per version; 0: by device (engine.instance_layout)
    profile_batches: bool = False
    batch_latency_budget_ms: float = 100.0
    solo_session: bool = False
    self_check: str = "warn"  # "warn" | "refuse" | "off" (service/selfcheck.py)
    self_check_tolerance: float = 0.01

    def open(self, name: str, version: str, vdir: Path) -> ModelVersion:
        """Check the manifest against its directory (and the graph's digest, where the
        manifest records one), open the graph, profile its batch sizes and warm it up."""
        start = time.perf_counter()
        manifest = checked_manifest(vdir, name, version)
        engine = None
        if self.load_engines:
            own = serving_config(vdir)
            engine = open_pool(
                vdir / "model.onnx",
                manifest,
                list(self.providers),
                own.get("instances", self.instances),
                own.get("intra_op_threads", self.intra_op_threads),
                self.inter_op_threads,
                self.spinning,
                self.solo_session,
            )
            engine.max_batch_size = own.get("max_batch_size", self.max_batch_size)
            if self.profile_batches and "max_batch_size" not in own:
                engine.profile = batch_profile.measure(
                    engine, self.max_batch_size, self.batch_latency_budget_ms
                )
                engine.max_batch_size = engine.profile.chosen
            if self.self_check != "off":
                engine.self_check = self._checked(engine, manifest, vdir)
            # Warm at the limit in force: the memory arena keeps the largest batch it saw.
            engine.warm_up(self.warmup_runs, engine.max_batch_size)
        log.info(
            "model loaded",
            extra={
                "model": name,
                "version": version,
                "providers": engine.providers if engine else "remote",
                "instances": engine.size if engine else 0,
                "max_batch_size": engine.max_batch_size if engine else None,
                "load_ms": round((time.perf_counter() - start) * 1e3, 1),
            },
        )
        return ModelVersion(name, version, vdir, manifest, engine)

    def _checked(self, engine: EnginePool, manifest: Manifest, vdir: Path) -> SelfCheck:
        result = selfcheck.check(engine.sessions(), manifest, self.self_check_tolerance)
        if result.status in ("pass", "no reference"):
            return result
        if result.status == "inputs differ":
            # Not a verdict on the graph (this host's numpy draws other probes): never refused.
            log.warning(
                f"{vdir}: the manifest's probe inputs cannot be regenerated here; answers not "
                "compared with the recorded ones",
                extra={"model": manifest.name, "version": manifest.version},
            )
            return result
        what = (
            f"{vdir}: this host answers the manifest's probe inputs differently from the host "
            f"its decision thresholds were fitted on ({result.status}: largest probability "
            f"difference {result.max_probability_diff}, out-of-distribution distance "
            f"{result.max_ood_relative_diff} relative; tolerance {result.tolerance})"
        )
        if self.self_check == "refuse":
            raise SelfCheckRefused(what + "; not served (ENDOFUSE_SELF_CHECK=refuse)", result)
        log.warning(what, extra={"model": manifest.name, "version": manifest.version})
        return result


class Registry:
    """The loaded versions. Versions may come and go while serving (``service/reload.py``):
    every change replaces the whole mapping, so a reader never sees one half-made."""

    def __init__(
        self,
        versions: list[ModelVersion],
        default_model: str | None,
        precision: str = "fp32",
        options: LoadOptions | None = None,
    ) -> None:
        self.precision = precision
        self.options = options or LoadOptions()
        # Left out by the self-check (at start-up, when added while serving, or by the
        # workers behind a shared queue): named in /models, answered 503 when asked for by
        # version, never routed to otherwise.
        self.refused: dict[str, Refused] = {}
        # Called after a refusal is added or lifted (metrics, the OpenAPI document).
        self.listeners: list[Callable[[], None]] = []
        self._by_name: dict[str, dict[str, ModelVersion]] = {}
        for mv in versions:
            self._by_name.setdefault(mv.name, {})[mv.version] = mv
        if default_model is not None and default_model not in self._by_name:
            raise ManifestError(f"default model '{default_model}' is not in the model repository")
        self.default_model = default_model or (min(self._by_name) if self._by_name else None)

    @classmethod
    def load(
        cls,
        models_dir: Path,
        *,
        providers: list[str],
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        warmup_runs: int = 2,
        only: list[str] | None = None,
        default_model: str | None = None,
        spinning: bool = True,
        load_engines: bool = True,
        max_batch_size: int = 16,
        precision: str = "fp32",
        instances: int = 1,
        profile_batches: bool = False,
        batch_latency_budget_ms: float = 100.0,
        solo_session: bool = False,
        self_check: str = "warn",
        self_check_tolerance: float = 0.01,
    ) -> Registry:
        options = LoadOptions(
            tuple(providers),
            intra_op_threads,
            inter_op_threads,
            warmup_runs,
            spinning,
            load_engines,
            max_batch_size,
            instances,
            profile_batches,
            batch_latency_budget_ms,
            solo_session,
            self_check,
            self_check_tolerance,
        )
        loaded, refused = [], []
        for name, version, vdir in discover(models_dir, only):
            try:
                loaded.append(options.open(name, version, vdir))
            except SelfCheckRefused as exc:
                # One version answering otherwise on this host does not stop the others.
                refused.append(Refused(name, version, str(exc), exc.result))
                log.error(
                    "model version not served",
                    extra={"model": name, "version": version, "error": str(exc)[:500]},
                )
        served = {mv.name for mv in loaded}
        if not loaded or (default_model in {r.name for r in refused} - served):
            what = f"default model '{default_model}'" if loaded else f"models under {models_dir}"
            why = "".join(f"; {r.reason}" for r in refused)
            raise ManifestError(f"no {what} to serve{why}")
        if default_model is None and (models_dir / DEFAULT_FILE).is_file():
            named = (models_dir / DEFAULT_FILE).read_text().strip() or None
            # The repository's choice, unless ``only`` left that model out: a service asked
            # for ham10000 alone answers with it rather than refusing to start.
            if named in served:
                default_model = named
        registry = cls(loaded, default_model, precision, options)
        for record in refused:
            registry.refuse(record)
        return registry

    def refuse(self, record: Refused) -> None:
        self.refused = {**self.refused, record.key: record}
        self._changed()

    def unrefuse(self, name: str, version: str) -> None:
        self.refused = {k: r for k, r in self.refused.items() if k != version_key(name, version)}
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def add(self, mv: ModelVersion) -> None:
        by_name = {name: dict(versions) for name, versions in self._by_name.items()}
        by_name.setdefault(mv.name, {})[mv.version] = mv
        self._by_name = by_name
        if self.default_model is None:
            self.default_model = mv.name

    def remove(self, name: str, version: str) -> ModelVersion:
        """Stop routing to one version (the last version of the default model stays)."""
        mv = self._by_name[name][version]
        by_name = {n: dict(versions) for n, versions in self._by_name.items()}
        del by_name[name][version]
        if not by_name[name]:
            if name == self.default_model:
                raise ManifestError(f"'{name}' is the default model: its last version stays")
            del by_name[name]
        self._by_name = by_name
        return mv

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[ModelVersion]:
        if name not in self._by_name:
            self._raise_if_refused(name, None)
            raise ModelNotFound(f"unknown model; available: {self.names()}")
        return sorted(self._by_name[name].values(), key=lambda m: version_order(m.version))

    def all(self) -> list[ModelVersion]:
        return [mv for name in self.names() for mv in self.versions(name)]

    def get(self, name: str | None = None, version: str | None = None) -> ModelVersion:
        """One exact version, or without ``version`` the newest of the preferred precision
        (the newest of any precision when there is none of it)."""
        name = name or self.default_model
        if name is None:
            raise ModelNotFound("no model is loaded")
        versions = self.versions(name)
        if version is None:
            newest = self._newest(versions)
            if newest is None:
                self._raise_if_refused(name, None)
                raise ModelNotFound(f"model '{name}' has no version to serve")
            return newest
        self._raise_if_refused(name, version)
        for mv in versions:
            if mv.version == version:
                return mv
        raise ModelNotFound(
            f"model '{name}' has no such version; available: {[m.version for m in versions]}"
        )

    def newest(self, name: str) -> ModelVersion | None:
        """The version that requests naming none get: the newest served of the preferred
        precision (of any precision when there is none of it); None when every version of a
        listed model is refused."""
        return self._newest(self.versions(name))

    def _newest(self, versions: list[ModelVersion]) -> ModelVersion | None:
        served = [m for m in versions if m.key not in self.refused]
        preferred = [m for m in served if m.manifest.precision == self.precision]
        return (preferred or served or [None])[-1]

    def _raise_if_refused(self, name: str, version: str | None) -> None:
        for record in self.refused.values():
            if record.name == name and version in (None, record.version):
                raise ModelUnavailable(
                    f"model '{name}' version '{record.version}' is not served: where it "
                    "runs, its answers differ from those its decision thresholds were fitted "
                    f"on (self-check refused; GET /models/{name} says more)"
                )


def load_from_settings(settings: Settings, *, load_engines: bool = True) -> Registry:
    """The model repository as the settings describe it (providers, threads, warm-up)."""
    return Registry.load(
        settings.models_dir,
        providers=resolve_providers(settings.providers),
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        warmup_runs=settings.warmup_runs,
        max_batch_size=settings.max_batch_size,
        precision=settings.precision,
        only=settings.models or None,
        default_model=settings.default_model,
        spinning=settings.ort_spinning,
        load_engines=load_engines,
        instances=settings.engine_instances,
        profile_batches=settings.profile_batches,
        batch_latency_budget_ms=settings.batch_latency_budget_ms,
        solo_session=settings.solo_session,
        self_check=settings.self_check,
        self_check_tolerance=settings.self_check_tolerance,
    )
