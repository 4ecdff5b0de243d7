"""TIFF metadata a slice keeps from input to output: which tags, as which bytes. Pure helpers.

Used by :mod:`nrrn_daemon.imaging.tiff` when it reads a slice (collect the tags) and writes its
output (hand them back to tifffile). The decisions:

- Every tag of the input's first page is kept, with the same value, except those that describe
  the pixel layout, which tifffile writes itself for the uncompressed output (:data:`LAYOUT_TAGS`:
  size, bit depth, compression, strips/tiles, photometric, colour map...), the ImageDescription
  and the Software tag (which names nrrn-daemon and its version). Private vendor tags (FEI
  34680/34682/34683, ZEISS 34118 and any other) are copied from the raw bytes of the input file,
  not from tifffile's parsed values, so they stay byte-identical. An ASCII tag without a
  terminating NUL would get one appended by tifffile; for the SEM tags the value is then written
  as UNDEFINED (same bytes, same count) so the bytes still match.
- The EXIF, GPS (and Interoperability) IFDs are copied entry by entry as sub-IFDs
  (:mod:`nrrn_daemon.imaging.tiffifd`); the main IFD holds a placeholder tifffile writes.
- Resolution (282/283/296) goes through tifffile's ``resolution`` arguments (tifffile always writes
  those tags itself); the value is kept, a non-reduced fraction such as 72/2 is stored reduced.
- ImageDescription (270) becomes the caller's description; an original description is kept after it
  (see :mod:`nrrn_daemon.imaging.provenance`), so the first line a viewer shows says what was done
  and nothing of the original is lost.
"""

from __future__ import annotations

import struct
from typing import Any

import tifffile

from nrrn_daemon.imaging.tiffifd import CLASSIC_DTYPES, POINTER_TAGS, RawIfd, read_pointer_ifd

TagTuple = tuple[int, int, int, Any, bool]
"""One tag in tifffile's ``extratags`` format: (code, dtype, count, value, writeonce)."""

SEM_TAGS = frozenset({34118, 34680, 34682, 34683})
"""ZEISS CZ_SEM, FEI_SFEG, FEI_HELIOS, FEI_TITAN (Helios G4 writes it beside 34680/34682):
vendor metadata that must stay byte-identical."""
LAYOUT_TAGS = frozenset(
    {256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 288, 289, 317, 320, 322, 323, 324}
    | {325, 330, 338, 339, 340, 341, 347, 513, 514, 530, 531, 532, 32997, 32998}
)
"""Tags that describe how the pixels are stored (size, BitsPerSample, Compression, Photometric,
FillOrder, strips, tiles, SubIFDs, SampleFormat, ColorMap, JPEG/YCbCr...): tifffile writes the
output's own; the values that carry meaning (size, bit depth, photometric, colour map) are the
input's by construction."""
REPLACED_TAGS = frozenset({270, 305})
"""ImageDescription (what was done, the original kept inside it) and Software (nrrn-daemon)."""
RESOLUTION_TAGS = frozenset({282, 283, 296})
"""X/YResolution, ResolutionUnit: written through tifffile's ``resolution`` arguments."""


def fei_metadata(page: Any) -> dict[str, Any] | None:
    """Parsed FEI metadata (tags 34680/34682) of a page, or None."""
    result: dict[str, Any] = {}
    for code in (34680, 34682):
        value = page.tags.valueof(code)
        if isinstance(value, dict):
            result.update(value)
    return result or None


def raw_tag(tif: tifffile.TiffFile, page: Any, code: int) -> bytes:
    """The tag's value bytes exactly as stored in the file."""
    tag = page.tags[code]
    size = tag.count * struct.calcsize(tifffile.TIFF.DATA_FORMATS[int(tag.dtype)])
    tif.filehandle.seek(tag.valueoffset)
    return tif.filehandle.read(size)


def kept_tags(tif: tifffile.TiffFile, page: Any) -> list[TagTuple]:
    """Every tag of a page but the layout, replaced and pointer tags, in ``extratags`` format.

    Values are the raw bytes as stored (resolution tags as tuples). Pointer tags (EXIF, GPS) are
    left to :func:`pointer_ifds`.
    """
    tags: list[TagTuple] = []
    for tag in page.tags.values():
        code, dtype = tag.code, int(tag.dtype)
        if code in LAYOUT_TAGS or code in REPLACED_TAGS or code in POINTER_TAGS or dtype == 13:
            continue
        if dtype not in CLASSIC_DTYPES:
            continue  # a BigTIFF-only type: the output is a classic TIFF
        if code in RESOLUTION_TAGS:
            value = tag.value
            tags.append((code, dtype, tag.count, tuple(value) if code != 296 else int(value), True))
            continue
        raw = raw_tag(tif, page, code)
        if dtype == 2 and code in SEM_TAGS and not raw.endswith(b"\x00"):
            dtype = 7  # keep bytes and count identical: tifffile would append a NUL to ASCII
        tags.append((code, dtype, tag.count, raw, True))
    return tags


def pointer_ifds(tif: tifffile.TiffFile, page: Any) -> list[RawIfd]:
    """The EXIF, GPS and Interoperability IFDs a page points to, as raw entries."""
    ifds: list[RawIfd] = []
    for tag in page.tags.values():
        code, dtype = tag.code, int(tag.dtype)
        if code not in POINTER_TAGS and dtype != 13:
            continue
        if code == 330:
            continue  # image sub-IFDs (thumbnails, pyramids): pixel data, not metadata
        fh, fmt = tif.filehandle, tif.tiff
        fh.seek(tag.offset + 4 + fmt.offsetsize)  # the entry's value field: the IFD's offset
        (offset,) = struct.unpack(tif.byteorder + fmt.offsetformat[1:], fh.read(fmt.offsetsize))
        ifds.append(read_pointer_ifd(tif, code, dtype if dtype in (4, 13) else 4, offset))
    return ifds


def placeholders(codes: list[int]) -> list[TagTuple]:
    """One 1-count LONG per pointer IFD, for ``extratags`` (made the pointer by ``append_ifds``)."""
    return [(code, 4, 1, 0, True) for code in codes]


def split_resolution(
    tags: list[TagTuple],
) -> tuple[list[TagTuple], tuple[tuple[int, int], tuple[int, int]] | None, int | None]:
    """Split kept tags into (extratags, resolution, resolution unit) for ``tifffile.imwrite``."""
    by_code = {t[0]: t for t in tags}
    extra = [t for t in tags if t[0] not in (282, 283, 296)]
    resolution = None
    if 282 in by_code or 283 in by_code:
        x = by_code.get(282, (0, 0, 0, (1, 1), True))[3]
        y = by_code.get(283, (0, 0, 0, (1, 1), True))[3]
        resolution = ((int(x[0]), int(x[1]) or 1), (int(y[0]), int(y[1]) or 1))
    unit = int(by_code[296][3]) if 296 in by_code else None
    return extra, resolution, unit


def text_of(raw: bytes) -> str:
    """A raw ASCII tag value as text; bytes that are not UTF-8 round-trip (surrogateescape)."""
    return raw.rstrip(b"\x00").decode("utf-8", "surrogateescape")
