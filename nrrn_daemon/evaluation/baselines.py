"""Classical denoisers the benchmark compares NRRN with (paper, section 2.2.3 and Tables 1, 4).

As in the paper, the filters see the average of three adjacent slices, ``(prev + centre + next)/3``
(the "-avg" rows), which already divides Gaussian noise variance by three; BM3D sees the centre
slice alone:

=============  ===============================================================  ===================
method         denoiser                                                         parameter (grid)
=============  ===============================================================  ===================
``gauss-avg``  :func:`scipy.ndimage.gaussian_filter`                            σ in px
``gauss-reg``  the same, on the average of the *registered* slices                σ in px
               (:func:`registered_average`: drift-compensated)
``median-avg`` :func:`scipy.ndimage.median_filter`, square window               window side in px
``nlm-avg``    :func:`skimage.restoration.denoise_nl_means`, fast mode,          h as a multiple of
               5×5 patches, 13×13 search, ``sigma`` = estimated noise σ          the estimated σ
``bm3d``       :func:`bm3d.bm3d` (all stages), ``sigma_psd`` = estimated σ       multiple of the
               in [0, 1] units                                                  estimated σ
=============  ===============================================================  ===================

The noise σ is estimated from the image each method sees (:func:`~nrrn_daemon.evaluation.metrics.
estimate_noise`), so the grids scale with the noise level. None of them models Poisson noise (no
variance-stabilising transform): the paper's baselines do not either.

Tuning is an oracle: :func:`best_of_grid` picks each method's parameter by PSNR against the *clean*
image of a tuning slice, which a real user does not have. It favours the baselines; NRRN gets no
such help. Tune on one slice and report on others (:func:`run_method`) so the choice is not scored
on the slice it was fitted to.

Images are float arrays on any scale (0–255 for the protocol); results come back on the same
scale, float64. BM3D is slow (~1 s for 64×64, ~5 s for 250×250 on one core): keep it to crops in
tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.metrics import estimate_noise, psnr
from nrrn_daemon.imaging.alignment import align_neighbours

Filter = Callable[[np.ndarray, float], np.ndarray]


def three_slice_average(stack: np.ndarray, z: int) -> np.ndarray:
    """``(prev + centre + next) / 3`` around slice ``z``; at a stack end, the mean of the two.

    Parameters
    ----------
    stack
        ``(Z, Y, X)`` noisy stack, Z ≥ 1.
    z
        The centre slice.

    Returns
    -------
    numpy.ndarray
        float64 ``(Y, X)``.
    """
    stack = _check_stack(stack)
    z = _check_z(stack, z)
    lo, hi = max(z - 1, 0), min(z + 2, len(stack))
    return stack[lo:hi].astype(np.float64).mean(axis=0)


def registered_average(stack: np.ndarray, z: int) -> np.ndarray:
    """:func:`three_slice_average` after registering the neighbours onto slice ``z``.

    The classical drift-compensated baseline (every vEM pipeline registers the stack first):
    each neighbour's sub-pixel shift against the centre is estimated and undone with
    :func:`~nrrn_daemon.imaging.alignment.align_neighbours`, the same registration the
    Denoiser uses, then the three slices are averaged.
    """
    stack = _check_stack(stack)
    z = _check_z(stack, z)
    neighbours = [stack[i] for i in (z - 1, z + 1) if 0 <= i < len(stack)]
    aligned, _shifts = align_neighbours(stack[z], neighbours)
    return np.mean([stack[z].astype(np.float64), *(a.astype(np.float64) for a in aligned)], axis=0)


def gaussian_denoise(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter with ``sigma`` px (edges reflected); float64 on the input's scale."""
    return ndimage.gaussian_filter(
        np.asarray(image, dtype=np.float64), float(sigma), mode="reflect"
    )


def median_denoise(image: np.ndarray, size: float) -> np.ndarray:
    """Median filter over a ``size``×``size`` window (edges reflected); float64."""
    return ndimage.median_filter(
        np.asarray(image, dtype=np.float64), size=int(size), mode="reflect"
    )


def nlm_denoise(image: np.ndarray, h_factor: float) -> np.ndarray:
    """Non-local means (fast mode) with filtering strength ``h = h_factor · σ̂``; float64.

    σ̂ is :func:`~nrrn_daemon.evaluation.metrics.estimate_noise` of ``image``; it is also passed as
    ``sigma`` so that skimage subtracts the expected noise from the patch distances.
    """
    from skimage.restoration import denoise_nl_means

    x = np.asarray(image, dtype=np.float64)
    sigma = estimate_noise(x)
    return denoise_nl_means(
        x,
        patch_size=5,
        patch_distance=6,
        h=max(h_factor * sigma, 1e-6),
        sigma=sigma,
        fast_mode=True,
        preserve_range=True,
    )


def bm3d_denoise(image: np.ndarray, sigma_factor: float, scale: float = 255.0) -> np.ndarray:
    """BM3D of a single slice with ``sigma_psd = sigma_factor · σ̂ / scale``; float64.

    The image is divided by ``scale`` (255 for the 0–255 protocol) so BM3D works in [0, 1] units
    as its defaults assume, and multiplied back afterwards.
    """
    import bm3d

    x = np.asarray(image, dtype=np.float64) / scale
    sigma = max(sigma_factor * estimate_noise(x), 1e-6)
    return np.asarray(bm3d.bm3d(x, sigma_psd=sigma), dtype=np.float64) * scale


@dataclass(frozen=True)
class Method:
    """A baseline: its denoiser, whether it sees the 3-slice average, and its parameter grid."""

    name: str
    denoise: Filter
    averaged: bool
    """True: filters ``(prev + centre + next)/3``; False: the centre slice alone."""
    grid: tuple[float, ...]
    """Parameter values :func:`best_of_grid` tries (σ px, window px, or a multiple of σ̂)."""
    parameter: str
    """What the parameter is, for reports."""
    registered: bool = False
    """With ``averaged``: register the neighbours onto the centre first
    (:func:`registered_average`)."""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gauss-avg", gaussian_denoise, True, (0.5, 0.75, 1.0, 1.5, 2.0, 3.0), "sigma_px"),
        Method(
            "gauss-reg", gaussian_denoise, True, (0.5, 0.75, 1.0, 1.5, 2.0, 3.0), "sigma_px", True
        ),
        Method("median-avg", median_denoise, True, (3, 5, 7, 9), "size_px"),
        Method("nlm-avg", nlm_denoise, True, (0.4, 0.6, 0.8, 1.0, 1.3), "h_over_sigma"),
        Method("bm3d", bm3d_denoise, False, (0.75, 1.0, 1.5), "sigma_over_estimate"),
    )
}
"""The baselines by name, in the order the benchmark reports them."""


@dataclass(frozen=True)
class Tuned:
    """The outcome of :func:`best_of_grid`."""

    method: str
    param: float
    """The grid value with the highest PSNR on the tuning slice."""
    psnr: float
    """That PSNR (dB) on the tuning slice: optimistic, do not report it as the result."""
    scores: dict[float, float]
    """PSNR (dB) of every grid value tried."""


def get_method(name: str) -> Method:
    """The baseline called ``name``; :class:`InputError` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown baseline {name!r}; choose one of {', '.join(METHODS)}") from None


def run_method(method: str, noisy_stack: np.ndarray, z: int, param: float) -> np.ndarray:
    """Denoise slice ``z`` of a noisy stack with one baseline and parameter.

    Parameters
    ----------
    method
        A key of :data:`METHODS`.
    noisy_stack
        ``(Z, Y, X)`` float (or integer) stack; the "-avg" methods use slices z−1..z+1.
    z
        The slice to denoise.
    param
        The method's parameter (see :data:`METHODS`).

    Returns
    -------
    numpy.ndarray
        float64 ``(Y, X)`` on the scale of ``noisy_stack``.
    """
    m = get_method(method)
    stack = _check_stack(noisy_stack)
    z = _check_z(stack, z)
    if not m.averaged:
        image = stack[z].astype(np.float64)
    else:
        image = registered_average(stack, z) if m.registered else three_slice_average(stack, z)
    return m.denoise(image, param)


def best_of_grid(
    method: str,
    noisy_stack: np.ndarray,
    clean_stack: np.ndarray,
    z: int,
    grid: tuple[float, ...] | None = None,
    peak: float = 255.0,
) -> Tuned:
    """Oracle tuning: the grid value whose result on slice ``z`` is closest (PSNR) to the clean one.

    This uses the clean image, which favours the baselines over NRRN (which is never tuned on
    clean data). Use a tuning slice that is not among those reported.

    Parameters
    ----------
    method
        A key of :data:`METHODS`.
    noisy_stack, clean_stack
        ``(Z, Y, X)`` stacks of the same shape, on the same scale.
    z
        The tuning slice.
    grid
        Values to try instead of the method's own grid (e.g. fewer for BM3D in tests).
    peak
        PSNR peak of the scale (255 for the protocol).

    Returns
    -------
    Tuned
        The best parameter, its PSNR and all scores (first value wins ties).
    """
    m = get_method(method)
    noisy = _check_stack(noisy_stack)
    clean = _check_stack(clean_stack)
    if noisy.shape != clean.shape:
        raise InputError(f"noisy stack {noisy.shape} and clean stack {clean.shape} differ in shape")
    values = tuple(grid) if grid is not None else m.grid
    if not values:
        raise InputError(f"empty parameter grid for {method}")
    reference = clean[_check_z(clean, z)].astype(np.float64)
    scores = {v: psnr(run_method(method, noisy, z, v), reference, peak) for v in values}
    best = max(scores, key=lambda v: scores[v])
    return Tuned(method=m.name, param=best, psnr=scores[best], scores=scores)


def _check_stack(stack: np.ndarray) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.ndim != 3 or stack.shape[0] < 1:
        raise InputError(f"expected a (Z, Y, X) stack, got shape {stack.shape}")
    return stack


def _check_z(stack: np.ndarray, z: int) -> int:
    z = int(z)
    if not 0 <= z < len(stack):
        raise InputError(f"slice {z} is outside the stack of {len(stack)} slices")
    return z
