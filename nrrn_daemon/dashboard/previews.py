"""Slice previews for the dashboard: PNGs rendered from the raw and denoised TIFFs.

A preview is the image part of the slice (the databar is cut off the way the daemon cuts it,
:func:`~nrrn_daemon.imaging.tiff.read_slice`), shrunk by whole-block means to at most
``max_px`` on its longer side (a ragged edge of less than a block is left out), and mapped to
8 bits:

* uint8 slices are shown as they are (their grey levels already are the display's);
* uint16 slices are windowed between the 0.5th and 99.5th percentile of the *raw* slice, and
  its denoised output gets the same window, so the two compare grey level for grey level.

Rendered PNGs are cached in memory by (path, size, mtime, window), so the strip's clicks and the
live page's polling read each TIFF once. Nothing is ever written to disk.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from nrrn_daemon.imaging.tiff import DatabarMode, read_slice

WINDOW_PERCENTILES = (0.5, 99.5)
"""Percentiles of the raw slice that map to black and white (16-bit slices)."""
CACHE_ENTRIES = 64
"""Previews kept in memory (a 1024-px PNG is a few hundred kB)."""


def block_factor(shape: tuple[int, int], max_px: int) -> int:
    """The smallest whole factor that brings ``shape``'s longer side to ``max_px`` or less."""
    return max(1, math.ceil(max(shape) / max_px))


def preview_shape(shape: tuple[int, int], max_px: int) -> tuple[int, int]:
    """``(height, width)`` of the preview of an image part of ``shape``."""
    f = block_factor(shape, max_px)
    return shape[0] // f, shape[1] // f


def shrink(pixels: np.ndarray, max_px: int) -> np.ndarray:
    """Means (float64) of the ``f``×``f`` blocks of ``pixels`` (:func:`block_factor`); a ragged
    last row or column of blocks (fewer than ``f`` px) is left out."""
    f = block_factor(pixels.shape, max_px)
    h, w = preview_shape(pixels.shape, max_px)
    blocks = pixels[: h * f, : w * f].reshape(h, f, w, f)
    return blocks.mean(axis=(1, 3), dtype=np.float64)


def window_of(pixels: np.ndarray) -> tuple[float, float]:
    """The display window of a slice: its dtype's range for uint8, percentiles for uint16."""
    if pixels.dtype == np.uint8:
        return 0.0, 255.0
    lo, hi = np.percentile(pixels, WINDOW_PERCENTILES)
    return float(lo), float(max(hi, lo + 1.0))


def to_png(small: np.ndarray, window: tuple[float, float]) -> bytes:
    """An 8-bit greyscale PNG of ``small`` mapped linearly from ``window`` to 0..255."""
    lo, hi = window
    grey = np.clip((small - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class Previews:
    """Renders and caches previews (thread-safe: the server renders in its worker threads).

    Parameters
    ----------
    max_px
        Longest side of a preview.
    databar, databar_rows
        How slices are split (the profile's ``image`` settings).
    """

    def __init__(self, max_px: int, databar: DatabarMode = "none", databar_rows: int = 0) -> None:
        self.max_px = max_px
        self.databar: DatabarMode = databar
        self.databar_rows = databar_rows
        self._cache: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._windows: OrderedDict[tuple[object, ...], tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def window(self, raw: Path, pixels: np.ndarray | None = None) -> tuple[float, float]:
        """The display window of the raw slice at ``raw`` (cached; ``pixels`` if already read)."""
        st = raw.stat()
        key = (str(raw), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._windows:
                return self._windows[key]
        if pixels is None:
            pixels = read_slice(raw, self.databar, self.databar_rows).pixels
        window = window_of(pixels)
        with self._lock:
            self._windows[key] = window
            while len(self._windows) > CACHE_ENTRIES:
                self._windows.popitem(last=False)
        return window

    def render(self, path: Path, window_from: Path) -> bytes:
        """The PNG preview of the slice at ``path``, windowed like the raw slice ``window_from``.

        Raises
        ------
        InputError
            A file cannot be read as a slice.
        """
        st, raw_st = path.stat(), window_from.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, str(window_from), raw_st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        image = read_slice(path, self.databar, self.databar_rows).pixels
        window = self.window(window_from, image if path == window_from else None)
        png = to_png(shrink(image, self.max_px), window)
        with self._lock:
            self._cache[key] = png
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return png
