"""OME-Zarr volumes of denoised slices, written one z-slice at a time, for napari and neuroglancer.

Format: OME-NGFF 0.5 on Zarr v3 — a group whose ``zarr.json`` holds ``attributes.ome``
(``version``, ``multiscales`` with axes z/y/x, their units and one ``scale`` + ``translation``
per level) and one array per pyramid level, ``"0"`` (full size) to ``"L-1"``.

Why the layout is what it is:

- **A z-slice is the unit of writing.** Each level is sharded with a shard of one z-slice
  (``(1, Y, X)`` rounded up to the inner chunk) holding ``(1, 512, 512)`` inner chunks, so one
  slice is one file per level, and two writers (Dask workers) never write the same file unless
  they write the same slice. Zarr's local store writes each file to a temporary name and renames
  it, so a killed writer leaves no half-written shard.
- **The pyramid is downsampled in XY only** (2×2 mean per level, z spacing unchanged), so level
  ``k`` of slice ``z`` depends on slice ``z`` alone: writing slices in any order, in any number
  of processes, gives the same pyramid. Each level's pixel centre moves by half the coarser
  pixel, which the per-level ``translation`` records so the levels overlay exactly.
- **A growing stack** (:class:`LiveVolume`) resizes the z extent before writing past it; the
  group metadata does not depend on the extent, and slices not written yet read as 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from nrrn_daemon import __version__
from nrrn_daemon.errors import OutputError
from nrrn_daemon.imaging.voxels import UNKNOWN_VOXEL, VoxelSize

NGFF_VERSION = "0.5"
CHUNK_XY = 512
"""Side of the inner chunks a viewer reads (one 512×512 tile of one slice)."""
MIN_LEVEL_SIDE = 256
"""The automatic pyramid stops once the coarsest level's longer side is at most this."""
MAX_LEVELS = 10
WRITE_CONFIG = {"write_empty_chunks": True}
"""Store a slice that is all zeros too: a missing shard means "not written yet"."""

# -- the pyramid (pure) -------------------------------------------------------------------------


def auto_levels(slice_shape: tuple[int, int], min_side: int = MIN_LEVEL_SIDE) -> int:
    """Levels so that the coarsest one's longer side is at most ``min_side`` (at least 1)."""
    side, levels = max(slice_shape), 1
    while side > min_side and levels < MAX_LEVELS:
        side, levels = math.ceil(side / 2), levels + 1
    return levels


def level_shapes(slice_shape: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """The XY shape of each level: each one half the previous one, rounded up."""
    shapes = [tuple(int(s) for s in slice_shape)]
    for _ in range(levels - 1):
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    return shapes  # type: ignore[return-value]


def downsample2(image: np.ndarray) -> np.ndarray:
    """Mean of each 2×2 block (an odd last row/column is repeated), rounded, same dtype."""
    h, w = image.shape
    padded = np.pad(image, ((0, h % 2), (0, w % 2)), mode="edge").astype(np.uint32)
    total = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((total + 2) // 4).astype(image.dtype)


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``[image, downsample2(image), ...]``: ``levels`` arrays."""
    out = [image]
    for _ in range(levels - 1):
        out.append(downsample2(out[-1]))
    return out


def multiscales(name: str, voxel: VoxelSize, levels: int) -> dict[str, Any]:
    """The NGFF 0.5 ``multiscales`` entry: axes with units, one scale+translation per level."""
    axes = [{"name": a, "type": "space"} for a in ("z", "y", "x")]
    if voxel.unit:
        for axis in axes:
            axis["unit"] = voxel.unit
    datasets = []
    for k in range(levels):
        f = 2**k
        scale = [float(voxel.z), float(voxel.y * f), float(voxel.x * f)]
        shift = [0.0, (f - 1) / 2 * voxel.y, (f - 1) / 2 * voxel.x]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if k:
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    return {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": "mean",
        "metadata": {
            "description": "2x2 mean in y and x per level; z is never downsampled",
            "method": "nrrn_daemon.imaging.omezarr.downsample2",
            "version": __version__,
        },
    }


# -- the volume ---------------------------------------------------------------------------------


class OmeZarrVolume:
    """One OME-Zarr image of ``(z, y, x)`` slices with an XY pyramid; see the module docstring.

    Create with :meth:`create`, open with :meth:`open`. Safe to write from several processes at
    once as long as each z-slice has one writer at a time; :meth:`write_slice` of the same pixels
    twice writes the same bytes.
    """

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        ome = dict(group.attrs).get("ome", {})
        self.multiscale: dict[str, Any] = ome["multiscales"][0]
        self.levels = len(self.multiscale["datasets"])
        self._arrays = [_array(group, str(k)).with_config(WRITE_CONFIG) for k in range(self.levels)]
        scale = self.multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
        unit = self.multiscale["axes"][0].get("unit")
        self.voxel_size = VoxelSize(*scale, unit=unit, source=str(path))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(depth, height, width)`` of level 0."""
        return tuple(int(s) for s in self._arrays[0].shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._arrays[0].dtype)

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        depth: int,
        slice_shape: tuple[int, int],
        dtype: Any,
        voxel_size: VoxelSize = UNKNOWN_VOXEL,
        levels: int | None = None,
        name: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> OmeZarrVolume:
        """Create a new volume at ``path`` (which must not exist) and return it.

        ``levels`` defaults to :func:`auto_levels`; ``extra`` goes to the group's
        ``nrrn_daemon`` attribute (who wrote it, from what).

        Raises
        ------
        OutputError
            ``path`` exists, or cannot be written.
        """
        path = Path(path)
        if path.exists():
            raise OutputError(f"cannot create OME-Zarr volume {path}: it already exists")
        levels = levels or auto_levels(slice_shape)
        try:
            group = zarr.open_group(path, mode="w-", zarr_format=3)
            for k, (h, w) in enumerate(level_shapes(slice_shape, levels)):
                chunk = (1, min(CHUNK_XY, h), min(CHUNK_XY, w))
                shard = (1, _round_up(h, chunk[1]), _round_up(w, chunk[2]))
                group.create_array(
                    str(k), shape=(depth, h, w), chunks=chunk, shards=shard, dtype=dtype,
                    fill_value=0, dimension_names=["z", "y", "x"], config=WRITE_CONFIG,
                )  # fmt: skip
            group.attrs.update(
                {
                    "ome": {
                        "version": NGFF_VERSION,
                        "multiscales": [multiscales(name or path.stem, voxel_size, levels)],
                    },
                    "nrrn_daemon": {"software": f"nrrn-daemon {__version__}", **(extra or {})},
                }
            )
        except OSError as exc:
            raise OutputError(
                f"cannot create OME-Zarr volume {path}: {exc.strerror or exc} — check the folder"
                " and free space"
            ) from None
        return cls(path, group)

    @classmethod
    def open(cls, path: Path) -> OmeZarrVolume:
        """Open a volume written by :meth:`create`.

        Raises
        ------
        OutputError
            ``path`` is missing, or not an OME-Zarr image of this layout.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            what = "does not exist" if not path.exists() else "is not a Zarr v3 group"
            raise OutputError(
                f"{path} {what} — give a volume written by nrrn-daemon, or a new path"
            )
        try:
            group = zarr.open_group(path, mode="r+", zarr_format=3)
            ome = dict(group.attrs).get("ome") or {}
            datasets = ome["multiscales"][0]["datasets"]
            if ome.get("version") != NGFF_VERSION or not datasets:
                raise KeyError("version")
            volume = cls(path, group)
        except (KeyError, IndexError, TypeError, ValueError, zarr.errors.BaseZarrError) as exc:
            raise OutputError(
                f"{path} is not an OME-Zarr {NGFF_VERSION} volume written by nrrn-daemon "
                f"({type(exc).__name__}: {exc}) — give another path or move it aside"
            ) from None
        return volume

    def check_compatible(self, slice_shape: tuple[int, int], dtype: Any) -> None:
        """Raise :class:`OutputError` unless slices of this shape and dtype fit the volume."""
        shape, want = self.shape[1:], tuple(int(s) for s in slice_shape)
        if shape != want or self.dtype != np.dtype(dtype):
            raise OutputError(
                f"{self.path} holds {shape[0]}×{shape[1]} {self.dtype} slices, these are "
                f"{want[0]}×{want[1]} {np.dtype(dtype)} — give another --zarr path or move it aside"
            )

    def resize_depth(self, depth: int) -> None:
        """Change the number of z-slices of every level (slices beyond it are dropped)."""
        for array in self._arrays:
            array.resize((depth, *array.shape[1:]))

    def write_slice(self, z: int, pixels: np.ndarray) -> None:
        """Write one z-slice at every level (level 0 is ``pixels``; the others its pyramid).

        Raises
        ------
        ValueError
            ``z`` is outside the volume, or ``pixels`` has the wrong shape or dtype.
        OutputError
            The files cannot be written.
        """
        depth = self.shape[0]
        if not 0 <= z < depth:
            raise ValueError(f"z {z} is outside the volume's {depth} slices")
        if pixels.shape != self.shape[1:] or pixels.dtype != self.dtype:
            raise ValueError(
                f"slice is {pixels.shape} {pixels.dtype}, the volume is {self.shape[1:]} "
                f"{self.dtype}"
            )
        try:
            for array, level in zip(self._arrays, pyramid(pixels, self.levels), strict=True):
                array[z] = level
        except OSError as exc:
            raise OutputError(
                f"cannot write slice {z} of {self.path}: {exc.strerror or exc} — free space or "
                "fix permissions, then run again"
            ) from None

    def has_slice(self, z: int) -> bool:
        """Whether slice ``z`` was written at every level (its shard files exist)."""
        if not 0 <= z < self.shape[0]:
            return False
        for k, array in enumerate(self._arrays):
            key = array.metadata.encode_chunk_key((z, 0, 0))
            if not (self.path / str(k) / key).is_file():
                return False
        return True

    def read(self, level: int = 0) -> np.ndarray:
        """The whole level as one array (for tests and small volumes)."""
        return np.asarray(self._arrays[level][...])


class LiveVolume:
    """The growing OME-Zarr volume of the data set being acquired: one call per denoised slice.

    Opens the volume at ``path`` when it exists (and fits ``slice_shape``/``dtype``), else creates
    it empty (depth 0). :meth:`write_slice` puts slice ``index`` at ``z = index - index_offset``
    and grows the z extent first when needed, so slices can come in any order; the pyramid and
    the metadata stay consistent after every call. One process writes a live volume.

    Raises
    ------
    OutputError
        ``path`` exists and is not a compatible volume, or cannot be created.
    """

    def __init__(
        self,
        path: Path,
        *,
        slice_shape: tuple[int, int],
        dtype: Any,
        voxel_size: VoxelSize = UNKNOWN_VOXEL,
        levels: int | None = None,
        index_offset: int = 0,
        name: str | None = None,
    ) -> None:
        path = Path(path)
        if path.exists():
            self.volume = OmeZarrVolume.open(path)
            self.volume.check_compatible(slice_shape, dtype)
            recorded = dict(self.volume._group.attrs).get("nrrn_daemon", {})
            self.index_offset = int(recorded.get("index_offset", index_offset))
        else:
            self.volume = OmeZarrVolume.create(
                path, depth=0, slice_shape=slice_shape, dtype=dtype, voxel_size=voxel_size,
                levels=levels, name=name, extra={"index_offset": index_offset, "live": True},
            )  # fmt: skip
            self.index_offset = index_offset

    @property
    def path(self) -> Path:
        return self.volume.path

    @property
    def depth(self) -> int:
        """Number of z-slices (the highest written ``z`` + 1)."""
        return self.volume.shape[0]

    def write_slice(self, index: int, pixels: np.ndarray) -> int:
        """Write the denoised slice ``index`` (its pyramid too); return its ``z``.

        Raises
        ------
        ValueError
            ``index`` is below ``index_offset``, or the pixels do not fit the volume.
        OutputError
            The files cannot be written.
        """
        z = int(index) - self.index_offset
        if z < 0:
            raise ValueError(
                f"slice index {index} is below the volume's index offset {self.index_offset}"
            )
        if pixels.shape != self.volume.shape[1:] or pixels.dtype != self.volume.dtype:
            raise ValueError(
                f"slice is {pixels.shape} {pixels.dtype}, the volume is {self.volume.shape[1:]} "
                f"{self.volume.dtype}"
            )
        if z >= self.depth:
            self.volume.resize_depth(z + 1)
        self.volume.write_slice(z, pixels)
        return z

    def append(self, pixels: np.ndarray) -> int:
        """Write ``pixels`` as the next slice after the deepest one; return its ``z``."""
        return self.write_slice(self.index_offset + self.depth, pixels)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _array(group: zarr.Group, name: str) -> zarr.Array:
    array = group[name]
    if not isinstance(array, zarr.Array):
        raise TypeError(f"{name} is a group, not an array")
    return array
