"""Training configuration: frozen dataclasses, loaded from YAML, saved into the run directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.preprocess import ImageSpec
from training import lite
from training.augment import make_augment
from training.data import ColumnSpec, DatasetSpec


@dataclass(frozen=True)
class ImageConfig:
    height: int = 224
    width: int = 224
    # (x0, y0, x1, y1) fractions blacked out in training and serving alike.
    mask_regions: tuple[tuple[float, float, float, float], ...] = ()
    # Cached views of each training image; val/test always use "orig".
    views: tuple[str, ...] = ("orig", "hflip")
    # Serving preprocessing version (service/preprocess.py): 1 squash + fixed masks,
    # 2 field-of-view crop, aspect kept, ellipse mask.
    preprocessing: int = 1
    # Capture augmentation (training/augment.py) on every training step; needs the full
    # fine-tune (model.finetune_from_block = 0), since augmented pixels cannot be cached.
    augment: bool = False
    augment_recipe: str = "endoscopy"  # a key of training.augment.RECIPES
    # Fields of the recipe's dataclass to override, e.g. {crop_scale: [0.75, 1.0]}.
    augment_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ImageSpec(self.height, self.width, self.mask_regions, self.preprocessing)
        make_augment(self.augment_recipe, self.augment_params)  # fails early on a bad field

    def spec(self) -> ImageSpec:
        return ImageSpec(self.height, self.width, self.mask_regions, self.preprocessing)


@dataclass(frozen=True)
class ModelConfig:
    fusion: str = "transformer"  # "transformer" | "mlp"
    dim: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    # Backbone blocks from this index on are fine-tuned on cached block inputs; 0 fine-tunes
    # the whole backbone on decoded pixels; None trains on frozen pooled features only.
    finetune_from_block: int | None = 11
    # ImageNet checkpoint the image branch starts from (training.lite.VARIANTS).
    backbone: str = lite.DEFAULT

    def __post_init__(self) -> None:
        if self.backbone not in lite.VARIANTS:
            known = ", ".join(sorted(lite.VARIANTS))
            raise ValueError(f"model.backbone: {self.backbone!r} is not one of {known}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr: float = 1e-4
    weight_decay: float = 1e-2
    seed: int = 0
    # Modality dropout: per sample, the share trained as image-only, tabular-only, and
    # with a random subset of fields hidden (the rest see everything).
    p_image_only: float = 0.25
    p_tabular_only: float = 0.15
    p_partial_fields: float = 0.25
    unimodal_loss_weight: float = 0.5
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    class_balance: float = 0.0  # 0 = natural sampling, 1 = fully class-balanced batches
    threads: int = 0  # 0 = torch default
    # Val metric (averaged over the all / image_only / partial patterns) that picks the epoch.
    select_metric: str = "macro_f1"
    # Share of the training split whose labels are used (stratified, drawn with ``seed``);
    # the rest stays available, label-free, to the self-supervised stage.
    label_fraction: float = 1.0
    # "temperature": one temperature per missingness pattern. "auto": per pattern, a
    # temperature alone or with per-class biases (undoing a prior shifted by class-balanced
    # sampling), whichever has the lower cross-validated val NLL.
    calibration: str = "temperature"
    # A second stage: start from the best weights of an earlier run directory (same model
    # config) with this run's own optimiser and schedule. Empty: start from ImageNet.
    init_from: str = ""


@dataclass(frozen=True)
class PretrainConfig:
    """Synergistic self-supervised pretraining (MICS): a label-free stage before fine-tuning."""

    enabled: bool = False
    epochs: int = 5
    lr: float = 1e-3
    consistency_weight: float = 1.0
    reconstruction_weight: float = 10.0
    alignment_weight: float = 1.0
    mask_ratio: float = 0.5
    temperature: float = 0.1
    feature_noise: float = 0.1  # std of the Gaussian perturbation of a view's input features


@dataclass(frozen=True)
class ShiftConfig:
    """Distribution shift on fused features (MICS fine-tuning): mix per-sample statistics."""

    enabled: bool = False
    p: float = 0.5
    alpha: float = 0.3  # Beta(alpha, alpha) mixing weight


@dataclass(frozen=True)
class NegativesConfig:
    """Cluster-guided negative sampling and cross-modal masked reconstruction (CM-CGNS)."""

    enabled: bool = False
    clusters: int = 8
    momentum: float = 0.9
    false_negative_weight: float = 0.0  # same-cluster pairs: 0 excludes them
    hard_negative_weight: float = 2.0  # pairs in the anchor's nearest other cluster
    reconstruction_weight: float = 1.0
    mask_ratio: float = 0.5


@dataclass(frozen=True)
class CurriculumConfig:
    """Curriculum for imbalanced multimodal data (CLIMD)."""

    enabled: bool = False
    start_fraction: float = 0.4  # share of each class (easiest first) in the first epoch
    full_at: float = 0.6  # fraction of the epochs after which all data, natural mix, is used
    complementarity_weight: float = 0.5


@dataclass(frozen=True)
class MethodsConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


@dataclass(frozen=True)
class Config:
    name: str
    dataset: DatasetSpec
    image: ImageConfig = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    use_tabular: bool = True

    def __post_init__(self) -> None:
        if self.image.augment and self.model.finetune_from_block != 0:
            raise ValueError("image.augment needs model.finetune_from_block: 0 (full fine-tune)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))


def _build(cls: type, raw: dict[str, Any] | None) -> Any:
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    for key, value in raw.items():
        if isinstance(value, list):
            raw[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return cls(**raw)


def _methods(raw: dict[str, Any] | None) -> MethodsConfig:
    raw = dict(raw or {})
    parts = {
        "pretrain": PretrainConfig,
        "shift": ShiftConfig,
        "negatives": NegativesConfig,
        "curriculum": CurriculumConfig,
    }
    unknown = sorted(set(raw) - set(parts))
    if unknown:
        raise ValueError(f"MethodsConfig: unknown keys {unknown}")
    return MethodsConfig(**{k: _build(cls, raw.get(k)) for k, cls in parts.items()})


def from_dict(raw: dict[str, Any]) -> Config:
    ds = dict(raw["dataset"])
    ds["tabular"] = tuple(_build(ColumnSpec, c) for c in ds.get("tabular", []))
    for key in ("labels", "missing_tokens"):
        if key in ds:
            ds[key] = tuple(ds[key])
    dataset = _build(DatasetSpec, ds)
    return Config(
        name=raw["name"],
        dataset=dataset,
        image=_build(ImageConfig, raw.get("image")),
        model=_build(ModelConfig, raw.get("model")),
        train=_build(TrainConfig, raw.get("train")),
        methods=_methods(raw.get("methods")),
        use_tabular=bool(raw.get("use_tabular", True)),
    )


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    raw = yaml.safe_load(Path(path).read_text())
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(raw)
