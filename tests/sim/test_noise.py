"""Noise protocol: statistics of each kind, spec parsing, clipping, per-slice independence."""

from __future__ import annotations

import numpy as np
import pytest

from nrrn_daemon.errors import InputError
from nrrn_daemon.sim.noise import (
    PROTOCOL_LEVELS,
    add_gaussian,
    add_poisson,
    apply_protocol,
    noisy_stack,
    parse_spec,
    random_mixed,
    to_dtype,
)


def test_gaussian_preserves_mean_and_has_sigma() -> None:
    clean = np.full((256, 256), 120, np.uint8)
    noisy = add_gaussian(clean, 25.0, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert noisy.mean() == pytest.approx(120.0, abs=0.3)
    assert noisy.std() == pytest.approx(25.0, rel=0.02)
    assert noisy.min() < 20 and noisy.max() > 220  # unclipped tails exist


@pytest.mark.parametrize("peak", [1.0, 4.0, 30.0])
@pytest.mark.parametrize("grey", [40, 128])
def test_poisson_mean_and_variance(peak: float, grey: int) -> None:
    clean = np.full((256, 256), grey, np.uint8)
    noisy = add_poisson(clean, peak, np.random.default_rng(1)).astype(np.float64)
    # E = g and Var = g * 255 / peak for an interior grey level g
    assert noisy.mean() == pytest.approx(grey, rel=0.03)
    assert noisy.var() == pytest.approx(grey * 255 / peak, rel=0.05)
    # values are multiples of 255 / peak
    k = noisy * peak / 255
    assert np.allclose(k, np.round(k), atol=1e-3)


def test_poisson_rejects_out_of_scale_and_bad_peak() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="0, 255"):
        add_poisson(np.full((4, 4), 300.0), 4, rng)
    with pytest.raises(InputError, match="peak"):
        add_poisson(np.zeros((4, 4), np.uint8), 0, rng)


def test_to_dtype_clips_and_rounds() -> None:
    x = np.array([-3.0, 0.4, 0.6, 254.5, 300.0])
    assert to_dtype(x, np.uint8).tolist() == [0, 0, 1, 254, 255]  # rint: 254.5 -> 254 (even)
    assert to_dtype(np.array([70000.0]), np.uint16).tolist() == [65535]
    with pytest.raises(InputError, match="uint8 or uint16"):
        to_dtype(x, np.float32)


@pytest.mark.parametrize("spec", PROTOCOL_LEVELS)
def test_every_protocol_level_parses_and_applies(spec: str) -> None:
    kind, level = parse_spec(spec)
    assert kind in ("poisson", "gaussian") and level > 0
    out = apply_protocol(np.full((8, 8), 100, np.uint8), spec, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (8, 8)


@pytest.mark.parametrize("spec", ["poisson", "gauss:25", "poisson:-1", "gaussian:abc", "", "x:1"])
def test_bad_specs_are_input_errors(spec: str) -> None:
    with pytest.raises(InputError, match="noise spec"):
        parse_spec(spec)


def test_random_mixed_levels_in_the_paper_ranges() -> None:
    rng = np.random.default_rng(5)
    clean = np.full((4, 16, 16), 100, np.uint8)
    kinds = set()
    for _ in range(40):
        noisy, spec = random_mixed(clean, rng)
        kind, level = parse_spec(spec)
        kinds.add(kind)
        assert noisy.shape == clean.shape and noisy.dtype == np.float32
        if kind == "poisson":
            assert 1.0 <= level <= 50.0
        else:
            assert 10.0 <= level <= 75.0
    assert kinds == {"poisson", "gaussian"}


def test_noisy_stack_uint8_deterministic_and_independent_per_slice() -> None:
    clean = np.full((3, 64, 64), 128, np.uint8)
    a = noisy_stack(clean, "gaussian:25", seed=7)
    assert a.dtype == np.uint8 and a.shape == clean.shape
    assert np.array_equal(a, noisy_stack(clean, "gaussian:25", seed=7))
    assert not np.array_equal(a, noisy_stack(clean, "gaussian:25", seed=8))
    # each slice its own draw: residuals of adjacent slices are uncorrelated
    r = a.astype(np.float64) - 128
    assert abs(np.corrcoef(r[0].ravel(), r[1].ravel())[0, 1]) < 0.1
    # a slice's noise does not depend on the stack length
    assert np.array_equal(noisy_stack(clean[:2], "gaussian:25", seed=7), a[:2])


def test_noisy_stack_clipping_biases_poisson_peak_1() -> None:
    # At peak 1 the values are 0, 255, 510...: clipped, the slice is binary and its mean is
    # 255 (1 - exp(-g/255)) instead of g (see the module docstring).
    g = 128
    out = noisy_stack(np.full((1, 128, 128), g, np.uint8), "poisson:1", seed=0)
    assert set(np.unique(out).tolist()) <= {0, 255}
    assert out.mean() == pytest.approx(255 * (1 - np.exp(-g / 255)), rel=0.03)


def test_noisy_stack_rejects_2d() -> None:
    with pytest.raises(InputError, match="stack"):
        noisy_stack(np.zeros((8, 8), np.uint8), "poisson:4", seed=0)
