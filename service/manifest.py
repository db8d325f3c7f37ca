"""``manifest.json``: the contract that travels beside each ``model.onnx``.

Written by ``training.export``, read here. It carries what the service needs to feed the
graph (labels, image size, tabular schema) plus what users need to trust it (calibration,
metrics, provenance, library versions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.decision import DecisionParams
from service.errors import ManifestError
from service.label_rule import LabelRule
from service.preprocess import ImageSpec
from service.tabular import TabularSchema

FORMAT_VERSION = 1
# Fields kept out of the public GET /models/{name} view: graph plumbing, not model facts
# (the self-check's outcome is in the view's ``serving``, its raw outputs are not).
_INTERNAL_KEYS = ("inputs", "outputs", "files", "format_version", "self_check")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    labels: tuple[str, ...]
    image: ImageSpec
    tabular: TabularSchema | None
    image_optional: bool
    raw: dict[str, Any]
    decision: DecisionParams | None = None
    precision: str = "fp32"  # "fp32" | "int8" (a quantised variant of another version)
    label_rule: LabelRule = field(default_factory=LabelRule)

    @property
    def has_tabular(self) -> bool:
        return self.tabular is not None

    def public_view(self) -> dict[str, Any]:
        return {k: v for k, v in self.raw.items() if k not in _INTERNAL_KEYS}


def load_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest.json is missing") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_manifest(raw, where=str(path))


def parse_manifest(raw: dict[str, Any], where: str = "manifest") -> Manifest:
    for key in ("name", "version", "labels", "image"):
        if key not in raw:
            raise ManifestError(f"{where}: required field '{key}' is missing")
    labels = raw["labels"]
    if not isinstance(labels, list) or not labels or len(set(labels)) != len(labels):
        raise ManifestError(f"{where}: field 'labels' must be a non-empty list of unique names")
    try:
        image = ImageSpec.from_manifest(raw["image"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: field 'image' is invalid ({exc})") from None
    try:
        tabular = TabularSchema.from_manifest(raw.get("tabular"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: field 'tabular' is invalid ({exc})") from None
    try:
        decision = DecisionParams.from_manifest(raw.get("decision"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{where}: field 'decision' is invalid ({exc})") from None
    try:
        label_rule = LabelRule.from_manifest(raw.get("label_rule"), len(labels))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: field 'label_rule' is invalid ({exc})") from None
    precision = str(raw.get("precision", "fp32"))
    if precision not in ("fp32", "int8"):
        raise ManifestError(f"{where}: field 'precision' must be 'fp32' or 'int8'")
    return Manifest(
        label_rule=label_rule,
        precision=precision,
        decision=decision,
        name=str(raw["name"]),
        version=str(raw["version"]),
        labels=tuple(labels),
        image=image,
        tabular=tabular,
        image_optional=bool(raw.get("inputs", {}).get("image_mask", False)),
        raw=raw,
    )


def check_against_graph(
    manifest: Manifest,
    inputs: dict[str, tuple[str, list[Any]]],
    outputs: dict[str, tuple[str, list[Any]]],
    where: str,
) -> None:
    """Fail with a message naming the field when the manifest and ONNX graph disagree.

    ``inputs``/``outputs`` map tensor name -> (ONNX type string, shape) as ONNX Runtime
    reports them; symbolic dimensions are strings or None.
    """

    def need(table: dict, name: str, kind: str) -> tuple[str, list[Any]]:
        if name not in table:
            raise ManifestError(f"{where}: ONNX graph has no {kind} '{name}'")
        return table[name]

    dtype, shape = need(inputs, "image", "input")
    if dtype != "tensor(uint8)":
        raise ManifestError(f"{where}: input 'image' must be uint8, graph has {dtype}")
    expected = [manifest.image.height, manifest.image.width, 3]
    if len(shape) != 4 or [_dim(d) for d in shape[1:]] != expected:
        raise ManifestError(
            f"{where}: manifest field 'image' says [N,{expected[0]},{expected[1]},3] but "
            f"ONNX input 'image' has shape {shape}"
        )
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    for name in ("tabular", "tabular_mask"):
        if n_fields and name not in inputs:
            raise ManifestError(
                f"{where}: manifest field 'tabular' declares {n_fields} fields but the ONNX "
                f"graph has no input '{name}'"
            )
        if not n_fields and name in inputs:
            raise ManifestError(
                f"{where}: ONNX input '{name}' exists but manifest field 'tabular' is empty"
            )
        if n_fields and _dim(inputs[name][1][-1]) != n_fields:
            raise ManifestError(
                f"{where}: manifest field 'tabular' declares {n_fields} fields but ONNX input "
                f"'{name}' has width {inputs[name][1][-1]}"
            )
    if manifest.image_optional != ("image_mask" in inputs):
        raise ManifestError(
            f"{where}: manifest field 'inputs.image_mask' and the ONNX graph's 'image_mask' "
            "input disagree"
        )
    dtype, shape = need(outputs, "probabilities", "output")
    if _dim(shape[-1]) != len(manifest.labels):
        raise ManifestError(
            f"{where}: manifest field 'labels' has {len(manifest.labels)} entries but ONNX "
            f"output 'probabilities' has {shape[-1]} columns"
        )


def _dim(d: Any) -> Any:
    return int(d) if isinstance(d, int) else d
