"""The model repository on disk: ``<models_dir>/<name>/<version>/{model.onnx,manifest.json}``,
optionally a ``serving.json`` beside them, and a ``DEFAULT`` file naming the default model.
What is read here is checked before anything is opened: a manifest that names another
directory, or a graph that does not match its recorded digest, is refused. Hidden entries
(a leading dot) are not models or versions: a version is built in one (``staged_version``)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import ManifestError
from service.manifest import Manifest, load_manifest

DEFAULT_FILE = "DEFAULT"


def version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def discover(models_dir: Path, only: list[str] | None = None) -> list[tuple[str, str, Path]]:
    """List (name, version, dir) for every model directory, versions in ascending order."""
    if not models_dir.is_dir():
        raise ManifestError(f"models directory {models_dir} does not exist")
    found = []
    for name_dir in sorted(p for p in models_dir.iterdir() if p.is_dir() and _shown(p)):
        if only and name_dir.name not in only:
            continue
        versions = [p for p in name_dir.iterdir() if _shown(p) and (p / "model.onnx").is_file()]
        for vdir in sorted(versions, key=lambda p: version_order(p.name)):
            found.append((name_dir.name, vdir.name, vdir))
    if only:
        missing = sorted(set(only) - {name for name, _, _ in found})
        if missing:
            raise ManifestError(f"requested models not found under {models_dir}: {missing}")
    return found


def _shown(path: Path) -> bool:
    return not path.name.startswith(".")


def refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise FileExistsError(f"{dst} exists already: name another version")


PARTIAL = ".partial-"
STARTING = ".starting-"
# A build directory is unlocked only between its mkdir and its flock; one older than this was
# left by a builder that died in that moment.
STALE_START_S = 60.0


@contextmanager
def _dir_lock(path: Path) -> Iterator[bool]:
    """Try to take the directory's flock without waiting; yields whether it was taken. The
    kernel drops an flock when its holder dies, however it dies, so a half-built version
    whose lock can be taken was left by a builder that is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _remove_if_abandoned(path: Path) -> bool | None:
    """Remove ``path`` if no builder holds its lock: True if removed, False if a build holds
    it, None if it was gone already (finished or removed meanwhile)."""
    try:
        with _dir_lock(path) as abandoned:
            if abandoned:
                shutil.rmtree(path, ignore_errors=True)
            return abandoned
    except FileNotFoundError:
        return None


def remove_abandoned(name_dir: Path) -> tuple[list[str], list[str]]:
    """Remove the half-built versions under ``name_dir`` whose builder is gone (killed, out
    of memory, the machine restarted). Returns (removed, still being built)."""
    removed, building = [], []
    for tmp in sorted(name_dir.glob(f".*{PARTIAL}*")):
        outcome = _remove_if_abandoned(tmp)
        if outcome is not None:
            (removed if outcome else building).append(tmp.name)
    for start in sorted(name_dir.glob(f".*{STARTING}*")):
        try:
            age = time.time() - start.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= STALE_START_S and _remove_if_abandoned(start):
            removed.append(start.name)
    return removed, building


@contextmanager
def staged_version(dst: Path) -> Iterator[Path]:
    """Build the version directory ``dst`` out of sight: in a hidden sibling, which
    ``discover`` skips, renamed to ``dst`` once everything in it is written, and removed if
    the build fails. A served version is opened once and never re-read, so a service
    watching the repository must not find one half-made: a graph and a manifest without
    its decision block yet pass every check a copy in progress fails. The sibling is locked
    while the build runs: what a killed build left is removed by the next one, and a second
    build of the same version is refused."""
    refuse_existing(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    # Locked under a name no sweep takes before it is a minute old, then renamed: a build
    # directory is never seen unlocked.
    start = dst.parent / f".{dst.name}{STARTING}{token}"
    start.mkdir()
    with _dir_lock(start) as held:
        if not held:
            raise RuntimeError(f"{start}: a directory just made is locked by another process")
        tmp = dst.parent / f".{dst.name}{PARTIAL}{token}"
        start.rename(tmp)
        try:
            ours = f".{dst.name}{PARTIAL}"
            building = remove_abandoned(dst.parent)[1]
            if any(n.startswith(ours) and n != tmp.name for n in building):
                raise FileExistsError(
                    f"{dst} is being built by another process: wait for it, or name another version"
                )
            yield tmp
            refuse_existing(dst)  # copied in by hand meanwhile: keep it
            tmp.rename(dst)  # one step within a filesystem: absent, then complete
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


SERVING_FILE = "serving.json"
_SERVING_KEYS = ("instances", "intra_op_threads", "max_batch_size")


def serving_config(vdir: Path) -> dict[str, int]:
    """A version's own engine layout, set by whoever deploys it (``serving.json`` beside the
    manifest, as Triton's model config): ``instances``, ``intra_op_threads``,
    ``max_batch_size`` (a fixed limit: no profile). Each overrides the settings'."""
    path = vdir / SERVING_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or set(raw) - set(_SERVING_KEYS):
        raise ManifestError(f"{path}: an object with keys among {', '.join(_SERVING_KEYS)}")
    for key, value in raw.items():
        low = 0 if key == "intra_op_threads" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ManifestError(f"{path}: '{key}' must be an integer >= {low}")
    return raw


def checked_manifest(vdir: Path, name: str, version: str) -> Manifest:
    manifest = load_manifest(vdir / "manifest.json")
    if manifest.name != name or manifest.version != version:
        raise ManifestError(
            f"{vdir}: manifest fields 'name'/'version' say {manifest.name}/{manifest.version} "
            f"but the directory is {name}/{version}"
        )
    recorded = manifest.raw.get("files", {}).get("model.onnx", {}).get("sha256")
    if recorded and recorded != file_digest(vdir / "model.onnx"):
        # A graph still being copied in, or one that does not belong to this manifest.
        raise ManifestError(f"{vdir}: model.onnx does not match the sha256 in manifest.json")
    return manifest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_record(vdir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` block for the graph in ``vdir``: what ``checked_manifest``
    compares the graph with before it is opened."""
    graph = vdir / "model.onnx"
    return {"model.onnx": {"sha256": file_digest(graph), "bytes": graph.stat().st_size}}
