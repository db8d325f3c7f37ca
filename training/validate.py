"""Local validation: a model version scored on a site's own labelled cases before clinical use.

Every model card ends with "validate on local cases": this is the command that does it. The
site lists its cases in a CSV (``path`` relative to the CSV or absolute, ``label`` one of the
version's labels, and any of the version's tabular fields, blank where not recorded); each
case is answered as the service answers it, in process (the service's own decode, graph and
decision code) or, with ``--service``, through a running endofuse service. The report puts
the site's figures beside the version's own test figures, and says where they differ by
more than sampling explains: the prediction sets' coverage, calibration, the share flagged
out of distribution, and frame shapes that the training frames seldom had; a case list
(``validation-cases.csv``) puts the cases to look at first on top.

    endofuse validate models/hyperkvasir-lgi/2 --cases site/labels.csv [--service URL]
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.config import Settings
from service.decision import decide, is_uniform, pattern_of
from service.errors import ServiceError
from service.manifest import load_manifest
from service.preprocess import decode_image
from service.sessions import open_session
from training.data import DatasetError, DatasetSpec, Table, load_split
from training.evaluate import run_session, tabular_fields


@dataclass
class Answers:
    """The cases the service would answer, as it answers them; the rest by error code."""

    kept: np.ndarray  # row indices of the cases answered
    probs: np.ndarray  # [N, K]
    named: np.ndarray  # [N]: the class each response names (its label rule)
    sets: np.ndarray  # bool [N, K]: the prediction set at the chosen coverage
    flagged: np.ndarray  # bool [N]: out of distribution (False where not fitted)
    patterns: list[str]  # per case: the missingness pattern its inputs make
    refused: dict[int, str] = field(default_factory=dict)  # row index -> the error code

    @property
    def rejected(self) -> dict[str, int]:
        """Refused cases by error code."""
        return dict(Counter(self.refused.values()))


def read_cases(
    csv_path: Path, manifest: Any, label_column: str = "label", group_column: str | None = None
) -> Table:
    """The site's cases, checked: every label one of the version's, every image present.
    Cases with equal ``group_column`` values (default: the training data's group column, if
    the CSV has it) are one lesion: the ECE a calibrated model would measure is drawn per
    lesion."""
    # As spreadsheets export it: a byte-order mark, and ";" or tabs where "," is the decimal mark.
    text = csv_path.read_text(encoding="utf-8-sig")
    try:
        dialect: Any = csv.Sniffer().sniff(text.partition("\n")[0], delimiters=",;\t")
    except csv.Error:  # one column: nothing to sniff
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    rows = [dict(r, split="test") for r in reader]
    columns = set(reader.fieldnames or [])
    for needed in ("path", label_column):
        if needed not in columns:
            raise DatasetError(
                f"{csv_path}: column '{needed}' is missing (columns: {sorted(columns)})"
            )
    if not rows:
        raise DatasetError(f"{csv_path}: no cases")
    unknown = sorted({r[label_column] for r in rows} - set(manifest.labels))
    if unknown:
        raise DatasetError(
            f"{csv_path}: labels {unknown} are not among {manifest.name}/{manifest.version}'s "
            f"labels {list(manifest.labels)}"
        )
    fields = manifest.tabular.fields if manifest.tabular else ()
    for r in rows:  # a field the site does not record is missing in every case
        for f in fields:
            r.setdefault(f.name, "")
    if group_column is None:
        dataset = manifest.raw.get("training", {}).get("config", {}).get("dataset", {})
        group_column = dataset.get("group_column") or ""
    elif group_column not in columns:
        raise DatasetError(f"{csv_path}: group column '{group_column}' is missing")
    spec = DatasetSpec(
        name="site",
        group_column=group_column if group_column in columns else "",
        root=str(csv_path.resolve().parent),
        csv=csv_path.name,
        label_column=label_column,
        labels=tuple(manifest.labels),
        missing_tokens=tuple(manifest.tabular.missing_values) if manifest.tabular else ("",),
    )
    table = load_split(spec, "test", manifest.tabular, rows)
    absent = [str(p) for p in table.paths if not p.is_file()]
    if absent:
        raise DatasetError(f"{len(absent)} image files not found, e.g. {absent[:3]}")
    return table


def _read_answer(answer: dict[str, Any], labels: Any) -> tuple[list[bool], bool]:
    """A response's set membership per label and its out-of-distribution flag (each absent
    where the version has none fitted)."""
    members = answer.get("prediction_set", ())
    return [label in members for label in labels], bool(answer.get("ood", {}).get("flagged"))


RETRIES = 6  # tries of a case the service answers 503 or 429, each after its Retry-After
MAX_WAIT_S = 10.0
CHUNK = 256  # cases decoded and run at a time: a whole archive never sits in memory at once


def answer_locally(
    model_dir: Path, manifest: Any, table: Table, coverage: float, sets: str
) -> Answers:
    """The service's decode, graph and decision code, in this process."""
    max_pixels = Settings().max_image_pixels
    session = open_session(model_dir / "model.onnx")
    n_fields = table.mask.shape[1]
    kept: list[int] = []
    probs, named, members, flagged, patterns = [], [], [], [], []
    refused: dict[int, str] = {}
    bar = tqdm(total=len(table), desc="cases", unit="case", leave=False)
    for start in range(0, len(table), CHUNK):
        images, index = [], []
        for i in range(start, min(start + CHUNK, len(table))):
            try:
                images.append(decode_image(table.paths[i].read_bytes(), manifest.image, max_pixels))
                index.append(i)
            except ServiceError as exc:  # the service answers these with a 4xx
                refused[i] = exc.code
        bar.update(min(CHUNK, len(table) - start))
        if not index:
            continue
        cases = table.rows(np.asarray(index))
        ones = np.ones((len(index), 1), np.float32)
        p, rows = run_session(
            session, np.stack(images), cases.tabular, cases.mask, ones, with_distance=True
        )
        picked = manifest.label_rule.pick(p)
        for j, k in enumerate(picked):
            pattern = pattern_of(True, int(cases.mask[j].sum()), n_fields)
            answer = decide(
                manifest.decision, manifest.labels, p[j].astype(np.float64), pattern, coverage,
                0.0, rows[j], is_uniform(images[j]), int(k), sets,
            )  # fmt: skip
            member, flag = _read_answer(answer, manifest.labels)
            members.append(member)
            flagged.append(flag)
            patterns.append(pattern)
        kept += index
        probs.append(p)
        named.append(picked)
    bar.close()
    if not kept:
        raise DatasetError(f"no case could be answered: {dict(Counter(refused.values()))}")
    return Answers(
        np.asarray(kept, np.int64),
        np.concatenate(probs),
        np.concatenate(named),
        np.array(members, bool),
        np.array(flagged, bool),
        patterns,
        refused,
    )


def answer_by_service(
    url: str,
    manifest: Any,
    table: Table,
    coverage: float,
    sets: str,
    api_key: str | None = None,
    concurrency: int = 4,
) -> Answers:
    """Each case as a ``POST /models/{name}/versions/{v}/predict`` to a running service."""
    import httpx

    endpoint = f"{url.rstrip('/')}/models/{manifest.name}/versions/{manifest.version}/predict"
    params = {"coverage": coverage, "sets": sets} if manifest.decision else {}
    labels = list(manifest.labels)

    def one(client: httpx.Client, row: int) -> dict[str, Any]:
        values = tabular_fields(manifest, table, row)
        for _ in range(RETRIES):
            r = client.post(
                endpoint,
                params=params,
                files={"image": ("frame", table.paths[row].read_bytes())},
                data={"tabular": json.dumps(values)} if values else None,
            )
            if r.status_code not in (429, 503):
                break
            # Busy (or past the key's rate): wait as the service asks, then send it again.
            wait = r.headers.get("Retry-After", "1")
            time.sleep(min(float(wait) if wait.isdigit() else 1.0, MAX_WAIT_S))
        if 400 <= r.status_code < 500 and r.status_code not in (401, 403, 404, 429):
            return {"rejected": r.json().get("error", {}).get("code", str(r.status_code))}
        r.raise_for_status()  # a service that fails is not a finding about the site's cases
        return r.json()

    headers = {"X-API-Key": api_key} if api_key else {}
    with (
        httpx.Client(timeout=120, headers=headers) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        bar = tqdm(total=len(table), desc="service", unit="case", leave=False)
        answers = []
        for answer in pool.map(lambda row: one(client, row), range(len(table))):
            answers.append(answer)
            bar.update()
        bar.close()
    refused = {i: a["rejected"] for i, a in enumerate(answers) if "rejected" in a}
    kept = np.array([i for i, a in enumerate(answers) if "rejected" not in a], np.int64)
    done = [answers[i] for i in kept]
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0

    def used(a: dict[str, Any]) -> int:
        return len((a["modalities"].get("tabular") or {}).get("used", []))

    read = [_read_answer(a, labels) for a in done]
    return Answers(
        kept,
        np.array([[a["probabilities"][k] for k in labels] for a in done], np.float64),
        np.array([labels.index(a["label"]) for a in done], np.int64),
        np.array([member for member, _ in read], bool).reshape(len(done), len(labels)),
        np.array([flag for _, flag in read], bool),
        [pattern_of(True, used(a), n_fields) for a in done],
        refused,
    )


def main(
    model_dir: Path,
    cases_csv: Path,
    out: Path | None = None,
    service_url: str | None = None,
    coverage: float | None = None,
    sets: str = "class",
    label_column: str = "label",
    group_column: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
) -> dict[str, Any]:
    from training.validate_report import analyse, write_report

    manifest = load_manifest(model_dir / "manifest.json")
    coverage = coverage if coverage is not None else Settings().default_coverage
    if manifest.decision is not None:  # a fitted level and kind of sets, or a clear error
        manifest.decision.level_key(coverage)
        manifest.decision.check_sets(sets)
    table = read_cases(cases_csv, manifest, label_column, group_column)
    answers = (
        answer_by_service(service_url, manifest, table, coverage, sets, api_key, concurrency)
        if service_url
        else answer_locally(model_dir, manifest, table, coverage, sets)
    )
    if len(answers.kept) == 0:
        raise DatasetError(f"no case could be answered: {answers.rejected}")
    report = analyse(manifest, table, answers, coverage, sets)
    report["scored_by"] = (
        f"a running endofuse service ({service_url})"
        if service_url
        else "in process (ONNX Runtime)"
    )
    out = out or cases_csv.resolve().parent / f"validation-{manifest.name}-{manifest.version}"
    write_report(report, out)
    write_cases(out / "validation-cases.csv", manifest, table, answers)
    return report


def write_cases(path: Path, manifest: Any, table: Table, answers: Answers) -> None:
    """One row per case, the ones to look at first on top: flagged out of distribution, then
    not covered by their set, then named wrongly; refused cases last, their error code in
    ``named``."""
    labels = manifest.labels
    has_sets = manifest.decision is not None
    rows = []
    for j, i in enumerate(answers.kept):
        truth, named = int(table.labels[i]), int(answers.named[j])
        members = [k for k, m in zip(labels, answers.sets[j], strict=True) if m]
        rows.append({
            "path": str(table.paths[i]),
            "label": labels[truth],
            "named": labels[named],
            "probability": f"{answers.probs[j, named]:.4f}",
            "prediction_set": " ".join(members),
            "covered": str(labels[truth] in members).lower() if has_sets else "",
            "flagged": str(bool(answers.flagged[j])).lower(),
            "pattern": answers.patterns[j],
        })  # fmt: skip
    rows.sort(
        key=lambda r: (r["flagged"] != "true", r["covered"] != "false", r["named"] == r["label"])
    )
    rows += [
        {"path": str(table.paths[i]), "label": labels[int(table.labels[i])], "named": code}
        for i, code in sorted(answers.refused.items())
    ]
    fields = [
        "path",
        "label",
        "named",
        "probability",
        "prediction_set",
        "covered",
        "flagged",
        "pattern",
    ]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
