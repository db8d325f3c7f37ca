"""Dataset spec: an image root, a CSV (path, label, split) and declared tabular columns.

Numeric columns are standardised with training-split statistics; categorical columns get a
vocabulary from the training split. Blank, NaN and the spec's missing tokens (``unknown``)
are *missing*, never a value.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.tabular import FieldSpec, TabularSchema

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # "numeric" | "categorical"
    minimum: float | None = None
    maximum: float | None = None
    unit: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str  # relative to ENDOFUSE_DATA_DIR unless absolute
    csv: str
    path_column: str = "path"
    label_column: str = "label"
    split_column: str = "split"
    # Cases sharing a value here are one patient's lesion (HAM10000's lesion_id): their labels
    # are not independent, which widens what a calibration estimate can tell apart.
    group_column: str = ""
    labels: tuple[str, ...] = ()  # fixed order; empty = sorted labels of the CSV
    tabular: tuple[ColumnSpec, ...] = ()
    missing_tokens: tuple[str, ...] = ("", "unknown", "nan")
    licence: str = ""
    citation: str = ""

    def root_dir(self) -> Path:
        root = Path(self.root)
        if root.is_absolute():
            return root
        return data_dir() / root


def data_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("ENDOFUSE_DATA_DIR", default))


@dataclass
class Table:
    """One split: image paths, label indices, raw tabular values (0 where missing), mask."""

    paths: list[Path]
    labels: np.ndarray  # int64 [N]
    tabular: np.ndarray  # float32 [N,F]: numeric raw value or category index
    mask: np.ndarray  # float32 [N,F]
    label_names: tuple[str, ...] = field(default_factory=tuple)
    groups: np.ndarray | None = None  # int64 [N]: equal ids = one lesion; None = independent

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, idx: np.ndarray) -> Table:
        """The rows ``idx`` (in that order), every per-row field taken alike."""
        return Table(
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            tabular=self.tabular[idx],
            mask=self.mask[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else self.groups[idx],
        )


class DatasetError(ValueError):
    pass


def read_rows(spec: DatasetSpec) -> list[dict[str, str]]:
    path = spec.root_dir() / spec.csv
    if not path.is_file():
        raise DatasetError(f"dataset '{spec.name}': CSV not found at {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    needed = [spec.path_column, spec.label_column, spec.split_column]
    needed += [c.name for c in spec.tabular] + ([spec.group_column] if spec.group_column else [])
    for column in needed:
        if column not in columns:
            raise DatasetError(f"dataset '{spec.name}': column '{column}' missing from {path}")
    for i, row in enumerate(rows):
        if row[spec.split_column] not in SPLITS:
            raise DatasetError(
                f"dataset '{spec.name}': row {i + 2} has split "
                f"'{row[spec.split_column]}', expected one of {SPLITS}"
            )
    if spec.labels:
        unknown = sorted({r[spec.label_column] for r in rows} - set(spec.labels))
        if unknown:
            raise DatasetError(
                f"dataset '{spec.name}': labels {unknown} are not in the spec's labels "
                f"{list(spec.labels)}"
            )
    return rows


def label_names(spec: DatasetSpec, rows: list[dict[str, str]]) -> tuple[str, ...]:
    return spec.labels or tuple(sorted({r[spec.label_column] for r in rows}))


def is_missing(value: str, spec: DatasetSpec) -> bool:
    text = value.strip().lower()
    if text in {t.lower() for t in spec.missing_tokens}:
        return True
    try:
        return math.isnan(float(text))
    except ValueError:
        return False


def fit_schema(spec: DatasetSpec, rows: list[dict[str, str]]) -> TabularSchema | None:
    """Vocabularies and standardisation statistics from the training split only."""
    if not spec.tabular:
        return None
    train = [r for r in rows if r[spec.split_column] == "train"]
    fields = []
    for col in spec.tabular:
        present = [r[col.name] for r in train if not is_missing(r[col.name], spec)]
        if col.kind == "numeric":
            values = np.array([float(v) for v in present], np.float64)
            std = float(values.std()) or 1.0
            fields.append(
                FieldSpec(
                    col.name,
                    "numeric",
                    mean=float(values.mean()),
                    std=std,
                    minimum=col.minimum,
                    maximum=col.maximum,
                    unit=col.unit,
                )
            )
        elif col.kind == "categorical":
            fields.append(
                FieldSpec(col.name, "categorical", categories=tuple(sorted(set(present))))
            )
        else:
            raise DatasetError(f"column '{col.name}': type must be numeric or categorical")
    return TabularSchema(tuple(fields), missing_values=tuple(spec.missing_tokens))


def load_split(
    spec: DatasetSpec, split: str, schema: TabularSchema | None, rows: list[dict[str, str]]
) -> Table:
    names = label_names(spec, rows)
    index = {n: i for i, n in enumerate(names)}
    chosen = [r for r in rows if r[spec.split_column] == split]
    n_fields = len(schema.fields) if schema else 0
    tab = np.zeros((len(chosen), n_fields), np.float32)
    mask = np.zeros((len(chosen), n_fields), np.float32)
    for i, row in enumerate(chosen):
        for j, fspec in enumerate(schema.fields if schema else ()):
            raw = row[fspec.name]
            if is_missing(raw, spec):
                continue
            if fspec.kind == "numeric":
                tab[i, j] = float(raw)
            elif raw in fspec.categories:
                tab[i, j] = fspec.categories.index(raw)
            else:
                continue  # a category never seen in training is treated as missing
            mask[i, j] = 1.0
    root = spec.root_dir()
    groups = None
    if spec.group_column:
        _, groups = np.unique([r[spec.group_column] for r in chosen], return_inverse=True)
    return Table(
        paths=[root / r[spec.path_column] for r in chosen],
        labels=np.array([index[r[spec.label_column]] for r in chosen], np.int64),
        tabular=tab,
        mask=mask,
        label_names=names,
        groups=None if groups is None else groups.astype(np.int64),
    )
