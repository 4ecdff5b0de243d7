"""Metrics: PSNR/SSIM on hand-made cases, IQR on a ramp, noise estimation, flat-region search."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.metrics import (
    estimate_noise,
    evaluate_pair,
    evaluate_stacks,
    find_flat_region,
    iqr_line,
    iqr_region,
    psnr,
    ssim,
)


def _image(seed: int = 0, shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 230, shape, dtype=np.uint8)


def test_psnr_identical_is_inf() -> None:
    img = _image()
    assert psnr(img, img) == math.inf


def test_psnr_constant_offset_one_uint8() -> None:
    ref = _image()
    assert psnr(ref + np.uint8(1), ref) == pytest.approx(20 * math.log10(255))


def test_psnr_does_not_wrap_uint8() -> None:
    ref = np.full((16, 16), 10, np.uint8)
    test = np.full((16, 16), 5, np.uint8)  # 5 - 10 wraps to 251 in uint8 arithmetic
    assert psnr(test, ref) == pytest.approx(10 * math.log10(255**2 / 25))


def test_psnr_peak_from_dtype() -> None:
    ref = np.zeros((8, 8), np.uint16)
    assert psnr(ref + np.uint16(1), ref) == pytest.approx(20 * math.log10(65535))
    # float test against a uint8 reference takes the uint8 peak
    assert psnr(np.ones((8, 8)), np.zeros((8, 8), np.uint8)) == pytest.approx(20 * math.log10(255))


def test_psnr_float_needs_peak() -> None:
    a = np.zeros((8, 8))
    with pytest.raises(InputError, match="peak"):
        psnr(a + 1, a)
    assert psnr(a + 1, a, peak=1.0) == pytest.approx(0.0)


def test_mixed_integer_dtypes_rejected() -> None:
    with pytest.raises(InputError, match="uint16"):
        psnr(np.zeros((8, 8), np.uint16), np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_shape_mismatch_names_both_shapes(fn) -> None:
    with pytest.raises(InputError, match=r"\(32, 32\).*\(32, 31\)"):
        fn(np.zeros((32, 32), np.uint8), np.zeros((32, 31), np.uint8))


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    img = _image()
    assert ssim(img, img) == pytest.approx(1.0)
    smooth = np.tile(np.linspace(40, 200, 48), (48, 1)).astype(np.uint8)
    noisy = np.clip(smooth + np.random.default_rng(1).normal(0, 25, smooth.shape), 0, 255)
    assert ssim(noisy.astype(np.uint8), smooth) < 0.5


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # No variance: SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1), C1 = (0.01 * 255)^2
    a = np.full((16, 16), 100, np.uint8)
    b = np.full((16, 16), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))


def test_ssim_rejects_tiny_and_3d() -> None:
    with pytest.raises(InputError, match="window"):
        ssim(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="evaluate_stacks"):
        ssim(np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8))


def test_evaluate_pair_and_stacks() -> None:
    clean = np.stack([_image(s) for s in range(3)])
    den = clean.copy()
    den[1] = den[1] + np.uint8(1)
    pair = evaluate_pair(den[1], clean[1])
    assert pair["psnr"] == pytest.approx(20 * math.log10(255))
    res = evaluate_stacks(den, clean)
    assert res["psnr"][0] == math.inf and res["ssim"][0] == pytest.approx(1.0)
    assert res["psnr"][1] == pytest.approx(pair["psnr"])
    assert len(res["ssim"]) == 3 and res["ssim_mean"] == pytest.approx(np.mean(res["ssim"]))
    with pytest.raises(InputError, match="differ in shape"):
        evaluate_stacks(den[:2], clean)


def test_iqr_line_on_a_ramp() -> None:
    ramp = np.tile(np.arange(101, dtype=np.float64), (5, 1))  # value = x
    # 101 samples 0..100 along a row: quartiles 25 and 75
    assert iqr_line(ramp, (2, 0), (2, 100)) == pytest.approx(50.0)
    # along a column the value is constant
    assert iqr_line(ramp, (0, 40), (4, 40)) == 0.0
    with pytest.raises(InputError, match="outside"):
        iqr_line(ramp, (0, 0), (0, 101))


def test_iqr_region_on_a_ramp() -> None:
    ramp = np.tile(np.arange(8, dtype=np.float64), (4, 1))
    # every row holds 0..7: IQR = 5.25 - 1.75
    assert iqr_region(ramp, (0, 4, 0, 8)) == pytest.approx(3.5)
    with pytest.raises(InputError, match="region"):
        iqr_region(ramp, (0, 4, 5, 5))


def test_estimate_noise_flat_plus_gaussian() -> None:
    rng = np.random.default_rng(3)
    img = 120.0 + rng.normal(0, 10, (128, 128))
    assert estimate_noise(img) == pytest.approx(10.0, rel=0.15)
    assert estimate_noise(np.full((32, 32), 7.0)) == pytest.approx(0.0, abs=1e-9)


def test_estimate_noise_on_real_data_is_small(fib25: np.ndarray) -> None:
    # the README gives sigma ~ 3.8 grey levels for this near-clean volume
    assert 1.0 < estimate_noise(fib25[12, :128, :128]) < 8.0


def test_find_flat_region_finds_the_flat_patch() -> None:
    rng = np.random.default_rng(4)
    img = rng.normal(128, 40, (96, 96))  # busy everywhere...
    img = np.asarray(img, dtype=np.float64)
    img[48:80, 8:40] = 200.0  # ...but for one flat 32x32 patch
    img += rng.normal(0, 5, img.shape)  # and noise all over
    y0, y1, x0, x1 = find_flat_region(img, 24)
    assert y1 - y0 == 24 and x1 - x0 == 24
    assert 48 <= y0 and y1 <= 80 and 8 <= x0 and x1 <= 40


@settings(max_examples=40, deadline=None)
@given(h=st.integers(8, 80), w=st.integers(8, 80), size=st.integers(2, 8), seed=st.integers(0, 99))
def test_find_flat_region_is_a_valid_box(h: int, w: int, size: int, seed: int) -> None:
    img = np.random.default_rng(seed).normal(0, 1, (h, w))
    box = find_flat_region(img, size)
    y0, y1, x0, x1 = box
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    assert (y1 - y0, x1 - x0) == (size, size)
    assert iqr_region(img, box) >= 0.0


def test_find_flat_region_rejects_oversize() -> None:
    with pytest.raises(InputError, match="does not fit"):
        find_flat_region(np.zeros((16, 32)), 17)


def test_noise_of_a_blank_image_is_zero_not_nan() -> None:
    """A blanked beam gives an all-zero frame: its noise is 0 (the daemon stores it per slice)."""
    assert estimate_noise(np.zeros((32, 32), np.uint8)) == 0.0
    assert estimate_noise(np.full((32, 32), 200, np.uint16)) == pytest.approx(0.0, abs=1e-9)
