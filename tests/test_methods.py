"""The four papers' training options, each checked on small inputs for what it claims to do."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training tests need the 'train' extra (torch)")

from service.tabular import FieldSpec, TabularSchema  # noqa: E402
from training.config import ModelConfig, load_config  # noqa: E402
from training.curriculum import (  # noqa: E402
    class_distribution,
    curriculum_order,
    difficulty,
    progress,
)
from training.data import Table  # noqa: E402
from training.features import FeatureSet  # noqa: E402
from training.model import FusionModel, contrastive_loss  # noqa: E402
from training.negatives import (  # noqa: E402
    ClusterGuide,
    OnlineKMeans,
    negative_weights,
    weighted_infonce,
)
from training.pretrain import pretrain  # noqa: E402
from training.reconstruction import Reconstructor, mask_input, reconstruction_loss  # noqa: E402
from training.shift import shift_statistics  # noqa: E402
from training.train import labelled_rows  # noqa: E402

LABELS = np.array([0] * 80 + [1] * 15 + [2] * 5)


# --- CLIMD curriculum -------------------------------------------------------------------


def test_class_distribution_moves_from_balanced_to_empirical() -> None:
    counts = np.bincount(LABELS)
    start, end = class_distribution(counts, 0.0), class_distribution(counts, 1.0)
    np.testing.assert_allclose(start, [1 / 3] * 3)
    np.testing.assert_allclose(end, counts / counts.sum())
    minority = [class_distribution(counts, t)[2] for t in np.linspace(0, 1, 11)]
    assert all(a >= b for a, b in itertools.pairwise(minority))


def test_curriculum_samples_balanced_easy_rows_first_then_everything() -> None:
    rng = np.random.default_rng(0)
    d = rng.random(len(LABELS))
    early = np.concatenate([curriculum_order(LABELS, d, 0.0, 0.4, rng) for _ in range(50)])
    share = np.bincount(LABELS[early], minlength=3) / len(early)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.03)
    for c in range(3):
        rows = np.flatnonzero(c == LABELS)
        easiest = set(rows[np.argsort(d[rows])[: int(np.ceil(0.4 * len(rows)))]])
        assert set(early[LABELS[early] == c]) <= easiest, "only the easiest 40% of each class"
    late = curriculum_order(LABELS, d, 1.0, 0.4, rng)
    assert sorted(late) == list(range(len(LABELS))), "t = 1 is one pass over all rows"
    assert progress(0, 10, 0.6) == 0.0 and progress(6, 10, 0.6) == 1.0


def test_difficulty_orders_agreeing_before_conflicting_rows() -> None:
    fused = np.array([0.9, 0.9, 0.2])
    image = np.array([0.9, 0.3, 0.8])
    tab = np.array([0.8, 0.3, 0.7])
    d = difficulty(fused, [image, tab], 0.5)
    # confident and agreeing < fusion rescues weak modalities < fusion contradicts them
    assert d[0] < d[1] < d[2]
    assert ((d >= 0) & (d <= 1)).all()


def test_labelled_subset_is_stratified_and_seeded() -> None:
    a = labelled_rows(LABELS, 0.1, seed=1)
    assert set(np.bincount(LABELS[a])) == {8, 2}  # 10% of 80, 15 -> 2, and at least 2 of 5
    assert np.array_equal(a, labelled_rows(LABELS, 0.1, seed=1))
    assert not np.array_equal(a, labelled_rows(LABELS, 0.1, seed=2))


# --- CM-CGNS negatives ------------------------------------------------------------------


def test_negative_weights_never_count_the_positive() -> None:
    assign = torch.tensor([0, 0, 1, 2, 2, 1])
    nearest = torch.tensor([1, 0, 0])
    w = negative_weights(assign, nearest, false_negative_weight=0.0, hard_negative_weight=2.0)
    assert torch.all(w.diagonal() == 0)
    assert w[0, 1] == 0 and w[3, 4] == 0, "same cluster: excluded as likely false negatives"
    assert w[0, 2] == 2 and w[0, 5] == 2, "nearest other cluster: hard negatives"
    assert w[0, 3] == 1 and w[2, 3] == 1


def test_online_kmeans_separates_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:2] * 5
    z = torch.cat(
        [
            centres[0] + torch.randn(50, 8, generator=gen),
            centres[1] + torch.randn(50, 8, generator=gen),
        ]
    )
    km = OnlineKMeans(2, momentum=0.5, seed=3)
    for _ in range(5):
        km.update(z, km.assign(z))
    a = km.assign(z)
    assert len(set(a[:50].tolist())) == 1 and len(set(a[50:].tolist())) == 1
    assert a[0] != a[50]
    assert torch.equal(km.nearest_other(), torch.tensor([1, 0]))


def test_weighted_infonce_reduces_to_infonce_and_ignores_false_negatives() -> None:
    gen = torch.Generator().manual_seed(0)
    a, p = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    ones = torch.ones(6, 6)
    assert torch.allclose(weighted_infonce(a, p, 0.1, ones), contrastive_loss(a, p, 0.1))
    # Rows 0 and 1 are the same image: as negatives of each other they inflate the loss.
    p[1] = p[0]
    a[1] = a[0]
    w = ones.clone()
    w[0, 1] = w[1, 0] = 0
    assert weighted_infonce(a, p, 0.1, w) < weighted_infonce(a, p, 0.1, ones)
    guide = ClusterGuide(2, 0.9, 0.0, 2.0)
    assert guide.weights(a).shape == (6, 6)


# --- masked reconstruction and distribution shift ----------------------------------------


def test_mask_input_hides_the_requested_share() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = mask_input(torch.ones(64, 8, 10, 10), 0.5, gen)
    assert abs((maps[:, 0] == 0).float().mean().item() - 0.5) < 0.05
    assert torch.equal(maps[:, 0] == 0, maps[:, 7] == 0), "whole spatial positions"
    vec = mask_input(torch.ones(64, 1280), 0.25, gen)
    assert abs((vec == 0).float().mean().item() - 0.25) < 0.05


def test_mask_pixels_hides_whole_patches() -> None:
    from training.reconstruction import PATCH, mask_pixels

    gen = torch.Generator().manual_seed(0)
    pixels = torch.full((64, 40, 50, 3), 200.0)  # not a multiple of the patch size
    masked = mask_pixels(pixels, 0.5, gen)
    assert masked.shape == pixels.shape
    hidden = masked[..., 0] == 0
    assert torch.equal(hidden, masked[..., 2] == 0), "every channel of a pixel"
    assert abs(hidden.float().mean().item() - 0.5) < 0.06
    # Constant inside each patch: a patch is hidden whole or not at all.
    corner = hidden[:, :PATCH, :PATCH]
    assert torch.equal(corner.all(dim=(1, 2)), corner.any(dim=(1, 2)))


def _tiny_model(tabular: bool) -> FusionModel:
    schema = None
    if tabular:
        schema = TabularSchema(
            (
                FieldSpec("age", "numeric", mean=50.0, std=10.0),
                FieldSpec("site", "categorical", categories=("a", "b", "c")),
            )
        )
    return FusionModel(3, schema, ModelConfig(fusion="transformer", dim=32, layers=1, heads=2))


@pytest.mark.parametrize("cross_modal", [False, True])
def test_reconstruction_loss_falls_on_a_fixed_batch(cross_modal: bool) -> None:
    torch.manual_seed(0)
    model = _tiny_model(tabular=cross_modal)
    decoder = Reconstructor(64 if cross_modal else 32, 64)
    x = torch.randn(32, 1280).relu()
    values = torch.stack([torch.randn(32) * 10 + 50, torch.randint(0, 3, (32,)).float()], 1)
    mask = torch.ones(32, 2)
    opt = torch.optim.Adam([*model.parameters(), *decoder.parameters()], lr=3e-3)
    losses = []
    for step in range(60):
        gen = torch.Generator().manual_seed(step)
        loss = reconstruction_loss(
            model, decoder, x, 0.5, values if cross_modal else None, mask, generator=gen
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_shift_keeps_the_pattern_and_moves_only_the_moments() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32) * torch.linspace(0.5, 3, 16)[:, None] + torch.arange(16.0)[:, None]
    assert torch.equal(shift_statistics(x, 0.0, 0.3), x)
    y = shift_statistics(x, 1.0, 0.3)
    assert not torch.allclose(y, x)

    def normalised(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(-1, keepdim=True)) / t.std(-1, keepdim=True)

    assert torch.allclose(normalised(y), normalised(x), atol=1e-4)
    # Mixed means stay inside the batch's range of means.
    assert y.mean(-1).min() >= x.mean(-1).min() - 1e-4
    assert y.mean(-1).max() <= x.mean(-1).max() + 1e-4


# --- MICS pretraining --------------------------------------------------------------------


@pytest.mark.parametrize("tabular", [False, True])
def test_pretraining_losses_fall_without_labels(tabular: bool) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 96
    base = rng.normal(size=(n, 1280)).astype(np.float32)
    pooled = np.stack([base, base + 0.1 * rng.normal(size=base.shape).astype(np.float32)])
    feats = FeatureSet(pooled=np.maximum(pooled, 0), mid=None)
    table = Table(
        paths=[Path(f"{i}.jpg") for i in range(n)],
        labels=np.full(n, -1),  # never read: the stage is label-free
        tabular=np.stack([rng.normal(50, 10, n), rng.integers(0, 3, n)], 1).astype(np.float32),
        mask=np.ones((n, 2), np.float32),
        label_names=["a", "b", "c"],
    )
    cfg = load_config(
        Path("training/configs/ham10000.yaml"),
        {
            "train.batch_size": 32,
            "methods.pretrain.enabled": True,
            "methods.pretrain.epochs": 8,
            "methods.negatives.enabled": True,
            "methods.negatives.clusters": 3,
            "use_tabular": tabular,
        },
    )
    model = _tiny_model(tabular)
    history = pretrain(model, cfg, feats, table, rng)
    for key in ("consistency", "reconstruction", "alignment"):
        assert history[-1][key] < history[0][key], key


def test_method_switches_load_from_config_and_reject_typos() -> None:
    cfg = load_config(
        Path("training/configs/ham10000.yaml"),
        {"methods.curriculum.enabled": True, "methods.shift.p": 0.3},
    )
    assert cfg.methods.curriculum.enabled and cfg.methods.shift.p == 0.3
    assert not cfg.methods.pretrain.enabled
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(Path("training/configs/ham10000.yaml"), {"methods.shfit.p": 0.3})
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(Path("training/configs/ham10000.yaml"), {"methods.shift.q": 0.3})
