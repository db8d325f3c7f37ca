"""Where the real data is, and a skip with the reason where it is not (a user's bare clone).
Apart from conftest so that tests which need no service (training on a GPU machine) can
import it without the service's dependencies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("ENDOFUSE_DATA_DIR", REPO.parent / "shared" / "data"))


def require_data(sub: str) -> Path:
    path = data_dir() / sub
    if not path.is_dir():
        pytest.skip(
            f"real data not found at {path}: set ENDOFUSE_DATA_DIR to the shared data folder"
        )
    return path
