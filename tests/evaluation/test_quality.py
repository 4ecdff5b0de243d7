"""Per-slice no-reference quality on the real FIB-25 volume, against a real baseline."""

from __future__ import annotations

import numpy as np
import pytest

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.quality import CROP, JUMP_MIN_HISTORY, measure, noise_jump


def _noisy(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(clean.astype(np.float64) + rng.normal(0, sigma, clean.shape), 0, 255).astype(
        np.uint8
    )


def test_noise_follows_the_detector_and_the_baseline_lowers_it(fib25):
    """Input noise rises with the added noise; a 3-slice mean (the paper's simplest baseline)
    gives an output with lower noise and a flatter flat region than its input."""
    clean = fib25[10:13]
    low = np.stack([_noisy(s, 8, k) for k, s in enumerate(clean)])
    high = np.stack([_noisy(s, 24, 10 + k) for k, s in enumerate(clean)])
    mean3 = np.round(high.astype(np.float64).mean(axis=0)).astype(np.uint8)
    q_low = measure(low[1], low[1])
    q_high = measure(high[1], mean3)
    assert q_high.noise_in > 2 * q_low.noise_in
    assert q_high.noise_out < 0.75 * q_high.noise_in
    assert q_high.iqr_out < q_high.iqr_in
    y0, y1, x0, x1 = q_high.flat_box
    assert 0 <= y0 < y1 <= 250 and 0 <= x0 < x1 <= 250 and y1 - y0 == 62


def test_the_window_is_the_centre_crop_of_a_large_slice(fib25):
    big = np.tile(fib25[20], (6, 6))  # 1500 x 1500: measured on the centre CROP x CROP
    q = measure(big, big)
    y0, y1, x0, x1 = q.flat_box
    first = (1500 - CROP) // 2
    assert first <= y0 and y1 <= first + CROP and first <= x0 and x1 <= first + CROP
    centre = big[first : first + CROP, first : first + CROP]
    c = measure(centre, centre)  # the same pixels: the same numbers, the box shifted
    assert (c.noise_in, c.iqr_in) == (q.noise_in, q.iqr_in)
    assert [v + first for v in c.flat_box] == list(q.flat_box)
    assert q.noise_in == q.noise_out and q.iqr_in == q.iqr_out


def test_bad_images_are_refused():
    with pytest.raises(InputError, match="differ in shape"):
        measure(np.zeros((32, 32), np.uint8), np.zeros((32, 30), np.uint8))
    with pytest.raises(InputError):
        measure(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))


def test_noise_jump_needs_history_and_a_real_jump():
    steady = [5.0, 5.2, 4.9, 5.1, 5.0, 5.3]
    assert noise_jump(steady[: JUMP_MIN_HISTORY - 1], 50.0) is None
    assert noise_jump(steady, 6.5) is None
    reason = noise_jump(steady, 12.0)
    assert reason is not None and "12.0" in reason and "detector" in reason
    assert noise_jump([0.0] * 10, 3.0) is None  # a blank run has no level to compare with
