"""Image-quality measures of the paper (section 2.2.1 and supplement): PSNR, SSIM and IQR.

Full-reference measures compare a denoised image with a clean one:

- :func:`psnr` — ``10·log10(peak² / MSE)``, the paper's formula with peak 255 on 8-bit data. The
  peak comes from the integer dtype (255 for uint8, 65535 for uint16); float images carry no range,
  so their peak must be given. Computed in float64, so uint8 differences do not wrap around.
- :func:`ssim` — Wang et al. (2004) through :func:`skimage.metrics.structural_similarity` with the
  paper's own settings (11-px Gaussian window, σ = 1.5, population covariances, K1 = 0.01,
  K2 = 0.03); the data range comes from the dtype like PSNR's peak.

No-reference measures, for the daemon's own checks where no clean image exists:

- :func:`iqr_line` / :func:`iqr_region` — the interquartile range of the grey levels along a line or
  in a box of a flat area (resin): an efficient denoiser flattens it, so lower is better.
- :func:`estimate_noise` — Gaussian σ in grey levels by the wavelet MAD estimator (Donoho &
  Johnstone 1994), :func:`skimage.restoration.estimate_sigma`.
- :func:`find_flat_region` — the flattest square window of a slice, so the IQR can be measured
  without anyone choosing coordinates.

All functions are pure: numpy arrays in, Python floats or dicts out. Bad inputs raise
:class:`~nrrn_daemon.errors.InputError`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import ndimage

from nrrn_daemon.errors import InputError

SSIM_SIGMA = 1.5
"""Gaussian window σ of SSIM (Wang et al. 2004); skimage truncates it at 3.5σ: an 11-px window."""

SSIM_MIN_SIZE = 11
"""Smallest side an image may have for SSIM with the 11-px Gaussian window."""

FLAT_SMOOTHING_SIGMA = 2.0
"""σ (px) of the Gaussian that :func:`find_flat_region` applies first, so noise does not decide."""

Box = tuple[int, int, int, int]
"""A region as ``(y0, y1, x0, x1)``, half-open like a numpy slice."""


def _same_shape(test: np.ndarray, reference: np.ndarray) -> None:
    if test.shape != reference.shape:
        raise InputError(
            f"images differ in shape: test {test.shape} vs reference {reference.shape}; "
            "compare a denoised image with the clean image of the same slice and crop"
        )
    if test.size == 0:
        raise InputError(f"images are empty (shape {test.shape}); nothing to compare")


def dtype_peak(dtype: np.dtype[Any]) -> float | None:
    """The largest value of an unsigned integer dtype (255 for uint8), else ``None``.

    Parameters
    ----------
    dtype
        The dtype of an image.

    Returns
    -------
    float or None
        ``np.iinfo(dtype).max`` for unsigned integers; ``None`` for floats and signed integers,
        whose range the caller must state.
    """
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.unsignedinteger):
        return float(np.iinfo(dtype).max)
    return None


def _peak_of(test: np.ndarray, reference: np.ndarray, given: float | None, what: str) -> float:
    """The peak (data range) to use: ``given``, else the one the integer dtypes agree on."""
    if given is not None:
        if not math.isfinite(given) or given <= 0:
            raise InputError(f"{what} must be a positive number, got {given}")
        return float(given)
    peaks = {p for p in (dtype_peak(test.dtype), dtype_peak(reference.dtype)) if p is not None}
    if not peaks:
        raise InputError(
            f"cannot infer the {what} of {test.dtype} / {reference.dtype} images; "
            f"give {what}= (255.0 for data on the 8-bit scale)"
        )
    if len(peaks) > 1:
        raise InputError(
            f"test is {test.dtype} but reference is {reference.dtype}; convert one of them "
            f"or give {what}= explicitly"
        )
    return peaks.pop()


def psnr(test: np.ndarray, reference: np.ndarray, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (paper, supplement): ``10·log10(peak² / MSE)``.

    Parameters
    ----------
    test
        The denoised (or noisy) image; any shape.
    reference
        The clean image, same shape.
    peak
        The largest possible grey level. Default: from the dtype (255 for uint8, 65535 for
        uint16; if one image is float and the other an unsigned integer, the integer's). Float
        images alone need it.

    Returns
    -------
    float
        PSNR in dB; ``math.inf`` for identical images (MSE = 0).

    Raises
    ------
    InputError
        The shapes differ, the images are empty, or the peak cannot be inferred.
    """
    test, reference = np.asarray(test), np.asarray(reference)
    _same_shape(test, reference)
    p = _peak_of(test, reference, peak, "peak")
    diff = test.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(p * p / mse)


def ssim(test: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity of two 2-D images (Wang et al. 2004), in [-1, 1].

    Parameters
    ----------
    test
        The denoised (or noisy) 2-D image, at least 11×11 px.
    reference
        The clean image, same shape.
    data_range
        ``max - min`` of the grey-level scale; inferred from the dtype like :func:`psnr`'s peak.

    Returns
    -------
    float
        1.0 for identical images.

    Raises
    ------
    InputError
        The shapes differ, an image is not 2-D or smaller than the 11-px window, or the data range
        cannot be inferred.
    """
    from skimage.metrics import structural_similarity

    test, reference = np.asarray(test), np.asarray(reference)
    _same_shape(test, reference)
    if test.ndim != 2:
        raise InputError(
            f"ssim compares 2-D slices, got shape {test.shape}; use evaluate_stacks for a stack"
        )
    if min(test.shape) < SSIM_MIN_SIZE:
        raise InputError(
            f"image {test.shape} is smaller than SSIM's {SSIM_MIN_SIZE}-px Gaussian window"
        )
    rng = _peak_of(test, reference, data_range, "data_range")
    return float(
        structural_similarity(
            test.astype(np.float64),
            reference.astype(np.float64),
            data_range=rng,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
        )
    )


def evaluate_pair(
    denoised: np.ndarray, clean: np.ndarray, peak: float | None = None
) -> dict[str, float]:
    """PSNR and SSIM of one denoised slice against its clean slice.

    Parameters
    ----------
    denoised, clean
        2-D images of the same shape.
    peak
        Peak / data range, as in :func:`psnr`.

    Returns
    -------
    dict
        ``{"psnr": dB, "ssim": value}``.
    """
    return {"psnr": psnr(denoised, clean, peak), "ssim": ssim(denoised, clean, peak)}


def evaluate_stacks(
    denoised: np.ndarray, clean: np.ndarray, peak: float | None = None
) -> dict[str, Any]:
    """Per-slice and mean PSNR and SSIM of a denoised stack against the clean stack.

    Parameters
    ----------
    denoised, clean
        ``(Z, Y, X)`` stacks of the same shape (a 2-D image counts as one slice).
    peak
        Peak / data range, as in :func:`psnr`.

    Returns
    -------
    dict
        ``psnr`` and ``ssim``: lists with one value per slice; ``psnr_mean`` and ``ssim_mean``:
        their means (``inf`` when a slice is identical to its reference).
    """
    denoised, clean = np.asarray(denoised), np.asarray(clean)
    _same_shape(denoised, clean)
    if denoised.ndim == 2:
        denoised, clean = denoised[None], clean[None]
    if denoised.ndim != 3:
        raise InputError(f"expected a (Z, Y, X) stack, got shape {denoised.shape}")
    pairs = [evaluate_pair(d, c, peak) for d, c in zip(denoised, clean, strict=True)]
    p = [r["psnr"] for r in pairs]
    s = [r["ssim"] for r in pairs]
    return {"psnr": p, "ssim": s, "psnr_mean": float(np.mean(p)), "ssim_mean": float(np.mean(s))}


def _iqr(values: np.ndarray) -> float:
    q25, q75 = np.percentile(values.astype(np.float64), [25.0, 75.0])
    return float(q75 - q25)


def _check_2d(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise InputError(f"expected a non-empty 2-D image, got shape {image.shape}")
    return image


def iqr_line(image: np.ndarray, start: tuple[float, float], end: tuple[float, float]) -> float:
    """Interquartile range of the grey levels along a straight line (paper, section 2.2.1).

    The line is sampled at 1-px steps, both ends included, with nearest-neighbour sampling
    (``order=0``): every sample is a real pixel value, so interpolation does not average
    neighbouring pixels and hide part of the noise the measure is there to show.

    Parameters
    ----------
    image
        A 2-D image.
    start, end
        ``(y, x)`` of the line's ends, inside the image.

    Returns
    -------
    float
        ``Q3 - Q1`` of the sampled values, in grey levels (lower is flatter).

    Raises
    ------
    InputError
        The image is not 2-D or an end lies outside it.
    """
    from skimage.measure import profile_line

    image = _check_2d(image)
    for name, (y, x) in (("start", start), ("end", end)):
        if not (0 <= y <= image.shape[0] - 1 and 0 <= x <= image.shape[1] - 1):
            raise InputError(f"line {name} (y={y}, x={x}) lies outside the {image.shape} image")
    values = profile_line(
        image.astype(np.float64), tuple(start), tuple(end), linewidth=1, order=0, mode="nearest"
    )
    return _iqr(values)


def _check_box(image: np.ndarray, box: Box) -> Box:
    if len(box) != 4:
        raise InputError(f"a region is (y0, y1, x0, x1), got {box!r}")
    y0, y1, x0, x1 = (int(v) for v in box)
    h, w = image.shape
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise InputError(
            f"region (y0={y0}, y1={y1}, x0={x0}, x1={x1}) is empty or outside the {image.shape} "
            "image; give 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width"
        )
    return y0, y1, x0, x1


def iqr_region(image: np.ndarray, box: Box) -> float:
    """Interquartile range of the grey levels in a box of a flat area.

    Parameters
    ----------
    image
        A 2-D image.
    box
        ``(y0, y1, x0, x1)``, half-open like ``image[y0:y1, x0:x1]``.

    Returns
    -------
    float
        ``Q3 - Q1`` in grey levels (lower is flatter).

    Raises
    ------
    InputError
        The image is not 2-D or the box is empty or outside it.
    """
    image = _check_2d(image)
    y0, y1, x0, x1 = _check_box(image, box)
    return _iqr(image[y0:y1, x0:x1])


def estimate_noise(image: np.ndarray) -> float:
    """No-reference estimate of the Gaussian noise σ of an image, in its grey levels.

    Wavelet MAD (Donoho & Johnstone 1994): the median absolute value of the finest diagonal
    Daubechies-2 coefficients / 0.6745, via :func:`skimage.restoration.estimate_sigma`. The image
    is not rescaled, so a uint8 image gives σ on the 0–255 scale. For Poisson noise, whose σ
    depends on the grey level, it gives a typical (median-weighted) σ.

    Parameters
    ----------
    image
        A 2-D image (a 3-D stack is treated as one volume), at least 8 px on each side.

    Returns
    -------
    float
        Estimated σ in grey levels.

    Raises
    ------
    InputError
        The image is not 2-D/3-D or too small.
    """
    from skimage.restoration import estimate_sigma

    image = np.asarray(image)
    if image.ndim not in (2, 3) or min(image.shape) < 8:
        raise InputError(
            f"noise estimation needs a 2-D image (or 3-D stack) of at least 8 px a side, "
            f"got shape {image.shape}"
        )
    with warnings.catch_warnings():
        # estimate_sigma guesses that a last axis of <= 4 is colour; ours never is.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # the empty median of a blank image
        sigma = float(estimate_sigma(image.astype(np.float64), channel_axis=None))
    return sigma if np.isfinite(sigma) else 0.0


def find_flat_region(image: np.ndarray, size: int) -> Box:
    """The flattest ``size``×``size`` window of a slice, for a no-reference IQR.

    The image is first smoothed with a Gaussian (σ = :data:`FLAT_SMOOTHING_SIGMA` px) so that the
    noise, which is everywhere, does not decide; then the window whose smoothed grey levels have the
    lowest standard deviation wins: structure (membranes, organelles, edges) raises it, a flat
    resin area does not. Windows are searched on a grid whose step is the largest divisor of
    ``size`` up to ``size // 8`` px (8 px for 64-px windows): exact window sums from block sums, so
    a 6144×4096 slice costs about two float32 copies of it. The first window wins ties.

    Parameters
    ----------
    image
        A 2-D image.
    size
        Side of the window in px, 2 ≤ size ≤ the shorter side of the image.

    Returns
    -------
    tuple of int
        ``(y0, y1, x0, x1)``, ready for :func:`iqr_region`.

    Raises
    ------
    InputError
        The image is not 2-D or ``size`` does not fit.
    """
    image = _check_2d(image)
    size = int(size)
    if not 2 <= size <= min(image.shape):
        raise InputError(
            f"flat-region size {size} does not fit the {image.shape} image; "
            f"give 2..{min(image.shape)}"
        )
    smooth = ndimage.gaussian_filter(image.astype(np.float32), FLAT_SMOOTHING_SIGMA, mode="reflect")
    # Centre the values before squaring: keeps the sums of large images accurate.
    smooth -= np.float32(smooth.mean(dtype=np.float64))
    step = _grid_step(size)
    k = size // step
    s1 = _window_sums(_block_sums(smooth, step), k)
    s2 = _window_sums(_block_sums(smooth * smooth, step), k)
    n = float(size * size)
    var = s2 / n - (s1 / n) ** 2
    iy, ix = np.unravel_index(int(np.argmin(var)), var.shape)
    y0, x0 = int(iy) * step, int(ix) * step
    return y0, y0 + size, x0, x0 + size


def _grid_step(size: int) -> int:
    """The largest divisor of ``size`` that is at most ``size // 8`` (at least 1)."""
    for step in range(max(1, size // 8), 0, -1):
        if size % step == 0:
            return step
    return 1


def _block_sums(a: np.ndarray, step: int) -> np.ndarray:
    """float64 sums of the ``step``×``step`` blocks of ``a`` (a ragged last row/column dropped)."""
    h, w = a.shape[0] // step, a.shape[1] // step
    blocks = a[: h * step, : w * step].reshape(h, step, w, step)
    return blocks.sum(axis=(1, 3), dtype=np.float64)


def _window_sums(blocks: np.ndarray, k: int) -> np.ndarray:
    """Sums of every ``k``×``k`` window of block sums (one per grid corner): integral image."""
    ii = np.zeros((blocks.shape[0] + 1, blocks.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(blocks, axis=0), axis=1, out=ii[1:, 1:])
    return ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]
