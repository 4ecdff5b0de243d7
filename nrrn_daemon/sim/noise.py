"""Synthetic noise of the paper's EPFL protocol (sections 2.2.1, 2.2.3; Tables 4A–B), 0–255 scale.

- Poisson with peak P: ``noisy = Poisson(clean / 255 · P) / P · 255``; P ∈ {1, 2, 4, 8, 30} in the
  tables. At peak P a pixel of grey level g has variance ``g · 255 / P``.
- Gaussian with σ on the 0–255 scale: ``noisy = clean + N(0, σ²)``; σ ∈ {10, 15, 25, 35, 75}.
- Fine-tuning (section 2.2.3) draws a random level per sample: Poisson with a peak in [1, 50], or
  Gaussian with σ in [10, 75] (:func:`random_mixed`).

A level is written as a spec string, ``"poisson:4"`` or ``"gaussian:25"``; :data:`PROTOCOL_LEVELS`
lists the levels the benchmark reports.

The pixel-level functions return float32 and do not clip, so the noise keeps its exact statistics.
Images for the pipeline are uint8: :func:`noisy_stack` (and :func:`to_dtype`) clip to [0, 255] and
round, which changes the statistics where the noise reaches the ends of the scale:

- Gaussian noise loses its zero mean near black and near white (clipping at 0 biases dark pixels up,
  clipping at 255 biases bright pixels down); at σ = 75 this reaches well into the grey levels.
- Poisson noise is never negative, so clipping at 0 does nothing; but its values are multiples of
  ``255 / P``, so at peak 1 every pixel is 0, 255, 510... and clipping makes the image binary (0 or
  255) with mean ``255 · (1 − exp(−g / 255))`` instead of g: biased low, most for bright pixels. At
  peak 30 and above the effect is negligible except near white.

Each slice of a stack gets its own draw (noise independent across slices, as Noise2Noise on adjacent
slices assumes); :func:`noisy_stack` seeds slice k from ``(seed, k)``, so a slice's noise does not
depend on how many slices the stack has.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nrrn_daemon.errors import InputError

PROTOCOL_LEVELS: list[str] = ["poisson:1", "poisson:4", "poisson:30", "gaussian:25", "gaussian:75"]
"""Noise levels of the benchmark: a subset of the paper's Tables 4A (Poisson) and 4B (Gaussian)."""

MIXED_POISSON_PEAK = (1.0, 50.0)
"""Range of the Poisson peak drawn by :func:`random_mixed` (paper, fine-tuning on EPFL)."""

MIXED_GAUSSIAN_SIGMA = (10.0, 75.0)
"""Range of the Gaussian σ (0–255 scale) drawn by :func:`random_mixed`."""

SCALE = 255.0
"""The grey-level scale of the protocol: 8-bit."""

KINDS = ("poisson", "gaussian")


def _as_float(clean: np.ndarray) -> np.ndarray:
    clean = np.asarray(clean)
    if not (np.issubdtype(clean.dtype, np.integer) or np.issubdtype(clean.dtype, np.floating)):
        raise InputError(f"expected a numeric image on the 0–255 scale, got dtype {clean.dtype}")
    return clean.astype(np.float64)


def add_poisson(clean: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise of the EPFL protocol: ``Poisson(clean / 255 · peak) / peak · 255``.

    Parameters
    ----------
    clean
        Image or stack on the 0–255 scale (uint8, or floats in [0, 255]).
    peak
        The photon count of a white pixel (> 0); lower is noisier.
    rng
        The random generator to draw from.

    Returns
    -------
    numpy.ndarray
        float32, same shape, unclipped: multiples of ``255 / peak`` (can exceed 255).

    Raises
    ------
    InputError
        ``peak`` is not positive, or ``clean`` has values outside [0, 255].
    """
    if not math.isfinite(peak) or peak <= 0:
        raise InputError(f"Poisson peak must be a positive number, got {peak}")
    x = _as_float(clean)
    if x.size and (float(x.min()) < 0.0 or float(x.max()) > SCALE):
        raise InputError(
            f"Poisson noise needs grey levels in [0, 255], got [{x.min()}, {x.max()}]; "
            "convert the image to 8-bit first"
        )
    counts = rng.poisson(x * (peak / SCALE))
    return (counts * (SCALE / peak)).astype(np.float32)


def add_gaussian(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise with ``sigma`` grey levels on the 0–255 scale.

    Parameters
    ----------
    clean
        Image or stack on the 0–255 scale.
    sigma
        Standard deviation in grey levels (≥ 0).
    rng
        The random generator to draw from.

    Returns
    -------
    numpy.ndarray
        float32, same shape, unclipped (can be negative or above 255).

    Raises
    ------
    InputError
        ``sigma`` is negative or not finite.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"Gaussian sigma must be a number >= 0, got {sigma}")
    x = _as_float(clean)
    return (x + rng.normal(0.0, sigma, size=x.shape)).astype(np.float32)


def to_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Clip to the range of an unsigned integer dtype and round to nearest.

    Parameters
    ----------
    x
        Float image (values need not be in range).
    dtype
        ``numpy.uint8`` or ``numpy.uint16``.

    Returns
    -------
    numpy.ndarray
        The image in ``dtype``: values below 0 become 0, above the maximum become the maximum.

    Raises
    ------
    InputError
        ``dtype`` is not uint8 or uint16.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise InputError(f"to_dtype converts to uint8 or uint16, not {dt}")
    top = float(np.iinfo(dt).max)
    return np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, top)).astype(dt)


def parse_spec(spec: str) -> tuple[str, float]:
    """Split a noise spec such as ``"poisson:4"`` or ``"gaussian:25"`` into (kind, level).

    Parameters
    ----------
    spec
        ``"poisson:<peak>"`` (peak > 0) or ``"gaussian:<sigma>"`` (σ ≥ 0, 0–255 scale).

    Returns
    -------
    tuple
        ``(kind, level)`` with kind ``"poisson"`` or ``"gaussian"``.

    Raises
    ------
    InputError
        The spec is not of that form.
    """
    kind, sep, value = str(spec).strip().lower().partition(":")
    try:
        level = float(value)
    except ValueError:
        level = math.nan
    if not sep or kind not in KINDS or not math.isfinite(level):
        raise InputError(
            f"noise spec {spec!r} is not understood; write 'poisson:<peak>' or "
            "'gaussian:<sigma>', e.g. 'poisson:4' or 'gaussian:25'"
        )
    if (kind == "poisson" and level <= 0) or level < 0:
        raise InputError(f"noise spec {spec!r}: the level must be positive")
    return kind, level


def apply_protocol(clean: np.ndarray, spec: str, rng: np.random.Generator) -> np.ndarray:
    """Noise of one protocol level, e.g. ``"poisson:4"``; float32, unclipped.

    Parameters
    ----------
    clean
        Image or stack on the 0–255 scale. Every pixel gets its own draw.
    spec
        ``"poisson:<peak>"`` or ``"gaussian:<sigma>"`` (see :func:`parse_spec`).
    rng
        The random generator to draw from.

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``clean``.
    """
    kind, level = parse_spec(spec)
    if kind == "poisson":
        return add_poisson(clean, level, rng)
    return add_gaussian(clean, level, rng)


def random_mixed(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Noise at a random level, as in the paper's fine-tuning: for training.

    With probability ½ Poisson with a peak uniform in :data:`MIXED_POISSON_PEAK`, else Gaussian with
    σ uniform in :data:`MIXED_GAUSSIAN_SIGMA`. One level is drawn per call and applied to all of
    ``clean`` with independent pixels: pass a whole triplet so its three slices share a level (the
    Noise2Noise loss needs the neighbours' noise to have the centre's distribution).

    Parameters
    ----------
    clean
        Image, triplet or stack on the 0–255 scale.
    rng
        The random generator to draw from.

    Returns
    -------
    tuple
        ``(noisy, spec)``: float32 unclipped noisy data, and the spec that made it (for logs).
    """
    if rng.random() < 0.5:
        spec = f"poisson:{rng.uniform(*MIXED_POISSON_PEAK):.3f}"
    else:
        spec = f"gaussian:{rng.uniform(*MIXED_GAUSSIAN_SIGMA):.3f}"
    return apply_protocol(clean, spec, rng), spec


def slice_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of slice ``index`` of a stack noised with ``seed``: independent streams."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def noisy_stack(clean_stack: np.ndarray, spec: str, seed: int) -> np.ndarray:
    """A noisy uint8 copy of a clean stack: one independent draw per slice, clipped and rounded.

    Parameters
    ----------
    clean_stack
        ``(Z, Y, X)`` on the 0–255 scale (uint8, or floats in [0, 255]).
    spec
        ``"poisson:<peak>"`` or ``"gaussian:<sigma>"``.
    seed
        Slice k is drawn from :func:`slice_rng` ``(seed, k)``: the same slice gets the same noise
        whatever the length of the stack.

    Returns
    -------
    numpy.ndarray
        uint8, same shape. Clipping at 0 and 255 biases the noise at the ends of the scale (see the
        module docstring); PSNR of the result is what the pipeline really sees.

    Raises
    ------
    InputError
        The stack is not 3-D or the spec is not understood.
    """
    clean_stack = np.asarray(clean_stack)
    if clean_stack.ndim != 3:
        raise InputError(f"expected a (Z, Y, X) stack, got shape {clean_stack.shape}")
    parse_spec(spec)
    out = np.empty(clean_stack.shape, dtype=np.uint8)
    for k, plane in enumerate(clean_stack):
        out[k] = to_dtype(apply_protocol(plane, spec, slice_rng(seed, k)), np.uint8)
    return out
