"""``make bench`` compares fp32 with int8 on the versions the service serves by default for
each precision, read from the bundled models, so the benchmark cannot drift from them."""

from __future__ import annotations

import pytest

from bench.precision import newest
from service.registry import Registry
from tests.conftest import REPO


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["hyperkvasir-lgi", "ham10000"])
def test_default_versions_are_the_ones_the_service_serves(name: str, precision: str) -> None:
    registry = Registry.load(
        REPO / "models",
        providers=["CPUExecutionProvider"],
        only=[name],
        precision=precision,
        load_engines=False,
    )
    served = registry.newest(name)
    assert served is not None and served.manifest.precision == precision
    assert newest(name, precision) == served.version


def test_a_model_without_that_precision_is_named() -> None:
    with pytest.raises(SystemExit, match="hyperkvasir-lgi has no fp16 version"):
        newest("hyperkvasir-lgi", "fp16")
