"""Per-slice no-reference quality: what the daemon records for every output (paper 2.2.1).

For each denoised slice, with no clean image to compare against:

- the noise σ of the input and of the output (:func:`~.metrics.estimate_noise`, wavelet
  MAD): the input's shows the detector and beam, the output's what the model left;
- the IQR of a flat (resin) region of both (:func:`~.metrics.iqr_region`), the
  paper's flatness measure, in the window :func:`~.metrics.find_flat_region`
  finds on the output (denoised, so structure and not noise decides where it is flat); the same
  window is measured on the input.

Both are taken on the centre :data:`CROP` × :data:`CROP` px of the slice (the whole slice when it is
smaller): 262,144 px are plenty for a MAD noise estimate, a 24-Mpx slice costs the writer thread
about 0.1 s instead of seconds (BENCHMARKS.md §12), and the measure follows the same pixels from
slice to slice.

:func:`noise_jump` judges an input against the running level of its data set: a detector, beam or
charging problem shows as a sudden rise of the input's noise. All functions are pure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.metrics import estimate_noise, find_flat_region, iqr_region

CROP = 512
"""Side (px) of the centred window the measures are taken on."""
FLAT_SIZE = 64
"""Side (px) of the flat window whose IQR is recorded (small slices: a quarter of their side)."""
JUMP_FACTOR = 1.5
"""An input whose noise exceeds this many times the running median of its data set is flagged."""
JUMP_MIN_HISTORY = 5
"""Slices a data set needs before any is judged (the running level must mean something)."""
JUMP_WINDOW = 25
"""How many of the data set's latest inputs the running median is taken over."""


@dataclass(frozen=True)
class Quality:
    """The no-reference measures of one output and its input (grey levels of the input's dtype)."""

    noise_in: float
    noise_out: float
    iqr_in: float
    iqr_out: float
    flat_box: tuple[int, int, int, int]
    """``(y0, y1, x0, x1)`` of the flat window, in the coordinates of the whole image."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        out = asdict(self)
        out["flat_box"] = list(self.flat_box)
        return out


def _centre_crop(image: np.ndarray, side: int) -> tuple[np.ndarray, int, int]:
    h, w = image.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[y0 : y0 + side, x0 : x0 + side], y0, x0


def measure(raw: np.ndarray, denoised: np.ndarray) -> Quality:
    """The noise and flat-region IQR of a raw slice and its denoised output.

    Parameters
    ----------
    raw, denoised
        2-D images of one shape (databar already cut off), at least 8 px a side.

    Returns
    -------
    Quality

    Raises
    ------
    InputError
        The images are not 2-D, differ in shape or are too small to measure.
    """
    raw, denoised = np.asarray(raw), np.asarray(denoised)
    if raw.shape != denoised.shape:
        raise InputError(f"raw {raw.shape} and denoised {denoised.shape} differ in shape")
    raw_c, y0, x0 = _centre_crop(raw, CROP)
    den_c, _, _ = _centre_crop(denoised, CROP)
    size = min(FLAT_SIZE, max(2, min(raw_c.shape) // 4))
    by0, by1, bx0, bx1 = find_flat_region(den_c, size)
    box = (by0, by1, bx0, bx1)
    return Quality(
        noise_in=estimate_noise(raw_c),
        noise_out=estimate_noise(den_c),
        iqr_in=iqr_region(raw_c, box),
        iqr_out=iqr_region(den_c, box),
        flat_box=(by0 + y0, by1 + y0, bx0 + x0, bx1 + x0),
    )


def noise_jump(previous: Sequence[float], noise_in: float) -> str | None:
    """Why an input's noise stands out from its data set's running level, or None.

    Parameters
    ----------
    previous
        The input noise of the data set's latest slices (up to :data:`JUMP_WINDOW` are used).
    noise_in
        This slice's input noise.

    Returns
    -------
    str or None
        One line such as ``"input noise 21.3 is 2.4x the running level 8.9 of the last 25
        slices: check the detector, beam current and charging"``; None when it is in line or
        there is too little history (:data:`JUMP_MIN_HISTORY`).
    """
    recent = [float(v) for v in previous][-JUMP_WINDOW:]
    if len(recent) < JUMP_MIN_HISTORY:
        return None
    level = statistics.median(recent)
    if level <= 0 or noise_in <= JUMP_FACTOR * level:
        return None
    return (
        f"input noise {noise_in:.1f} is {noise_in / level:.1f}x the running level {level:.1f} "
        f"of the last {len(recent)} slices: check the detector, beam current and charging"
    )
