"""Phantom: slice-to-slice continuity, a flat resin region, determinism, dtypes, noisy pairs."""

from __future__ import annotations

import numpy as np
import pytest

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.metrics import find_flat_region, iqr_region
from nrrn_daemon.sim.phantom import RESIN, make_phantom, phantom_noisy

SHAPE = (6, 96, 128)


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    return make_phantom(SHAPE, seed=3)


def test_shape_dtype_and_em_like_range(vol: np.ndarray) -> None:
    assert vol.shape == SHAPE and vol.dtype == np.uint8
    assert vol.min() < 90  # dark membranes
    assert 100 < np.median(vol) < 200  # grey cytoplasm / bright resin
    assert vol.std() > 15  # real structure, not a flat field


def test_adjacent_slices_correlate(vol: np.ndarray) -> None:
    flat = vol.reshape(len(vol), -1).astype(np.float64)
    corr = [np.corrcoef(flat[k], flat[k + 1])[0, 1] for k in range(len(vol) - 1)]
    assert min(corr) > 0.85
    # ...but the slices are not copies of each other: structure changes along z
    assert not np.array_equal(vol[0], vol[-1])


def test_flat_resin_corner_in_every_slice(vol: np.ndarray) -> None:
    corner = vol[:, -SHAPE[1] // 5 :, -SHAPE[2] // 5 :]  # deep inside y/Y + x/X > 1.3
    assert corner.std() < 1.0
    assert np.all(corner == RESIN)


def test_find_flat_region_lands_in_the_resin(vol: np.ndarray) -> None:
    box = find_flat_region(vol[2], 24)
    y0, y1, x0, x1 = box
    assert vol[2, y0:y1, x0:x1].std() < 1.0
    assert iqr_region(vol[2], box) == 0.0


def test_deterministic_for_a_seed() -> None:
    a = make_phantom((3, 64, 64), seed=11)
    assert np.array_equal(a, make_phantom((3, 64, 64), seed=11))
    assert not np.array_equal(a, make_phantom((3, 64, 64), seed=12))


def test_dtypes() -> None:
    u8 = make_phantom((2, 48, 48), seed=1)
    u16 = make_phantom((2, 48, 48), seed=1, dtype=np.uint16)
    f32 = make_phantom((2, 48, 48), seed=1, dtype=np.float32)
    assert u16.dtype == np.uint16 and f32.dtype == np.float32
    assert np.abs(u16.astype(np.float64) / 257 - u8).max() <= 0.5 + 1e-9
    assert np.abs(f32 - u8).max() <= 0.5 + 1e-4
    with pytest.raises(InputError, match="dtype"):
        make_phantom((2, 48, 48), dtype=np.int16)


@pytest.mark.parametrize("shape", [(48, 48), (2, 8, 64), (0, 32, 32)])
def test_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match="shape"):
        make_phantom(shape)  # type: ignore[arg-type]


def test_phantom_noisy_pairs_clean_and_noisy() -> None:
    clean, noisy = phantom_noisy((3, 64, 64), seed=2, spec="gaussian:25")
    assert clean.dtype == noisy.dtype == np.uint8 and clean.shape == noisy.shape
    assert np.array_equal(clean, make_phantom((3, 64, 64), seed=2))
    resid = noisy.astype(np.float64) - clean
    assert 20 < resid.std() < 30
