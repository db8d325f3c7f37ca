"""Model repository: ``<models_dir>/<name>/<version>/{model.onnx,manifest.json}``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from service.config import Settings
from service.engine import Engine, resolve_providers
from service.errors import ManifestError, ModelNotFound
from service.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)
DEFAULT_FILE = "DEFAULT"


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    manifest: Manifest
    # None on an API replica that forwards to remote workers: it validates against the
    # manifest but never runs the graph itself.
    engine: Engine | None

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


def _version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def discover(models_dir: Path, only: list[str] | None = None) -> list[tuple[str, str, Path]]:
    """List (name, version, dir) for every model directory, versions in ascending order."""
    if not models_dir.is_dir():
        raise ManifestError(f"models directory {models_dir} does not exist")
    found = []
    for name_dir in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if only and name_dir.name not in only:
            continue
        versions = [p for p in name_dir.iterdir() if (p / "model.onnx").is_file()]
        for vdir in sorted(versions, key=lambda p: _version_order(p.name)):
            found.append((name_dir.name, vdir.name, vdir))
    if only:
        missing = sorted(set(only) - {name for name, _, _ in found})
        if missing:
            raise ManifestError(f"requested models not found under {models_dir}: {missing}")
    return found


class Registry:
    def __init__(
        self, versions: list[ModelVersion], default_model: str | None, precision: str = "fp32"
    ) -> None:
        self.precision = precision
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
    ) -> Registry:
        loaded = []
        for name, version, vdir in discover(models_dir, only):
            start = time.perf_counter()
            manifest = _checked_manifest(vdir, name, version)
            engine = None
            if load_engines:
                engine = Engine(
                    vdir / "model.onnx",
                    manifest,
                    providers,
                    intra_op_threads,
                    inter_op_threads,
                    spinning,
                )
                engine.warm_up(warmup_runs, max_batch_size)
            loaded.append(ModelVersion(name, version, vdir, manifest, engine))
            log.info(
                "model loaded",
                extra={
                    "model": name,
                    "version": version,
                    "providers": engine.providers if engine else "remote",
                    "load_ms": round((time.perf_counter() - start) * 1e3, 1),
                },
            )
        if not loaded:
            raise ManifestError(f"no models found under {models_dir}")
        if default_model is None and (models_dir / DEFAULT_FILE).is_file():
            default_model = (models_dir / DEFAULT_FILE).read_text().strip() or None
        return cls(loaded, default_model, precision)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[ModelVersion]:
        if name not in self._by_name:
            raise ModelNotFound(f"unknown model; available: {self.names()}")
        return sorted(self._by_name[name].values(), key=lambda m: _version_order(m.version))

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
            preferred = [m for m in versions if m.manifest.precision == self.precision]
            return (preferred or versions)[-1]
        for mv in versions:
            if mv.version == version:
                return mv
        raise ModelNotFound(
            f"model '{name}' has no such version; available: {[m.version for m in versions]}"
        )


def _checked_manifest(vdir: Path, name: str, version: str) -> Manifest:
    manifest = load_manifest(vdir / "manifest.json")
    if manifest.name != name or manifest.version != version:
        raise ManifestError(
            f"{vdir}: manifest fields 'name'/'version' say {manifest.name}/{manifest.version} "
            f"but the directory is {name}/{version}"
        )
    return manifest


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
    )
