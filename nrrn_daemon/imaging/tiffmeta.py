"""TIFF metadata a slice keeps from input to output: which tags, as which bytes. Pure helpers.

Used by :mod:`nrrn_daemon.imaging.tiff` when it reads a slice (collect the tags) and writes its
output (hand them back to tifffile). The decisions:

- Kept tags (:data:`KEPT_TAGS`) are copied from the raw bytes of the input file, not from
  tifffile's parsed values, so FEI (34680/34682) and ZEISS (34118) tags stay byte-identical. An
  ASCII tag without a terminating NUL would get one appended by tifffile; for those SEM tags only,
  the value is then written as UNDEFINED (same bytes, same count) so the bytes still match.
- Resolution (282/283/296) goes through tifffile's ``resolution`` arguments (tifffile always writes
  those tags itself); the value is kept, a non-reduced fraction such as 72/2 is stored reduced.
- ImageDescription (270) becomes the caller's description; an original description is kept after it,
  behind :data:`ORIGINAL_DESCRIPTION_MARKER` (see :func:`split_description`), so the first line a
  viewer shows says what was done and nothing of the original is lost.
"""

from __future__ import annotations

import struct
from typing import Any

import tifffile

TagTuple = tuple[int, int, int, Any, bool]
"""One tag in tifffile's ``extratags`` format: (code, dtype, count, value, writeonce)."""

SEM_TAGS = frozenset({34118, 34680, 34682})
"""ZEISS CZ_SEM, FEI_SFEG, FEI_HELIOS: vendor metadata that must stay byte-identical."""
KEPT_TAGS = frozenset({269, 271, 272, 282, 283, 285, 296, 305, 306, 315, 316, 33432} | SEM_TAGS)
"""DocumentName, Make, Model, X/YResolution, PageName, ResolutionUnit, Software, DateTime, Artist,
HostComputer, Copyright and the SEM tags. ImageDescription (270) is handled separately."""
ORIGINAL_DESCRIPTION_MARKER = "\n\n--- original ImageDescription ---\n"


def split_description(text: str) -> tuple[str, str | None]:
    """Split an ImageDescription written here into (our description, the original or None)."""
    ours, marker, original = text.partition(ORIGINAL_DESCRIPTION_MARKER)
    return ours, (original if marker else None)


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
    """The :data:`KEPT_TAGS` of a page, in ``extratags`` format (values as raw bytes)."""
    tags: list[TagTuple] = []
    for tag in page.tags.values():
        code, dtype = tag.code, int(tag.dtype)
        if code not in KEPT_TAGS:
            continue
        if code in (282, 283, 296):
            value = tag.value
            tags.append((code, dtype, tag.count, tuple(value) if code != 296 else int(value), True))
            continue
        raw = raw_tag(tif, page, code)
        if dtype == 2 and code in SEM_TAGS and not raw.endswith(b"\x00"):
            dtype = 7  # keep bytes and count identical: tifffile would append a NUL to ASCII
        tags.append((code, dtype, tag.count, raw, True))
    return tags


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
