"""Tiles with a halo, and stitching: how a large slice is cut for the network and put back.

Pure: plain integers in, :class:`Tile` records out; numpy only for :func:`stitch`.

Each tile owns a *core* (the output pixels it writes) and reads a *window*: the core plus
``halo`` pixels on each side, clamped to the image. The cores partition the image exactly. No
padding is added at the image border: the network's convolutions zero-pad there exactly as in
whole-image inference, so a window that stops at the border reproduces it. When ``halo`` is at
least the network's receptive radius, every core pixel sees the same inputs as in whole-image
inference, and tiled inference is exact (paper section 2.2.3 cuts a 20-px overlap away instead,
on 256-px patches; see ``NRRNConfig.halo``).

Layout choices, per axis (rows and columns are planned independently, tiles are their product):

* **balanced cores** (default): ``k = ceil(n / tile)`` cores of ``ceil(n / k)`` pixels (the last
  one may be a few pixels shorter), so ``tile`` is the *largest* core. A 1100-px axis with
  ``tile=512`` gets three ~367-px cores rather than 512 + 512 + 76, which wastes less halo;
* **one window shape**: every window has length ``min(n, core + 2·halo)``; windows at the border
  are shifted inwards rather than cut short. A shifted window reads more than ``halo`` pixels
  on its inner side, which is harmless, and all tiles can be batched in one forward pass.

``balanced=False`` gives the plain grid (cores of exactly ``tile``, the last one shorter), as in
the paper's patching; it is used by the benchmark's baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

Span = tuple[int, int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Tile:
    """One tile: a window to read and the core it owns, in image coordinates.

    Attributes
    ----------
    window
        ``(y0, y1, x0, x1)``: the input region, half-open, inside the image.
    core
        ``(y0, y1, x0, x1)``: the output region this tile owns, inside ``window``.
    """

    window: Box
    core: Box

    @property
    def window_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the window."""
        y0, y1, x0, x1 = self.window
        return y1 - y0, x1 - x0

    @property
    def inner(self) -> Box:
        """``(y0, y1, x0, x1)`` of the core relative to the window's top-left corner."""
        wy, _, wx, _ = self.window
        y0, y1, x0, x1 = self.core
        return y0 - wy, y1 - wy, x0 - wx, x1 - wx

    @property
    def window_slices(self) -> tuple[slice, slice]:
        """Index the image with these to read the window."""
        y0, y1, x0, x1 = self.window
        return slice(y0, y1), slice(x0, x1)

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """Index the output image with these to write the core."""
        y0, y1, x0, x1 = self.core
        return slice(y0, y1), slice(x0, x1)

    @property
    def inner_slices(self) -> tuple[slice, slice]:
        """Index a window-shaped result with these to get the core."""
        y0, y1, x0, x1 = self.inner
        return slice(y0, y1), slice(x0, x1)


def plan_axis(n: int, tile: int, halo: int, *, balanced: bool = True) -> list[tuple[Span, Span]]:
    """Cut one axis of length ``n`` into ``(window, core)`` spans; see the module docstring.

    Parameters
    ----------
    n
        Axis length in pixels (≥ 1).
    tile
        Largest core length (≥ 1).
    halo
        Pixels of context on each side of a core (≥ 0), where the image has them.
    balanced
        Equal cores of ``ceil(n / ceil(n / tile))`` px (default), or cores of exactly ``tile``.

    Returns
    -------
    list of ((w0, w1), (c0, c1))
        Half-open spans; the cores partition ``[0, n)`` in order; every window has the same
        length, ``min(n, core + 2·halo)``.
    """
    if n < 1:
        raise ValueError(f"axis length must be ≥ 1, got {n}")
    if tile < 1:
        raise ValueError(f"tile must be ≥ 1, got {tile}")
    if halo < 0:
        raise ValueError(f"halo must be ≥ 0, got {halo}")
    step = math.ceil(n / math.ceil(n / tile)) if balanced else min(tile, n)
    length = min(n, step + 2 * halo)
    spans = []
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        # Start halo before the core, but inside [0, n - length]: a window at the border is
        # shifted inwards (it then has ≥ halo px on its inner side and the border on the other).
        w0 = max(0, min(c0 - halo, n - length))
        spans.append(((w0, w0 + length), (c0, c1)))
    return spans


def plan_tiles(
    height: int, width: int, tile: int, halo: int, *, balanced: bool = True
) -> list[Tile]:
    """Tiles covering a ``height × width`` image, row-major; see the module docstring.

    Parameters
    ----------
    height, width
        Image size in pixels (≥ 1 each).
    tile
        Largest core side (≥ 1); an image no larger than ``tile`` is one tile.
    halo
        Context pixels on each side of a core where the image has them; use at least the
        network's receptive radius for exact tiled inference.
    balanced
        See :func:`plan_axis`.

    Returns
    -------
    list of Tile
        Cores partition the image exactly; all windows have the same shape.
    """
    rows = plan_axis(height, tile, halo, balanced=balanced)
    cols = plan_axis(width, tile, halo, balanced=balanced)
    return [
        Tile(window=(wy0, wy1, wx0, wx1), core=(cy0, cy1, cx0, cx1))
        for (wy0, wy1), (cy0, cy1) in rows
        for (wx0, wx1), (cx0, cx1) in cols
    ]


def paste(out: np.ndarray, tile: Tile, result: np.ndarray) -> None:
    """Write the core of a window-shaped ``result`` into ``out`` (in place)."""
    if result.shape[-2:] != tile.window_shape:
        raise ValueError(f"result shape {result.shape} does not match window {tile.window_shape}")
    out[(..., *tile.core_slices)] = result[(..., *tile.inner_slices)]


def stitch(
    tiles: Iterable[Tile],
    results: Iterable[np.ndarray],
    shape: tuple[int, int],
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """Assemble window-shaped results into one image by keeping each tile's core.

    Parameters
    ----------
    tiles
        The plan from :func:`plan_tiles` for ``shape``.
    results
        One window-shaped array per tile, in the same order.
    shape
        ``(height, width)`` of the image.
    dtype
        Output dtype; by default that of the first result.

    Returns
    -------
    numpy.ndarray
        The stitched image; with ``results`` = the windows of ``x``, this is ``x``.
    """
    out: np.ndarray | None = None
    for tile, result in zip(tiles, results, strict=True):
        if out is None:
            out = np.empty(shape, dtype=dtype or result.dtype)
        paste(out, tile, result)
    if out is None:
        raise ValueError("stitch needs at least one tile")
    return out
