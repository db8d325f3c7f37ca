"""Several prototypes per class for the out-of-distribution distance: k-means that comes out
the same every time, a class with two modes accepted at both and not in the gap between them,
the graph's distance to the nearest prototype equal to numpy's, and the count kept on refits."""

from __future__ import annotations

import numpy as np

from training.ood_embed import fit_layer, kmeans, mahalanobis, prototypes_of


def _blobs(rng: np.random.Generator, centres: list[tuple[float, float]], n: int) -> np.ndarray:
    return np.concatenate([rng.normal(c, 1.0, (n, 2)) for c in centres])


def test_kmeans_finds_separated_clusters_and_repeats_itself() -> None:
    rng = np.random.default_rng(0)
    truth = [(-20.0, 0.0), (0.0, 25.0), (20.0, 0.0)]
    x = _blobs(rng, truth, 100)
    centres = kmeans(x, 3)
    found = sorted(map(tuple, np.round(centres)))
    assert np.allclose(found, sorted(truth), atol=0.5)
    assert np.array_equal(kmeans(x, 3), centres)  # same rows, same seed: same centres
    # Fewer rows than prototypes: the rows themselves.
    assert np.array_equal(kmeans(x[:2], 4), x[:2])


def test_a_two_mode_class_is_accepted_at_both_modes_not_in_the_gap() -> None:
    rng = np.random.default_rng(1)
    feats = np.concatenate(
        [_blobs(rng, [(-10.0, 0.0), (10.0, 0.0)], 200), _blobs(rng, [(0.0, 40.0)], 200)]
    )
    labels = np.repeat([0, 1], [400, 200])
    new_mode = _blobs(rng, [(-10.0, 0.0), (10.0, 0.0)], 100)  # in distribution
    gap = np.array([[0.0, 0.0]])  # the class mean, where no class-0 input ever lies

    two = fit_layer("f", feats, labels, pool=False, prototypes=2)
    assert two.means.shape == (4, 2)  # two per class
    d_mode, d_gap = (
        mahalanobis(new_mode, two.means, two.precision),
        mahalanobis(gap, two.means, two.precision),
    )
    assert np.quantile(d_mode, 0.95) < d_gap[0]

    # One mean per class: the gap looks more typical than the inputs the class is made of.
    one = fit_layer("f", feats, labels, pool=False, prototypes=1)
    assert one.means.shape == (2, 2)
    d_mode, d_gap = (
        mahalanobis(new_mode, one.means, one.precision),
        mahalanobis(gap, one.means, one.precision),
    )
    assert d_gap[0] < np.median(d_mode)


def test_the_graph_reads_the_nearest_prototype_as_numpy_does() -> None:
    import onnxruntime as ort

    from tests.builders import build_model
    from training.ood_embed import add_distances, run, with_outputs

    model = build_model()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (40, 32, 32, 3)).astype(np.uint8)
    probe = ort.InferenceSession(with_outputs(model, ["img_mean"]).SerializeToString())
    (feats,) = run(probe, images, ["img_mean"], 0)
    labels = np.arange(40) % 2
    fit = fit_layer("img_mean", feats, labels, pool=False, prototypes=3)
    assert fit.means.shape == (6, feats.shape[1])
    session = ort.InferenceSession(add_distances(model, [fit]).SerializeToString())
    (dist,) = session.run(["ood_distance"], {"image": images})
    assert np.allclose(dist, mahalanobis(feats, fit.means, fit.precision), rtol=1e-4, atol=1e-4)


def test_fits_from_before_prototypes_read_as_one_mean_per_class() -> None:
    assert prototypes_of({"output": "ood_distance", "feature": "pool"}) == 1
    assert prototypes_of({"prototypes_per_class": 4}) == 4


def test_the_command_fits_as_many_prototypes_as_an_export() -> None:
    import inspect

    from service.cli_models import ood_distance
    from training.ood_embed import PROTOTYPES

    option = inspect.signature(ood_distance).parameters["prototypes"].default
    assert option.default == PROTOTYPES
