"""An EM-like phantom volume the project makes itself, for the demo and for tests.

FIB-SEM at (near-)isotropic voxels sees tissue as a 3-D object cut slice by slice, so the phantom is
built as a 3-D field and sliced: adjacent z-slices correlate like real data (~0.9+, FIB-25 gives
0.93–0.96), every structure is a 3-D blob or surface. Voxels are isotropic, ~10 nm.

Contrast is that of FIB-SEM backscatter images as usually displayed (inverted, TEM-like, as in
FIB-25 and the EPFL hippocampus): heavy-metal-stained membranes are dark on grey cytoplasm, and the
unstained epoxy resin outside the tissue is bright and uniform. Grey levels are on 0–255:

- resin: :data:`RESIN` exactly, no texture — the flat area where the paper measures the IQR. It
  fills the corner ``y/Y + x/X > RESIN_CORNER`` (give or take a few px of wavy boundary) in
  every slice.
- cytoplasm: a level per cell around :data:`CYTOPLASM`, plus a faint granular 3-D texture.
- membranes: :data:`MEMBRANE`, ~3 px wide, on the faces of a 3-D power (Laguerre) diagram — large
  cells ~:data:`CELL_SPACING` px across with small processes between them — made wavy by a smooth
  random warp; one more membrane lines the tissue/resin boundary.
- mitochondria: ellipsoids at some cell centres, darker matrix, dark outline, dark cristae lamellae
  across the long axis.
- vesicles: clusters of small hollow spheres (dark rings in a slice) at other cell centres.

Speed: cell candidates and smooth fields come from a 4× coarser grid; only the cheap, exact parts
(distance to the face between the two best candidates, trilinear upsampling) run at full
resolution: a 32×512×512 volume takes ~3 s on one core. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nrrn_daemon.errors import InputError
from nrrn_daemon.sim.noise import noisy_stack

RESIN = 195.0
CYTOPLASM = 145.0
MEMBRANE = 55.0
MITO_MATRIX = 105.0
MITO_EDGE = 60.0
VESICLE = 80.0

RESIN_CORNER = 1.3
"""The resin fills ``y/Y + x/X > RESIN_CORNER``: a corner triangle of ~25 % of each slice, which
holds a flat square of ~0.3 × the slice side (64 px in a 256-px slice)."""

CELL_SPACING = 64.0
"""Spacing (px) of the jittered grid of cell seeds: the typical cell diameter."""

MEMBRANE_SIGMA = 1.2
"""Gaussian σ (px) of a membrane's cross-section: ~3 px full width at half depth."""

WAVE_AMPLITUDE = 3.0
"""How far (px) the smooth random field moves the cell faces and the resin boundary."""

COARSE = 4
"""Factor of the coarse grid for the cell candidates and the smooth fields."""

CANDIDATES = 4
"""Nearest seeds of each coarse point that the voxels around it choose their cell from."""

_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def make_phantom(
    shape: tuple[int, int, int] = (32, 256, 256),
    seed: int = 0,
    dtype: type | np.dtype = np.uint8,
) -> np.ndarray:
    """A clean EM-like ``(Z, Y, X)`` volume (see the module docstring for what it contains).

    Parameters
    ----------
    shape
        ``(Z, Y, X)``, each at least 1 (Y and X at least 16).
    seed
        Seed of everything random: the same seed and shape give the same volume.
    dtype
        ``uint8`` (grey levels 0–255), ``uint16`` (the same ×257) or ``float32`` (0–255, unrounded).

    Returns
    -------
    numpy.ndarray
        The clean volume.

    Raises
    ------
    InputError
        The shape is not 3-D or too small, or the dtype is not one of the three.
    """
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 16:
        raise InputError(f"phantom shape must be (Z, Y, X) with Z >= 1, Y, X >= 16; got {shape}")
    dt = np.dtype(dtype)
    if dt not in _DTYPES:
        raise InputError(f"phantom dtype must be uint8, uint16 or float32, not {dt}")
    zdim, ydim, xdim = (int(v) for v in shape)
    rng = np.random.default_rng(seed)

    seeds, weights, is_big = _cell_seeds((zdim, ydim, xdim), rng)
    dist, cell = _voronoi(seeds, weights, (zdim, ydim, xdim), rng)

    levels = np.clip(rng.normal(CYTOPLASM, 12.0, len(seeds)), 115.0, 175.0).astype(np.float32)
    img = levels[cell]
    del cell
    img += 5.0 * _smooth_field((zdim, ydim, xdim), 0.5, rng, coarse=2)
    membrane = np.exp(-0.5 * (dist / MEMBRANE_SIGMA) ** 2)
    del dist
    img += (MEMBRANE - img) * membrane
    del membrane

    # Resin: t = signed distance (px) from the plane y/Y + x/X = RESIN_CORNER, + in the resin.
    y, x = np.ogrid[:ydim, :xdim]
    wave = _smooth_field((zdim, ydim, xdim), 3.0, rng)  # ~12-px waves, unit std
    t = _resin_distance(y, x, ydim, xdim).astype(np.float32) + WAVE_AMPLITUDE * wave
    del wave
    _organelles(img, seeds[is_big], rng)
    edge = np.clip(1.0 - ((t + 1.5) / 2.5) ** 2, 0.0, 1.0) ** 2  # compact: 0 for t >= 1
    img += (MEMBRANE - img) * edge
    rho = np.clip((t + 2.0) / 4.0, 0.0, 1.0)
    rho = rho * rho * (3.0 - 2.0 * rho)  # smoothstep: exactly 1 (pure resin) for t >= 2
    img += (RESIN - img) * rho
    img[rho >= 1.0] = RESIN  # exact, whatever rounding did above

    if dt == np.float32:
        return img.astype(np.float32)
    scale = 1.0 if dt == np.uint8 else 257.0
    return np.rint(np.clip(img, 0.0, 255.0) * scale).astype(dt)


def phantom_noisy(
    shape: tuple[int, int, int] = (32, 256, 256), seed: int = 0, spec: str = "poisson:4"
) -> tuple[np.ndarray, np.ndarray]:
    """A clean uint8 phantom and a noisy copy (independent noise per slice, seed ``seed + 1``).

    Parameters
    ----------
    shape
        ``(Z, Y, X)``.
    seed
        Seed of the phantom; the noise uses ``seed + 1``.
    spec
        Noise level, e.g. ``"poisson:4"`` or ``"gaussian:25"`` (see :mod:`nrrn_daemon.sim.noise`).

    Returns
    -------
    tuple
        ``(clean, noisy)``, both uint8 of ``shape``.
    """
    clean = make_phantom(shape, seed=seed, dtype=np.uint8)
    return clean, noisy_stack(clean, spec, seed=seed + 1)


def _resin_distance(y: np.ndarray, x: np.ndarray, ydim: int, xdim: int) -> np.ndarray:
    """Signed distance (px) from the resin's plane y/Y + x/X = RESIN_CORNER, positive inside."""
    norm = np.hypot(1.0 / ydim, 1.0 / xdim)
    return (np.asarray(y) / ydim + np.asarray(x) / xdim - RESIN_CORNER) / norm


def _coarse_shape(shape: tuple[int, ...], f: int) -> tuple[int, ...]:
    return tuple((n - 1) // f + 2 for n in shape)


def _smooth_field(
    shape: tuple[int, int, int], sigma: float, rng: np.random.Generator, coarse: int = COARSE
) -> np.ndarray:
    """Unit-std smooth noise: white noise on a coarse grid, blurred (σ in coarse px), upsampled."""
    small = rng.standard_normal(_coarse_shape(shape, coarse)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma, mode="wrap")
    small /= max(float(small.std()), 1e-6)
    return _upsample(small, shape, coarse)


def _upsample(small: np.ndarray, shape: tuple[int, int, int], f: int) -> np.ndarray:
    """Trilinear upsampling of a grid whose point i lies at full-resolution coordinate i·f."""
    out = small
    for axis, n in enumerate(shape):
        pos = np.arange(n, dtype=np.float32) / f
        i0 = pos.astype(np.intp)
        w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def _cell_seeds(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Seeds (N, 3) of the cells, their power weights (N,), and which are the large cells.

    Large cells come from a jittered grid of :data:`CELL_SPACING` with random weights, small ones
    (thin processes squeezed between them) are scattered uniformly with weight 0; the grid covers
    the volume plus one spacing of margin so no cell face is missing at the borders.
    """
    s = CELL_SPACING
    axes = [np.arange(-s, n + s + 1.0, s) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    big = grid + rng.uniform(-0.4 * s, 0.4 * s, grid.shape)
    lo, hi = -s, np.asarray(shape, dtype=float) + s
    small = rng.uniform(lo, hi, (len(grid), 3))
    seeds = np.concatenate([big, small])
    weights = np.concatenate([rng.uniform(0.0, 0.45 * s, len(grid)) ** 2, np.zeros(len(grid))])
    is_big = np.arange(len(seeds)) < len(grid)
    return seeds, weights, is_big


def _voronoi(
    seeds: np.ndarray, weights: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (px) to the nearest cell face, and the cell index, of every voxel.

    Cells are those of a power (Laguerre) diagram, ``argmin_i |x − s_i|² − w_i``, in coordinates
    warped by a smooth random displacement (wavy faces). The :data:`CANDIDATES` nearest seeds of
    every coarse-grid point are the candidates of the voxels around it; at full resolution the two
    best candidates give the cell and the exact distance to the plane between them,
    ``(p₂ − p₁) / (2 |s₂ − s₁|)`` with ``p = |x − s|² − w``. Computed slice by slice.
    """
    f = COARSE
    cshape = _coarse_shape(shape, f)
    pts = np.stack(np.meshgrid(*[np.arange(n) * f for n in cshape], indexing="ij"), -1)
    k = min(CANDIDATES, len(seeds))
    _, idx = cKDTree(seeds).query(pts.reshape(-1, 3).astype(np.float64), k=k)
    idx = idx.reshape(*cshape, k).astype(np.int32)
    warp = [WAVE_AMPLITUDE * _smooth_field(shape, 3.0, rng) for _ in range(3)]
    sz, sy, sx = (seeds[:, a].astype(np.float32) for a in range(3))
    w = weights.astype(np.float32)
    yy, xx = np.ogrid[: shape[1], : shape[2]]
    near_y = np.rint(np.arange(shape[1]) / f).astype(np.intp)[:, None]
    near_x = np.rint(np.arange(shape[2]) / f).astype(np.intp)[None, :]
    dist = np.empty(shape, dtype=np.float32)
    cell = np.empty(shape, dtype=np.int32)
    for z in range(shape[0]):
        cand = idx[int(round(z / f))][near_y, near_x]  # (Y, X, k)
        pz = z + warp[0][z]
        py = yy + warp[1][z]
        px = xx + warp[2][z]
        best = np.full(shape[1:], np.inf, dtype=np.float32)
        second = best.copy()
        i1 = np.zeros(shape[1:], dtype=np.int32)
        i2 = i1.copy()
        for j in range(k):
            c = cand[..., j]
            p = (pz - sz[c]) ** 2 + (py - sy[c]) ** 2 + (px - sx[c]) ** 2 - w[c]
            first = p < best
            mid = ~first & (p < second)
            second = np.where(first, best, np.where(mid, p, second))
            i2 = np.where(first, i1, np.where(mid, c, i2))
            best = np.where(first, p, best)
            i1 = np.where(first, c, i1)
        gap = np.sqrt((sz[i2] - sz[i1]) ** 2 + (sy[i2] - sy[i1]) ** 2 + (sx[i2] - sx[i1]) ** 2)
        dist[z] = (second - best) / (2.0 * np.maximum(gap, 1e-3))
        cell[z] = i1
    return dist, cell


def _box(
    centre: np.ndarray, radius: float, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """The volume's slices of a cube around ``centre`` and the coordinates relative to centre."""
    lo = np.maximum(np.floor(centre - radius).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radius).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    rel = [
        (np.arange(a, b, dtype=np.float32) - np.float32(c)).reshape(
            [-1 if i == ax else 1 for i in range(3)]
        )
        for ax, (a, b, c) in enumerate(zip(lo, hi, centre, strict=True))
    ]
    return sl, rel


def _organelles(img: np.ndarray, seeds: np.ndarray, rng: np.random.Generator) -> None:
    """Paint mitochondria and vesicle clusters in place, near cell seeds away from the resin."""
    for centre in seeds:
        kind = rng.random()
        offset = rng.normal(0.0, 4.0, 3)
        resin_dist = -float(_resin_distance(centre[1], centre[2], img.shape[1], img.shape[2]))
        if kind < 0.5 and resin_dist > 40:
            _mitochondrion(img, centre + offset, rng)
        elif kind < 0.8 and resin_dist > 25:
            for _ in range(int(rng.integers(8, 25))):
                r = rng.uniform(2.5, 4.5)
                _vesicle(img, centre + offset + rng.normal(0.0, 7.0, 3), r)


def _mitochondrion(img: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> None:
    """An ellipsoid with dark matrix, dark double outline and lamellar cristae across its length."""
    a, b, c = rng.uniform(15, 26), rng.uniform(7, 11), rng.uniform(7, 11)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # random orientation
    box = _box(centre, a + 3, img.shape)
    if box is None:
        return
    sl, (dz, dy, dx) = box
    u = [rot[0, k] * dz + rot[1, k] * dy + rot[2, k] * dx for k in range(3)]
    q = np.sqrt((u[0] / a) ** 2 + (u[1] / b) ** 2 + (u[2] / c) ** 2)
    edge = (q - 1.0) * min(b, c)  # ~px from the surface, negative inside
    inside = np.clip(0.5 - edge / 1.5, 0.0, 1.0)
    phase = rng.uniform(0, 2 * np.pi)
    period = rng.uniform(5.0, 8.0)
    cristae = np.cos(2 * np.pi * u[0] / period + 0.6 * np.sin(u[1] / 3.0) + phase) ** 8
    interior = MITO_MATRIX + (MITO_EDGE - MITO_MATRIX) * 0.8 * cristae
    outline = np.exp(-0.5 * ((edge + 1.0) / 0.9) ** 2)
    value = interior + (MITO_EDGE - interior) * outline
    region = img[sl]
    region += (value - region) * np.maximum(inside, outline)


def _vesicle(img: np.ndarray, centre: np.ndarray, r: float) -> None:
    """A hollow sphere: a dark shell of radius ``r`` around a slightly brighter lumen."""
    box = _box(centre, r + 2.5, img.shape)
    if box is None:
        return
    sl, (dz, dy, dx) = box
    d = np.sqrt(dz * dz + dy * dy + dx * dx) - r
    shell = np.exp(-0.5 * (d / 0.7) ** 2)
    region = img[sl]
    lumen = np.clip(-d, 0.0, 1.0)
    region += (CYTOPLASM + 15.0 - region) * lumen * 0.5
    region += (VESICLE - region) * shell
