"""``make bench`` compares fp32 with int8 on the versions the service serves by default for
each precision, read from the bundled models, so the benchmark cannot drift from them."""

from __future__ import annotations

import pytest

from bench.precision import newest
from service.manifest import load_manifest
from tests.conftest import REPO


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["hyperkvasir-lgi", "ham10000"])
def test_default_versions_are_the_newest_of_their_precision(name: str, precision: str) -> None:
    chosen = newest(name, precision)
    same = [
        int(d.name)
        for d in (REPO / "models" / name).iterdir()
        if (d / "manifest.json").is_file()
        and load_manifest(d / "manifest.json").precision == precision
    ]
    assert load_manifest(REPO / "models" / name / chosen / "manifest.json").precision == precision
    assert int(chosen) == max(same)


def test_the_bundled_defaults() -> None:
    assert (newest("hyperkvasir-lgi", "fp32"), newest("hyperkvasir-lgi", "int8")) == ("2", "5")
    assert (newest("ham10000", "fp32"), newest("ham10000", "int8")) == ("9", "10")


def test_a_model_without_that_precision_is_named() -> None:
    with pytest.raises(SystemExit, match="hyperkvasir-lgi has no fp16 version"):
        newest("hyperkvasir-lgi", "fp16")
