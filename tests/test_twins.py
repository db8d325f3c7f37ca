"""Cross-split twin detection: frames are matched by what is lit, not by their black borders."""

from __future__ import annotations

import numpy as np

from training.twins import TWIN_CORRELATION, nearest, signatures


def _scene(seed: int) -> np.ndarray:
    """A smooth random 'tissue' image inside a black border, as a model input (64 x 64)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 230, (8, 8, 3)).astype(np.float32)
    image = np.kron(coarse, np.ones((8, 8, 1)))
    image[:8], image[-8:], image[:, :8], image[:, -8:] = 0, 0, 0, 0
    return image.astype(np.uint8)


def test_a_retaken_frame_is_found_and_unrelated_frames_are_not_twins() -> None:
    pool = np.stack([_scene(s) for s in range(20)])
    retaken = pool[7].astype(np.int16) + np.random.default_rng(99).integers(-6, 7, pool[7].shape)
    other = _scene(1234)
    query = np.stack([np.clip(retaken, 0, 255).astype(np.uint8), other])
    best, corr = nearest(signatures(query), signatures(pool))
    assert best[0] == 7 and corr[0] > 0.97
    assert corr[1] < TWIN_CORRELATION


def test_black_borders_alone_do_not_make_frames_alike() -> None:
    a, b = _scene(1), _scene(2)
    sig = signatures(np.stack([a, b]))
    # The borders are identical; the lit parts are unrelated.
    assert float(sig[0] @ sig[1]) < 0.5
    assert np.isclose(np.linalg.norm(sig[0]), 1.0, atol=1e-4)
    blank = signatures(np.zeros((1, 64, 64, 3), np.uint8))
    assert np.all(np.isfinite(blank)) and np.allclose(blank, 0)
