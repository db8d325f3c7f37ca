"""Training building blocks on small inputs: checkpoint, dataset spec, patterns, metrics,
augmentation and recipes (calibration: ``tests/test_calibration.py``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training tests need the 'train' extra (torch)")

from training.backbone import (  # noqa: E402
    EfficientNetLite,
    checkpoint_path,
    load_pretrained,
    normalise_uint8_nhwc,
)
from training.data import ColumnSpec, DatasetError, DatasetSpec, fit_schema, load_split, read_rows  # noqa: E402
from training.lite import VARIANTS  # noqa: E402
from training.metrics import summarize  # noqa: E402
from training.patterns import (  # noqa: E402
    ALL,
    IMAGE_ONLY,
    PARTIAL,
    TABULAR_ONLY,
    apply_eval_pattern,
    modality_dropout,
    pattern_ids,
)


def test_checkpoint_loads_strictly() -> None:
    model = load_pretrained()
    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state), "every key matches both ways"
    # A wrong architecture would not load strictly.
    broken = EfficientNetLite()
    del broken._blocks[-1]
    with pytest.raises(RuntimeError):
        broken.load_state_dict(state, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_lite_variant_loads_its_checkpoint_and_sees_imagenet(variant: str) -> None:
    """The stage table derived from the width and depth multipliers matches each shipped
    checkpoint key for key and shape for shape, and the weights, run with SAME padding and
    [-1, 1] pixels, name the ImageNet class of a photograph (Grace Hopper, whose top class in
    the TF reference is 'military uniform', 652) among their three most probable."""
    import matplotlib
    from PIL import Image

    model = load_pretrained(variant=variant).eval()
    state = torch.load(checkpoint_path(variant), map_location="cpu", weights_only=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    pixels = np.asarray(rgb.crop(box).resize((224, 224), Image.BILINEAR))[None].copy()
    with torch.no_grad():
        logits = model.imagenet_logits(normalise_uint8_nhwc(torch.from_numpy(pixels)))
    assert 652 in logits[0].topk(3).indices.tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_ood_middle_layer_is_in_every_variants_exported_graph(
    variant: str, tmp_path: Path
) -> None:
    """The out-of-distribution fit names its middle layer from the variant's stage table; the
    tensor must exist in the exported graph and be the end of stage 5 (its channel count)."""
    import onnx

    from service.sessions import open_session
    from training.config import load_config
    from training.export import ServingGraph, export_onnx
    from training.lite import stages
    from training.ood_embed import default_features, mid_feature, with_outputs
    from training.train import build_model

    cfg = load_config(Path("training/configs/hyperkvasir-lgi.yaml"), {"model.backbone": variant})
    model = build_model(cfg, len(cfg.dataset.labels), None)
    temps = dict.fromkeys(("all", "image_only", "tabular_only", "partial"), 1.0)
    graph = ServingGraph(load_pretrained(variant=variant), model, temps, 0).eval()
    image = torch.zeros(1, 224, 224, 3, dtype=torch.uint8)
    export_onnx(graph, (image,), tmp_path / "model.onnx")
    exported = onnx.load(str(tmp_path / "model.onnx"))
    assert mid_feature(variant) in default_features(exported, variant)
    session = open_session(with_outputs(exported, [mid_feature(variant)]).SerializeToString())
    (mid,) = session.run([mid_feature(variant)], {"image": image.numpy()})
    assert mid.shape[1] == stages(variant)[4][4]  # stage 5's width: 112 in Lite0, 120 in Lite2
    with pytest.raises(ValueError, match="unknown backbone"):
        checkpoint_path("efficientnet-lite9")


def test_backbone_handles_odd_sizes_with_same_padding() -> None:
    model = load_pretrained().eval()
    with torch.no_grad():
        for h, w in ((150, 200), (224, 224), (97, 131)):
            out = model(torch.zeros(2, 3, h, w))
            assert out.shape == (2, 1280)
            assert torch.isfinite(out).all()


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def spec_for(tmp_path: Path, **kw: object) -> DatasetSpec:
    base = dict(
        name="t",
        root=str(tmp_path),
        csv="labels.csv",
        labels=("a", "b"),
        tabular=(ColumnSpec("age", "numeric"), ColumnSpec("sex", "categorical")),
    )
    base.update(kw)
    return DatasetSpec(**base)  # type: ignore[arg-type]


def test_spec_rejects_unknown_labels(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "labels.csv",
        [
            {"path": "x.jpg", "label": "a", "split": "train", "age": "1", "sex": "male"},
            {"path": "y.jpg", "label": "zebra", "split": "val", "age": "2", "sex": "male"},
        ],
    )
    with pytest.raises(DatasetError, match="zebra"):
        read_rows(spec_for(tmp_path))


def test_spec_rejects_missing_split_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", [{"path": "x.jpg", "label": "a", "age": "1", "sex": "m"}])
    with pytest.raises(DatasetError, match="column 'split' missing"):
        read_rows(spec_for(tmp_path))


def test_spec_rejects_bad_split_value(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "labels.csv",
        [{"path": "x.jpg", "label": "a", "split": "holdout", "age": "1", "sex": "m"}],
    )
    with pytest.raises(DatasetError, match="holdout"):
        read_rows(spec_for(tmp_path))


def test_missing_tokens_are_missing_and_stats_come_from_train(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "labels.csv",
        [
            {"path": "1.jpg", "label": "a", "split": "train", "age": "10", "sex": "male"},
            {"path": "2.jpg", "label": "b", "split": "train", "age": "30", "sex": "unknown"},
            {"path": "3.jpg", "label": "a", "split": "train", "age": "", "sex": "female"},
            {"path": "4.jpg", "label": "b", "split": "test", "age": "nan", "sex": "other"},
            {"path": "5.jpg", "label": "b", "split": "test", "age": "1000", "sex": "male"},
        ],
    )
    spec = spec_for(tmp_path)
    rows = read_rows(spec)
    schema = fit_schema(spec, rows)
    age, sex = schema.fields
    assert age.mean == 20 and age.std == 10, "blank age is missing, test rows are not used"
    assert sex.categories == ("female", "male"), "'unknown' is not a category"
    test = load_split(spec, "test", schema, rows)
    assert test.mask.tolist() == [[0, 0], [1, 1]], "NaN and unseen category are missing"


def test_group_column_ties_a_lesions_images_together(tmp_path: Path) -> None:
    base = {"label": "a", "age": "1", "sex": "male"}
    write_csv(
        tmp_path / "labels.csv",
        [
            {**base, "path": "1.jpg", "split": "test", "lesion": "L7"},
            {**base, "path": "2.jpg", "split": "train", "lesion": "L1"},
            {**base, "path": "3.jpg", "split": "test", "lesion": "L2"},
            {**base, "path": "4.jpg", "split": "test", "lesion": "L7"},
        ],
    )
    spec = spec_for(tmp_path, group_column="lesion")
    test = load_split(spec, "test", None, read_rows(spec))
    assert test.groups is not None
    assert test.groups[0] == test.groups[2] != test.groups[1]
    assert load_split(spec_for(tmp_path), "test", None, read_rows(spec)).groups is None
    with pytest.raises(DatasetError, match="column 'patient' missing"):
        read_rows(spec_for(tmp_path, group_column="patient"))


def test_pattern_ids_from_masks() -> None:
    image = np.array([[1], [1], [1], [0]], np.float32)
    tab = np.array([[1, 1], [0, 0], [1, 0], [1, 1]], np.float32)
    assert pattern_ids(image, tab).tolist() == [ALL, IMAGE_ONLY, PARTIAL, TABULAR_ONLY]
    assert pattern_ids(image, None).tolist() == [ALL] * 4


def test_eval_patterns_and_dropout_cover_every_combination() -> None:
    tab = np.ones((400, 3), np.float32)
    for name, expected in (
        ("all", ALL),
        ("image_only", IMAGE_ONLY),
        ("tabular_only", TABULAR_ONLY),
    ):
        image_mask, mask = apply_eval_pattern(name, tab, 400)
        assert set(pattern_ids(image_mask, mask).tolist()) == {expected}
    image_mask, mask = apply_eval_pattern("partial", tab, 400)
    assert (mask.sum(1) == 2).all()
    image_mask, mask = modality_dropout(tab, 400, np.random.default_rng(0), 0.25, 0.15, 0.25)
    seen = set(pattern_ids(image_mask, mask).tolist())
    assert seen == {ALL, IMAGE_ONLY, TABULAR_ONLY, PARTIAL}


def test_summary_metrics_on_known_confusion() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.1 / 3
    s = summarize(probs, labels, ("a", "b", "c"))
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert s["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_augment_params_override_a_recipe_and_unknown_fields_fail_early() -> None:
    from training.augment import CaptureAugment, make_augment
    from training.config import load_config

    recipe = make_augment("endoscopy", {"crop_scale": [0.75, 1.0], "p_green": 0.0})
    assert isinstance(recipe, CaptureAugment)
    assert recipe.crop_scale == (0.75, 1.0) and recipe.p_green == 0.0
    assert recipe.p_text == CaptureAugment().p_text  # the rest as the recipe has it
    config = Path(__file__).parents[1] / "training" / "configs" / "hyperkvasir-lgi-mildcrop.yaml"
    assert load_config(config).image.augment_params == {"crop_scale": [0.75, 1.0]}
    with pytest.raises(ValueError, match="unknown fields"):
        load_config(config, {"image.augment_params": {"crop_sclae": [0.5, 1.0]}})


def test_dermoscopy_bars_and_low_resolution_are_off_unless_asked() -> None:
    """Off by default (ham10000/2's recipe never changes the frame size); asked for, each
    changes the frame as said, and version 3 preprocessing cuts the bars away again."""
    from PIL import Image

    from service.preprocess import ImageSpec, prepare
    from training.augment import make_augment

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(60, 200, (150, 200, 3), dtype=np.uint8))
    plain = make_augment("dermoscopy", {})
    assert all(plain(image, np.random.default_rng(s)).size == image.size for s in range(20))
    only = {k: 0.0 for k in ("p_crop", "p_rotate", "p_colour", "p_hair", "p_ruler",
                             "p_vignette", "p_blur", "p_jpeg")}  # fmt: skip
    low = make_augment("dermoscopy", {**only, "p_lowres": 1.0, "lowres": [0.5, 0.5]})
    assert low(image, np.random.default_rng(1)).size == (100, 75)
    bars = make_augment("dermoscopy", {**only, "p_letterbox": 1.0})
    framed = [bars(image, np.random.default_rng(s)) for s in range(8)]
    assert any(f.size != image.size for f in framed)
    v3 = ImageSpec(150, 200, version=3)
    for f in framed:
        out = prepare(f, v3)
        # The bars are cut: a few black columns or rows at most, the FOV box's margin.
        assert (out.max(axis=(0, 2)) == 0).sum() <= 6 and (out.max(axis=(1, 2)) == 0).sum() <= 6


@pytest.mark.parametrize(
    "config",
    sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_recipe_in_the_repository_loads(config: Path) -> None:
    """A recipe the docs tell users to run must at least parse and pass its checks (image
    spec, augmentation fields) before an hour of training."""
    from training.config import load_config

    cfg = load_config(config)
    assert cfg.image.spec().version == cfg.image.preprocessing


def test_the_backbone_is_named_in_the_config_and_checked_when_loaded() -> None:
    from training.config import load_config

    base = Path("training/configs/hyperkvasir-lgi.yaml")
    assert load_config(base).model.backbone == "efficientnet-lite0"
    assert load_config(Path("training/configs/hyperkvasir-lgi-lite2.yaml")).model.backbone == (
        "efficientnet-lite2"
    )
    with pytest.raises(ValueError, match=r"model\.backbone"):
        load_config(base, {"model.backbone": "resnet50"})
