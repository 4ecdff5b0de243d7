"""Baselines: each one beats the noisy input on a real FIB-25 crop; oracle tuning; input checks."""

from __future__ import annotations

import numpy as np
import pytest

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.baselines import (
    METHODS,
    best_of_grid,
    run_method,
    three_slice_average,
)
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.sim.noise import noisy_stack

TUNE, TEST = 1, 3


@pytest.fixture(scope="module")
def crop(fib25: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) float 5×64×64 crops of FIB-25 with gaussian:25 noise."""
    clean = np.ascontiguousarray(fib25[10:15, 90:154, 90:154])
    noisy = noisy_stack(clean, "gaussian:25", seed=0)
    return clean.astype(np.float64), noisy.astype(np.float64)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_baseline_beats_the_noisy_centre(
    method: str, crop: tuple[np.ndarray, np.ndarray]
) -> None:
    clean, noisy = crop
    grid = (1.0,) if method == "bm3d" else None  # BM3D: ~1 s per 64×64 run, one value only
    tuned = best_of_grid(method, noisy, clean, TUNE, grid=grid)
    assert tuned.param in (grid or METHODS[method].grid)
    assert tuned.psnr == max(tuned.scores.values())
    out = run_method(method, noisy, TEST, tuned.param)
    assert out.shape == clean[TEST].shape and out.dtype == np.float64
    before = psnr(noisy[TEST], clean[TEST], peak=255)
    after = psnr(out, clean[TEST], peak=255)
    assert after > before + 5.0, f"{method}: {before:.2f} -> {after:.2f} dB"
    assert abs(out.mean() - clean[TEST].mean()) < 3.0  # same grey-level scale as the input


def test_three_slice_average_and_its_ends() -> None:
    stack = np.stack([np.full((4, 4), v, np.uint8) for v in (0, 30, 90)])
    assert np.all(three_slice_average(stack, 1) == 40.0)
    assert np.all(three_slice_average(stack, 0) == 15.0)  # stack end: the two slices there
    assert np.all(three_slice_average(stack, 2) == 60.0)


def test_averaging_divides_gaussian_variance_by_three() -> None:
    rng = np.random.default_rng(0)
    stack = rng.normal(0, 30, (3, 128, 128))
    assert three_slice_average(stack, 1).std() == pytest.approx(30 / np.sqrt(3), rel=0.03)


def test_input_errors() -> None:
    stack = np.zeros((3, 16, 16))
    with pytest.raises(InputError, match="unknown baseline"):
        run_method("wiener", stack, 1, 1.0)
    with pytest.raises(InputError, match="outside the stack"):
        run_method("gauss-avg", stack, 3, 1.0)
    with pytest.raises(InputError, match="differ in shape"):
        best_of_grid("gauss-avg", stack, stack[:2], 0)
    with pytest.raises(InputError, match="stack"):
        three_slice_average(np.zeros((16, 16)), 0)


def test_the_registered_average_undoes_drift_that_blurs_the_plain_average(
    fib25: np.ndarray,
) -> None:
    """Neighbours drifted by 2.6 px: the plain 3-slice Gaussian loses, the registered one keeps."""
    from scipy import ndimage

    clean = fib25[10:13, 40:200, 40:200].astype(np.float64)
    drifted = clean.copy()
    drifted[0] = ndimage.shift(clean[0], (2.0, -1.6), order=3, mode="nearest")
    drifted[2] = ndimage.shift(clean[2], (-1.4, 2.2), order=3, mode="nearest")
    noisy = noisy_stack(np.clip(drifted, 0, 255).astype(np.uint8), "gaussian:25", seed=3)
    noisy = noisy.astype(np.float64)
    aligned_ref = noisy_stack(clean.astype(np.uint8), "gaussian:25", seed=3).astype(np.float64)
    plain = psnr(run_method("gauss-avg", noisy, 1, 1.0), clean[1], peak=255)
    registered = psnr(run_method("gauss-reg", noisy, 1, 1.0), clean[1], peak=255)
    undrifted = psnr(run_method("gauss-avg", aligned_ref, 1, 1.0), clean[1], peak=255)
    assert registered > plain + 1.0, (plain, registered)
    assert registered > undrifted - 0.5, (registered, undrifted)
