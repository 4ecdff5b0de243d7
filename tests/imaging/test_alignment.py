"""Neighbour alignment on real FIB-25 slices: known shifts are recovered, drift is undone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.imaging.alignment import align_neighbours, apply_shift, estimate_shift
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack


def shifted(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    moved = ndimage.shift(image.astype(np.float64), shift, order=3, mode="nearest")
    return np.clip(np.rint(moved), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("spec", ["none", "gaussian:25"])
@pytest.mark.parametrize("true", [(0.3, -0.7), (2.4, 1.35), (-3.6, 0.15)])
def test_a_known_sub_pixel_shift_is_recovered(
    fib25: np.ndarray, spec: str, true: tuple[float, float]
) -> None:
    """The same slice, moved by a known sub-pixel shift, noised independently: ≤ 0.1 px."""
    clean = np.stack([shifted(fib25[5], true), fib25[5]])
    pair = clean if spec == "none" else noisy_stack(clean, spec, seed=3)
    dy, dx = estimate_shift(pair[0], pair[1])
    assert np.hypot(dy - true[0], dx - true[1]) <= 0.1


def test_small_shifts_are_left_alone_and_large_ones_resampled(fib25: np.ndarray) -> None:
    centre = fib25[5]
    aligned, shifts = align_neighbours(centre, [centre, shifted(centre, (-2.5, 1.5))])
    assert aligned[0] is centre and shifts[0] == (0.0, 0.0)
    assert shifts[1] == pytest.approx((2.5, -1.5), abs=0.1)
    assert aligned[1].dtype == np.uint8 and aligned[1].shape == centre.shape
    inner = (slice(8, -8), slice(8, -8))
    assert psnr(aligned[1][inner], centre[inner]) > psnr(shifted(centre, (-2.5, 1.5))[inner],
                                                         centre[inner]) + 10  # fmt: skip
    assert apply_shift(centre, (0.0, 0.0)).tobytes() == centre.tobytes()


def test_denoising_a_drifted_stack_gains_with_alignment(fib25: np.ndarray) -> None:
    """The shipped base on held-out slices whose neighbours drifted by ~3.5 px."""
    base = load_checkpoint(None)
    aligned = Denoiser(base, device="cpu", tile=None, compile="off")
    unaligned = Denoiser(base, device="cpu", tile=None, compile="off", align=False)
    gains = []
    for k, z in enumerate((4, 14, 24)):
        drift = [(2.6 - k, -2.2), (-1.9, 3.1 - k)]
        moved = [shifted(fib25[z - 1], drift[0]), shifted(fib25[z + 1], drift[1])]
        clean = np.stack([fib25[z], *moved])
        noisy = noisy_stack(clean, "gaussian:25", seed=z)
        with_ = psnr(aligned.denoise(noisy[0], [noisy[1], noisy[2]]), fib25[z])
        without = psnr(unaligned.denoise(noisy[0], [noisy[1], noisy[2]]), fib25[z])
        recorded = aligned.provenance()["alignment_shifts_px"]
        # Recorded: the shift that undoes each drift, plus the slices' own offset (adjacent
        # FIB-25 slices differ in content and register ~0.4 px apart without any drift).
        for (dy, dx), (ty, tx) in zip(recorded, drift, strict=True):
            assert np.hypot(dy + ty, dx + tx) < 0.75
        gains.append(with_ - without)
    assert np.mean(gains) > 0.1, gains
