"""Slice input for the daemon: read a slice TIFF completely, check it, split off its databar.

Reading decodes the whole image, so a file the microscope is still writing fails here rather than
being denoised half-empty: before decoding, every strip or tile must end inside the file and the
IFD chain must end cleanly (tifffile only logs a broken chain), and the decoded array must have the
shape the header announces.

A :class:`SliceImage` keeps what the output needs to look like its input: dtype, byte order,
photometric interpretation, colour map, every tag (:mod:`nrrn_daemon.imaging.tiffmeta`) and the
EXIF/GPS IFDs. Writing it back, atomically: :mod:`nrrn_daemon.imaging.tiffwrite`.

Palette images: ZEISS SmartSEM writes 8-bit palette TIFFs (photometric 3) whose colour map is a
grey ramp. Their pixel values are indices into that map; a map that is the same on R, G and B and
never decreases makes the indices grey levels in the same order, so they are denoised as they are
and written back with the same map. Any other palette is refused.

Where the image ends (``databar="auto"``): FEI/Thermo Fisher metadata says it (``[Image]
ResolutionY``, the image's height above the databar). ZEISS SmartSEM metadata (tag 34118,
``CZ_SEM``) does not. Its ``DP_IMAGE_STORE`` ("Store resolution = 1024 * 768") is the size of the
whole page: the public ZEISS samples (rosettasciio's test files) are pages of 1024 × 768,
512 × 384 and 2048 × 1536 px, SmartSEM store resolutions, and a sample's ``AP_HEIGHT`` is the
store's rows times the pixel size. A data zone that SmartSEM burns in is drawn over the bottom
rows of that image, and no tag gives its height. So under "auto" a ZEISS slice keeps every row;
crop a data zone with ``databar="rows"`` and its height.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from nrrn_daemon.errors import InputError
from nrrn_daemon.imaging.tiffifd import RawIfd
from nrrn_daemon.imaging.tiffmeta import (
    TagTuple,
    fei_metadata,
    kept_tags,
    pointer_ifds,
    raw_tag,
    text_of,
)

DatabarMode = Literal["none", "fei", "rows", "auto"]
DATABAR_MODES: tuple[str, ...] = ("none", "fei", "rows", "auto")
"""``"auto"``: crop where the file's own metadata says where the image ends (FEI
``[Image] ResolutionY`` smaller than the image), else keep every row."""

DENOISABLE_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint8), np.dtype(np.uint16))


@dataclass(frozen=True, eq=False)
class SliceImage:
    """One decoded slice: the pixels to denoise, the databar below them, and what to write back.

    Attributes
    ----------
    pixels : numpy.ndarray
        The image part, shape ``(height, width)``: what the network sees.
    databar : numpy.ndarray or None
        The rows below the image (the microscope's info strip), copied through unchanged.
    dtype : numpy.dtype
        The input's pixel type (uint8 or uint16); the output is written in it.
    full_shape : tuple of int
        Shape of the whole input image, databar included.
    tags : list of TagTuple
        Metadata tags to write back, in tifffile ``extratags`` format, values as raw bytes
        (resolution tags as tuples).
    fei : dict or None
        Parsed FEI metadata (``{"Image": {"ResolutionY": ...}, ...}``) when present.
    description : str or None
        The original ImageDescription.
    software : str or None
        The original Software tag (the output's names nrrn-daemon; this one goes into the
        description).
    byteorder : str
        ``"<"`` or ``">"``: the output keeps the input's byte order.
    photometric : int
        0 (min-is-white), 1 (min-is-black) or 3 (palette with a grey ramp): kept so viewers show
        the same grey levels.
    colormap : numpy.ndarray or None
        The palette (``(3, 2**bits)`` uint16) of a photometric-3 slice, written back unchanged.
    ifds : list of RawIfd
        The EXIF/GPS IFDs of the input, copied into the output as sub-IFDs.
    """

    pixels: np.ndarray
    databar: np.ndarray | None
    dtype: np.dtype
    full_shape: tuple[int, int]
    tags: list[TagTuple]
    fei: dict[str, Any] | None
    description: str | None
    byteorder: str = "<"
    photometric: int = 1
    software: str | None = None
    colormap: np.ndarray | None = None
    ifds: list[RawIfd] = field(default_factory=list)


@contextmanager
def open_tiff(path: Path, data: bytes | None = None) -> Iterator[tifffile.TiffFile]:
    """Open ``path`` with tifffile and check that its structure is complete.

    With ``data``, the file's bytes already read, nothing is read from disk; ``path`` only names
    the file in errors.

    Raises
    ------
    InputError
        Missing, unreadable, empty, not a TIFF, or truncated (see :func:`check_structure`).
    """
    path = Path(path)
    try:
        tif = tifffile.TiffFile(path if data is None else io.BytesIO(data), name=path.name)
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: file not found — check the path") from None
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a folder, not a TIFF file") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied — fix its permissions") from None
    except (tifffile.TiffFileError, ValueError, struct.error) as exc:
        raise InputError(
            f"cannot read {path}: not a TIFF file or a damaged one ({exc}) — pass TIFF slices as"
            " written by the microscope, or wait until it has finished writing"
        ) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror} — check the file") from None
    try:
        check_structure(tif, path)
        yield tif
    finally:
        tif.close()


def check_structure(tif: tifffile.TiffFile, path: Path) -> None:
    """Raise :class:`InputError` unless all page data lies inside the file and the IFD chain ends.

    Cheap: reads only IFDs, never pixel data.
    """
    size = tif.filehandle.size
    pages = tif.pages
    if len(pages) == 0:
        raise InputError(
            f"cannot read {path}: the TIFF holds no image (header only, {size} bytes) — the file is"
            " truncated or still being written; wait and retry, or re-export it"
        )
    for index, page in enumerate(pages):
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n]
        if not ends or max(ends) > size:
            end = max(ends) if ends else 0
            raise InputError(
                f"cannot read {path}: truncated TIFF (page {index} needs {end} bytes, the file has"
                f" {size}) — it may still be being written; wait and retry, or re-export it"
            )
    fh, fmt = tif.filehandle, tif.tiff
    last = pages[len(pages) - 1]
    fh.seek(last.offset)
    (ntags,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
    fh.seek(last.offset + fmt.tagnosize + ntags * fmt.tagsize)
    raw = fh.read(fmt.offsetsize)
    if len(raw) < fmt.offsetsize or struct.unpack(fmt.offsetformat, raw)[0] != 0:
        raise InputError(
            f"cannot read {path}: truncated TIFF (the chain of pages breaks after page"
            f" {len(pages) - 1}) — it may still be being written; wait and retry, or re-export it"
        )


def decode_page(tif: tifffile.TiffFile, index: int, path: Path) -> np.ndarray:
    """Decode page ``index`` fully and check it has the shape its header announces."""
    page = tif.pages[index]
    try:
        array = page.asarray()
    except Exception as exc:  # noqa: BLE001 - codec errors have no common base class
        raise InputError(
            f"cannot decode {path} (page {index}): {exc} — the file is truncated or corrupt;"
            " wait and retry, or re-export it"
        ) from None
    if array.shape != tuple(page.shape):
        raise InputError(
            f"cannot decode {path} (page {index}): got {array.shape} pixels, expected"
            f" {tuple(page.shape)} — the file is truncated or corrupt; re-export it"
        )
    return array


def is_grey_ramp(colormap: Any) -> bool:
    """Whether a TIFF colour map is a grey ramp: R = G = B, never decreasing, not constant."""
    cmap = np.asarray(colormap)
    if cmap.ndim != 2 or cmap.shape[0] != 3 or cmap.shape[1] < 2:
        return False
    grey = cmap[0].astype(np.int64)
    same = bool(np.array_equal(cmap[0], cmap[1]) and np.array_equal(cmap[0], cmap[2]))
    return same and bool(np.all(np.diff(grey) >= 0)) and int(grey[-1]) > int(grey[0])


def check_grey(page: Any, path: Path, *, allow_float: bool = False) -> np.dtype:
    """Raise :class:`InputError` unless ``page`` is one grey channel of a supported dtype.

    A palette page (photometric 3) counts as grey when its colour map is a grey ramp.
    """
    if page.samplesperpixel != 1 or len(page.shape) != 2:
        raise InputError(
            f"cannot use {path}: its pages are {tuple(page.shape)} with {page.samplesperpixel}"
            " samples per pixel (RGB?), expected one grey channel — export grey-level slices"
        )
    if int(page.photometric) == 3 and not is_grey_ramp(page.colormap):
        raise InputError(
            f"cannot use {path}: its pixels are colour-mapped (photometric 3) with a colour"
            " palette, not a grey ramp (R = G = B, increasing) — export grey-level slices"
        )
    if int(page.photometric) not in (0, 1, 3):
        raise InputError(
            f"cannot use {path}: its pixels are colour-mapped (photometric"
            f" {int(page.photometric)}), expected grey levels — export grey-level slices"
        )
    dtype = np.dtype(page.dtype)
    allowed = DENOISABLE_DTYPES + ((np.dtype(np.float32),) if allow_float else ())
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise InputError(
            f"cannot use {path}: pixel type {dtype} is not supported ({names} are) — convert the"
            " data to 8 or 16 bit"
        )
    return dtype


def read_slice(path: Path, databar: DatabarMode = "none", databar_rows: int = 0) -> SliceImage:
    """Read one slice TIFF completely and split off its databar.

    Parameters
    ----------
    path : Path
        A single-page, single-channel uint8 or uint16 TIFF.
    databar : {"none", "fei", "rows", "auto"}
        ``"fei"``: the image is the top ``[Image] ResolutionY`` rows of the FEI metadata, the
        rest is the databar. ``"rows"``: the bottom ``databar_rows`` rows are the databar.
        ``"auto"``: as ``"fei"`` when the file's metadata says where the image ends, else
        ``"none"``.
    databar_rows : int
        Databar height for ``databar="rows"``.

    Returns
    -------
    SliceImage

    Raises
    ------
    InputError
        Missing, not a TIFF, truncated, multi-page, RGB, unsupported dtype, or a databar that does
        not fit the image.
    """
    path = Path(path)
    check_databar_mode(databar)
    with open_tiff(path) as tif:
        return slice_from_tiff(tif, path, databar, databar_rows)


def check_databar_mode(databar: str) -> None:
    """Raise ValueError unless ``databar`` is one of the :data:`DatabarMode` values."""
    if databar not in DATABAR_MODES:
        raise ValueError(f"databar must be 'none', 'fei', 'rows' or 'auto', got {databar!r}")


def slice_from_tiff(
    tif: tifffile.TiffFile, path: Path, databar: str, databar_rows: int
) -> SliceImage:
    """The one slice of an opened (structure-checked) TIFF, its databar split off."""
    if len(tif.pages) != 1:
        raise InputError(
            f"cannot use {path} as one slice: it has {len(tif.pages)} pages — the daemon"
            " expects one slice per file; denoise stacks with the offline command"
        )
    page = tif.pages[0]
    dtype = check_grey(page, path)
    full = decode_page(tif, 0, path)
    tags = kept_tags(tif, page)
    fei = fei_metadata(page)
    description = text_of(raw_tag(tif, page, 270)) if 270 in page.tags else None
    software = text_of(raw_tag(tif, page, 305)) if 305 in page.tags else None
    height = _image_height(path, full.shape, databar, databar_rows, fei)
    return SliceImage(
        pixels=full[:height],
        databar=full[height:] if height < full.shape[0] else None,
        dtype=dtype,
        full_shape=(int(full.shape[0]), int(full.shape[1])),
        tags=tags,
        fei=fei,
        description=description,
        software=software,
        byteorder=tif.byteorder,
        photometric=int(page.photometric),
        colormap=np.array(page.colormap, np.uint16) if int(page.photometric) == 3 else None,
        ifds=pointer_ifds(tif, page),
    )


def page_image(tif: tifffile.TiffFile, index: int, path: Path) -> SliceImage:
    """Page ``index`` of a multi-page stack as a slice to write back on its own: its pixels, dtype,
    byte order, photometric interpretation and palette (a ZEISS grey ramp stays one); no tags,
    no databar (the pages of a stack have none)."""
    page = tif.pages[index]
    dtype = check_grey(page, path)
    pixels = decode_page(tif, index, path)
    photometric = int(page.photometric)
    return SliceImage(
        pixels=pixels, databar=None, dtype=dtype, full_shape=(pixels.shape[0], pixels.shape[1]),
        tags=[], fei=None, description=None, byteorder=tif.byteorder, photometric=photometric,
        colormap=np.array(page.colormap, np.uint16) if photometric == 3 else None,
    )  # fmt: skip


def slice_is_complete(path: Path, data: bytes | None = None) -> tuple[bool, str]:
    """Whether ``path`` is a whole slice TIFF that decodes fully, and why not.

    ``data``: the file's bytes, when already read (nothing is read from disk then).

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` or ``(False, reason)`` where reason is a one-line explanation.
    """
    try:
        with open_tiff(Path(path), data) as tif:
            for index in range(len(tif.pages)):
                decode_page(tif, index, Path(path))
    except InputError as exc:
        return False, str(exc)
    return True, ""


def _image_height(
    path: Path, shape: tuple[int, ...], mode: str, rows: int, fei: dict[str, Any] | None
) -> int:
    height = int(shape[0])
    if mode == "auto":
        res_y = _fei_height(fei)
        return res_y if res_y is not None and 0 < res_y < height else height
    if mode == "none":
        return height
    if mode == "rows":
        if not 0 <= rows < height:
            raise InputError(
                f"cannot split the databar of {path}: {rows} databar rows do not fit an image of"
                f" {height} rows — set databar_rows between 0 and {height - 1}"
            )
        return height - rows
    res_y = _fei_height(fei)
    if res_y is None or res_y <= 0:
        raise InputError(
            f"cannot split the databar of {path}: no FEI metadata with [Image] ResolutionY (tag"
            " 34682/34680) — use databar='rows' with the databar height, or databar='none'"
        )
    if res_y > height:
        raise InputError(
            f"cannot split the databar of {path}: FEI ResolutionY={res_y} but the image has only"
            f" {height} rows — the metadata does not match; use databar='rows' or 'none'"
        )
    return res_y


def _fei_height(fei: dict[str, Any] | None) -> int | None:
    """``[Image] ResolutionY`` of FEI metadata (the image's height above the databar), or None."""
    image = (fei or {}).get("Image", {})
    res_y = image.get("ResolutionY") if isinstance(image, dict) else None
    return res_y if isinstance(res_y, int) and not isinstance(res_y, bool) else None


__all__ = [
    "DATABAR_MODES",
    "DENOISABLE_DTYPES",
    "DatabarMode",
    "SliceImage",
    "check_databar_mode",
    "check_grey",
    "check_structure",
    "decode_page",
    "is_grey_ramp",
    "open_tiff",
    "page_image",
    "read_slice",
    "slice_from_tiff",
    "slice_is_complete",
]
