"""Every case of the bad-input corpus (tests/bad_inputs.py) against the bundled models: the
documented status and error code, never a 5xx, never a 200 for data that could not be
decoded, never the submitted value echoed; and docs/bad-inputs.md lists exactly this corpus."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings
from service.registry import Registry
from tests.bad_inputs import Case, corpus, markdown
from tests.redis_harness import REPO

CASES = corpus()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(models_dir=REPO / "models", providers="cpu", warmup_runs=0)
    registry = Registry.load(REPO / "models", providers=["CPUExecutionProvider"], warmup_runs=0)
    with TestClient(create_app(settings, registry), raise_server_exceptions=False) as c:
        yield c


def test_the_corpus_is_large_and_covers_both_models() -> None:
    assert len(CASES) >= 150
    assert {model for model, _ in CASES} == {"hyperkvasir-lgi", "ham10000"}


@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}:{c.name}" for m, c in CASES])
def test_bad_input(client: TestClient, model: str, case: Case) -> None:
    method, path, kwargs = case.request(f"/models/{model}/predict")
    r = client.request(method, path, **kwargs)
    assert r.status_code < 500, r.text
    if case.undecodable:
        assert r.status_code != 200, "a diagnosis for data that could not be decoded"
    assert r.status_code == case.status, r.text
    if case.code is not None:
        body = r.json()
        assert body["error"]["code"] == case.code, r.text
        assert "<script>" not in r.text and "forty" not in r.text
        if r.status_code == 405:
            assert r.headers["allow"]
    else:
        assert r.status_code != 200 or "probabilities" in r.json()


def test_docs_table_matches_the_corpus() -> None:
    doc = (REPO / "docs" / "bad-inputs.md").read_text()
    assert markdown() in doc, "regenerate: python -m tests.bad_inputs"
