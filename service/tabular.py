"""Tabular clinical fields: the schema a model declares and validation of submitted values.

The service only maps each field to a float (raw numeric value, or category index) plus a
presence mask; standardisation and embeddings live in the ONNX graph. Error messages name
the field and the rule, never the submitted value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.errors import InvalidTabular


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Literal["numeric", "categorical"]
    categories: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0
    minimum: float | None = None
    maximum: float | None = None
    unit: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.kind}
        if self.kind == "categorical":
            out["categories"] = list(self.categories)
        else:
            out.update(mean=self.mean, std=self.std, min=self.minimum, max=self.maximum)
            if self.unit:
                out["unit"] = self.unit
        return out

    @classmethod
    def from_manifest(cls, raw: dict[str, Any]) -> FieldSpec:
        kind = raw["type"]
        if kind not in ("numeric", "categorical"):
            raise ValueError(f"tabular field {raw.get('name')!r}: unknown type {kind!r}")
        return cls(
            name=raw["name"],
            kind=kind,
            categories=tuple(raw.get("categories", ())),
            mean=float(raw.get("mean", 0.0)),
            std=float(raw.get("std", 1.0)),
            minimum=raw.get("min"),
            maximum=raw.get("max"),
            unit=raw.get("unit"),
        )


@dataclass(frozen=True)
class TabularSchema:
    fields: tuple[FieldSpec, ...]
    # Submitted strings that mean "not recorded" (e.g. "unknown"); treated exactly like null.
    missing_values: tuple[str, ...] = field(default=("", "unknown"))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "fields": [f.to_manifest() for f in self.fields],
            "missing_values": list(self.missing_values),
        }

    @classmethod
    def from_manifest(cls, raw: dict[str, Any] | None) -> TabularSchema | None:
        if not raw or not raw.get("fields"):
            return None
        return cls(
            fields=tuple(FieldSpec.from_manifest(f) for f in raw["fields"]),
            missing_values=tuple(raw.get("missing_values", ("", "unknown"))),
        )


@dataclass(frozen=True)
class TabularInput:
    values: np.ndarray  # float32 [F]
    mask: np.ndarray  # float32 [F], 1 = present
    used: list[str]
    missing: list[str]


def parse_tabular(raw: Any, schema: TabularSchema) -> TabularInput:
    """Validate a submitted JSON object against ``schema``; absent or null fields are masked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidTabular("tabular must be a JSON object of field name to value")
    known = {f.name for f in schema.fields}
    for key in raw:
        if key not in known:
            raise InvalidTabular(
                f"unknown tabular field; accepted fields: {', '.join(schema.names)}"
            )
    values = np.zeros(len(schema.fields), dtype=np.float32)
    mask = np.zeros(len(schema.fields), dtype=np.float32)
    used: list[str] = []
    missing: list[str] = []
    missing_tokens = {m.strip().lower() for m in schema.missing_values}
    for i, spec in enumerate(schema.fields):
        value = raw.get(spec.name)
        if value is None or (isinstance(value, str) and value.strip().lower() in missing_tokens):
            missing.append(spec.name)
            continue
        values[i] = _encode(spec, value)
        mask[i] = 1.0
        used.append(spec.name)
    return TabularInput(values=values, mask=mask, used=used, missing=missing)


def _encode(spec: FieldSpec, value: Any) -> float:
    if spec.kind == "numeric":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidTabular(f"field '{spec.name}' must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise InvalidTabular(f"field '{spec.name}' must be a finite number") from None
        if not math.isfinite(number):
            raise InvalidTabular(f"field '{spec.name}' must be a finite number")
        too_low = spec.minimum is not None and number < spec.minimum
        too_high = spec.maximum is not None and number > spec.maximum
        if too_low or too_high:
            raise InvalidTabular(
                f"field '{spec.name}' is outside the accepted range "
                f"[{spec.minimum}, {spec.maximum}]"
            )
        return number
    if not isinstance(value, str):
        raise InvalidTabular(f"field '{spec.name}' must be a string category")
    try:
        return float(spec.categories.index(value))
    except ValueError:
        raise InvalidTabular(
            f"field '{spec.name}' must be one of: {', '.join(spec.categories)}"
        ) from None
