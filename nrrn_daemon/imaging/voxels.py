"""Voxel size of a FIB-SEM stack: from its TIFF metadata, or given as ``Z,Y,X`` nanometres.

The OME-Zarr volume (:mod:`nrrn_daemon.imaging.omezarr`) records it so viewers show the stack in
physical units. Sources, in order: ImageJ metadata, FEI/Helios ``[Scan] PixelWidth``, ZEISS
``ap_image_pixel_size``, TIFF resolution tags in centimetres; none of the microscope formats
records the slice thickness, so z falls back to the pixel width (with a warning).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrrn_daemon.errors import InputError
from nrrn_daemon.imaging.tiff import open_tiff

log = logging.getLogger("nrrn_daemon")

_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "micron": 1e3,
            "micrometer": 1e3, "\\u00B5m": 1e3, "mm": 1e6, "millimeter": 1e6, "pm": 1e-3,
            "m": 1e9, "meter": 1e9}  # fmt: skip


@dataclass(frozen=True)
class VoxelSize:
    """Physical size of one voxel, ``z`` (slice spacing), ``y`` and ``x``.

    ``unit`` is ``"nanometer"`` when known from metadata or given, ``None`` when unknown (sizes
    are then 1 and viewers show pixels); ``source`` says where the numbers came from.
    """

    z: float
    y: float
    x: float
    unit: str | None = "nanometer"
    source: str = "given"

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v > 0 for v in (self.z, self.y, self.x)):
            raise InputError(
                f"voxel size must be three positive numbers, got {self.z},{self.y},{self.x} — "
                "pass --voxel-size Z,Y,X in nanometres"
            )

    def zyx(self) -> list[float]:
        return [float(self.z), float(self.y), float(self.x)]


UNKNOWN_VOXEL = VoxelSize(1.0, 1.0, 1.0, unit=None, source="unknown")


def parse_voxel_size(text: str) -> VoxelSize:
    """``"Z,Y,X"`` in nanometres (``--voxel-size 10,5,5``) → :class:`VoxelSize`."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise InputError(
            f"--voxel-size takes three comma-separated numbers Z,Y,X in nanometres, got {text!r}"
        )
    return VoxelSize(*values, unit="nanometer", source="--voxel-size")


def voxel_size_from_tiff(path: Path) -> VoxelSize:
    """The voxel size recorded in a slice or stack TIFF, in nanometres.

    Read, in this order: ImageJ metadata (``unit``, ``spacing`` for z, resolution tags for XY),
    FEI/Helios ``[Scan] PixelWidth/PixelHeight`` (metres), ZEISS ``ap_image_pixel_size``, and
    resolution tags in centimetres. (Resolution tags in inches are ignored: 72 dpi is a writer's
    default, not a measurement.) No slice spacing in the metadata: z is taken equal to x
    (FIB-SEM is usually milled at the pixel size), with a warning. Nothing at all: 1 for every
    axis, no unit, and a warning.
    """
    with open_tiff(path) as tif:
        page = tif.pages[0]
        imagej = tif.imagej_metadata or {}
        tags = {code: page.tags.valueof(code) for code in (282, 283, 296, 34118, 34680, 34682)}
    xy: tuple[float, float] | None = None
    z: float | None = None
    source = ""
    unit_nm = _UNIT_NM.get(str(imagej.get("unit", "")).strip())
    if unit_nm is not None:
        xy = _from_resolution(tags[283], tags[282], unit_nm)
        spacing = imagej.get("spacing")
        if isinstance(spacing, int | float) and spacing > 0:
            z = float(spacing) * unit_nm
        source = "ImageJ metadata"
    for code in (34682, 34680):
        scan = tags[code].get("Scan", {}) if isinstance(tags[code], dict) else {}
        width, height = scan.get("PixelWidth"), scan.get("PixelHeight", scan.get("PixelWidth"))
        if xy is None and isinstance(width, int | float) and width > 0:
            xy, source = (float(height) * 1e9, float(width) * 1e9), "FEI metadata"
    zeiss = tags[34118] if isinstance(tags[34118], dict) else {}
    pixel = zeiss.get("ap_image_pixel_size")
    if xy is None and isinstance(pixel, tuple) and len(pixel) == 3 and pixel[2] in _UNIT_NM:
        size = float(pixel[1]) * _UNIT_NM[pixel[2]]
        xy, source = (size, size), "ZEISS metadata"
    if xy is None and tags[296] == 3:  # pixels per centimetre
        xy, source = _from_resolution(tags[283], tags[282], 1e7), "TIFF resolution tags"
    if xy is None:
        log.warning(
            "%s records no pixel size: the OME-Zarr voxel size is 1 (no unit) — pass "
            "--voxel-size Z,Y,X in nanometres",
            path,
        )
        return UNKNOWN_VOXEL
    if z is None:
        log.warning(
            "%s records no slice spacing: z is taken equal to the pixel width (%.4g nm) — pass "
            "--voxel-size Z,Y,X if the slices are thicker or thinner",
            path,
            xy[1],
        )
        z = xy[1]
    return VoxelSize(z, xy[0], xy[1], unit="nanometer", source=source)


def _from_resolution(y_res: Any, x_res: Any, unit_nm: float) -> tuple[float, float] | None:
    """Pixel height and width in nm from (numerator, denominator) pixels per unit."""
    try:
        y = x_res if y_res is None else y_res
        sizes = (y[1] / y[0] * unit_nm, x_res[1] / x_res[0] * unit_nm)
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    return sizes if all(math.isfinite(s) and s > 0 for s in sizes) else None
