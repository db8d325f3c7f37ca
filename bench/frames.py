"""Where the benches' real frames are. Apart from ``bench.serving`` (which loads the web
stack) so that benches that need only the engine, on a GPU machine say, can read them."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Where the shared data is: ``ENDOFUSE_DATA_DIR``, else ``../shared/data``."""
    return Path(os.environ.get("ENDOFUSE_DATA_DIR", REPO.parent / "shared" / "data"))


def frames(root: Path) -> list[bytes]:
    paths = sorted((root / "hyperkvasir-lgi-fullres").glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no frames under {root}/hyperkvasir-lgi-fullres (ENDOFUSE_DATA_DIR)")
    return [p.read_bytes() for p in paths]
