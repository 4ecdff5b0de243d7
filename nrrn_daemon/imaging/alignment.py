"""Neighbour alignment: undo the drift between adjacent FIB-SEM slices before denoising.

Slices drift between acquisitions by fractions of a pixel to a few pixels. Each neighbour's
sub-pixel shift against the centre is estimated with
:func:`skimage.registration.phase_cross_correlation` (plain cross-correlation, more robust to
heavy noise than the whitened phase correlation, of central crops smoothed by a σ = 1 px
Gaussian and Hann-windowed against edge effects: on FIB-25 with a known shift, errors ≤ 0.11 px
at Gaussian σ 25 and 0.1–0.6 px at Poisson peak 4)
and the neighbour is resampled onto the centre's grid (:func:`scipy.ndimage.shift`, cubic
spline, edges repeated) before it enters the network. Shifts below :data:`MIN_SHIFT` px are
left alone: resampling smooths a neighbour's noise, which the network was trained without, and
the gates cope with such drift (BENCHMARKS §1). One function, :func:`align_neighbours`, used by
the Denoiser (daemon, ``reprocess``, ``denoise``) and by training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation

MIN_SHIFT = 0.5
"""Shifts (Euclidean, px) below this are not resampled."""
MAX_CROP = 1024
SMOOTH_SIGMA = 1.0
UPSAMPLE = 20
"""Sub-pixel precision of the estimate: 1/20 px."""


def _crop(image: np.ndarray, side: int = MAX_CROP) -> np.ndarray:
    h, w = image.shape
    y, x = max((h - side) // 2, 0), max((w - side) // 2, 0)
    return image[y : y + side, x : x + side]


def estimate_shift(reference: np.ndarray, moving: np.ndarray) -> tuple[float, float]:
    """``(dy, dx)`` such that shifting ``moving`` by it lines it up with ``reference``."""
    prepared = []
    for image in (_crop(reference), _crop(moving)):
        x = ndimage.gaussian_filter(image.astype(np.float32), SMOOTH_SIGMA)
        prepared.append((x - x.mean()) * window("hann", x.shape))
    shift, _error, _phase = phase_cross_correlation(
        *prepared, upsample_factor=UPSAMPLE, normalization=None
    )
    return float(shift[0]), float(shift[1])


def apply_shift(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """``image`` resampled by ``shift`` (cubic spline, edges repeated), same dtype, rounded."""
    moved = ndimage.shift(image.astype(np.float32), shift, order=3, mode="nearest")
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        moved = np.clip(np.rint(moved), info.min, info.max)
    return moved.astype(image.dtype)


def align_neighbours(
    centre: np.ndarray, neighbours: Sequence[np.ndarray], *, min_shift: float = MIN_SHIFT
) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Each neighbour resampled onto the centre's grid, and its estimated shift.

    A shift is applied only when it is at least ``min_shift`` px and the resampled neighbour
    correlates better with the centre than the original (smoothed crops): a spurious
    correlation peak (periodic structure, slices that do not match) leaves the neighbour alone.

    Returns
    -------
    (aligned, shifts)
        The neighbours (the same arrays where nothing was resampled) and the ``(dy, dx)``
        applied to each, in px rounded to 1/100 (``(0, 0)`` where none), for provenance.
    """
    aligned, shifts = [], []
    for image in neighbours:
        dy, dx = estimate_shift(centre, image)
        if np.hypot(dy, dx) >= min_shift:
            moved = apply_shift(image, (dy, dx))
            if _agreement(centre, moved) > _agreement(centre, image):
                shifts.append((round(dy, 2), round(dx, 2)))
                aligned.append(moved)
                continue
            dy = dx = 0.0  # a spurious peak (periodic structure, unrelated slices): keep as is
        shifts.append((round(dy, 2), round(dx, 2)))
        aligned.append(image)
    return aligned, shifts


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the smoothed central crops, edges left out (the guard against a shift
    that does not actually bring the neighbour closer to the centre)."""
    x, y = (ndimage.gaussian_filter(_crop(im).astype(np.float64), 2.0) for im in (a, b))
    inner = (slice(8, -8), slice(8, -8))
    x, y = x[inner].ravel(), y[inner].ravel()
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])
