"""Raw copies of a TIFF's pointer IFDs (EXIF 34665, GPS 34853, Interoperability 40965).

tifffile writes image IFDs (and image sub-IFDs) but not the EXIF or GPS IFDs a camera-style TIFF
points to. Those are plain tag directories, so they are copied entry by entry, value bytes as
stored: :func:`read_pointer_ifd` reads one (and the IFDs it points to) from the input,
:func:`append_ifds` appends them to a classic TIFF that tifffile has just rendered, in that file's
byte order (the input's: values are copied as bytes, so byte order must not change), and points
the main IFD at them. tifffile refuses to write the pointer tags themselves, so the main IFD gets
a placeholder under a free private code (:func:`placeholder_codes`), renamed and re-sorted here.
Pure byte work on a buffer; no file is opened here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import tifffile

POINTER_TAGS = frozenset({34665, 34853, 40965})
"""ExifIFD, GPSIFD, InteroperabilityIFD: tags whose value is the offset of another IFD."""
MAX_DEPTH = 3
"""Nesting followed (EXIF → Interoperability is 2); deeper or looping chains are cut."""
CLASSIC_DTYPES = frozenset(range(1, 14))
"""Tag types a classic TIFF can hold (BigTIFF's 8-byte types 16-18 cannot be copied into one)."""


@dataclass(frozen=True)
class RawEntry:
    """One IFD entry: code, TIFF type, count and the value bytes as stored."""

    code: int
    dtype: int
    count: int
    value: bytes


@dataclass(frozen=True)
class RawIfd:
    """A pointer IFD as stored: its entries, and the IFDs its own pointer tags lead to."""

    code: int
    """The pointer tag in the parent IFD (34665, 34853, 40965)."""
    dtype: int
    """The pointer tag's type (LONG 4 or IFD 13)."""
    entries: list[RawEntry] = field(default_factory=list)
    children: list[RawIfd] = field(default_factory=list)


def item_size(dtype: int) -> int:
    """Bytes per value of TIFF type ``dtype`` (8 for a RATIONAL)."""
    return struct.calcsize(tifffile.TIFF.DATA_FORMATS[dtype])


def read_pointer_ifd(tif: tifffile.TiffFile, code: int, dtype: int, offset: int) -> RawIfd:
    """Read the IFD at ``offset`` of an open file, as raw entries, following its pointers."""
    return _read(tif, code, dtype, offset, depth=1, seen=set())


def _read(
    tif: tifffile.TiffFile, code: int, dtype: int, offset: int, depth: int, seen: set[int]
) -> RawIfd:
    fh, fmt = tif.filehandle, tif.tiff
    result = RawIfd(code, dtype)
    if offset in seen or not 0 < offset < fh.size:
        return result
    seen.add(offset)
    fh.seek(offset)
    (ntags,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
    head = fh.read(ntags * fmt.tagsize)
    entry = struct.Struct(tif.byteorder + "HH" + fmt.offsetformat[1:] + f"{fmt.offsetsize}s")
    for i in range(min(ntags, len(head) // fmt.tagsize)):
        tag, tag_type, count, field_bytes = entry.unpack_from(head, i * fmt.tagsize)
        if tag_type not in CLASSIC_DTYPES:
            continue
        size = count * item_size(tag_type)
        if tag in POINTER_TAGS or tag_type == 13:
            (target,) = struct.unpack(tif.byteorder + fmt.offsetformat[1:], field_bytes)
            if depth < MAX_DEPTH:
                result.children.append(_read(tif, tag, tag_type, target, depth + 1, seen))
            continue
        if size <= fmt.offsetsize:
            value = field_bytes[:size]
        else:
            (where,) = struct.unpack(tif.byteorder + fmt.offsetformat[1:], field_bytes)
            if where + size > fh.size:
                continue  # a value pointing outside the file: nothing to copy
            fh.seek(where)
            value = fh.read(size)
        result.entries.append(RawEntry(tag, tag_type, count, value))
    return result


def placeholder_codes(ifds: list[RawIfd], taken: set[int]) -> list[int]:
    """One free private tag code per IFD (from 65535 down), not among ``taken``."""
    free = (code for code in range(65535, 65000, -1) if code not in taken)
    return [next(free) for _ in ifds]


def append_ifds(data: bytes, ifds: list[RawIfd], codes: list[int], byteorder: str) -> bytes:
    """Append ``ifds`` to a classic TIFF in ``data`` and point its first IFD at them.

    The first IFD of ``data`` holds a 1-count LONG placeholder under ``codes[i]`` for
    ``ifds[i]`` (written by tifffile from ``extratags``): it gets the pointer tag's code and type
    and the appended IFD's offset, and the entries are sorted again by code.
    """
    out = bytearray(data)
    first = struct.unpack_from(byteorder + "I", out, 4)[0]
    (ntags,) = struct.unpack_from(byteorder + "H", out, first)
    table = first + 2
    entries = [bytes(out[table + 12 * i : table + 12 * i + 12]) for i in range(ntags)]
    by_code = {struct.unpack_from(byteorder + "H", e)[0]: i for i, e in enumerate(entries)}
    for ifd, code in zip(ifds, codes, strict=True):
        if code not in by_code:
            raise ValueError(f"no placeholder {code} for tag {ifd.code} in the rendered TIFF")
        offset = _write(out, ifd, byteorder)
        entries[by_code[code]] = struct.pack(byteorder + "HHII", ifd.code, ifd.dtype, 1, offset)
    entries.sort(key=lambda e: struct.unpack_from(byteorder + "H", e)[0])
    out[table : table + 12 * ntags] = b"".join(entries)
    return bytes(out)


def _write(out: bytearray, ifd: RawIfd, byteorder: str) -> int:
    """Append ``ifd`` (values after it, then its children) to ``out``; return its offset."""
    if len(out) % 2:
        out += b"\x00"
    start = len(out)
    rows: list[tuple[int, int, int, bytes]] = [
        (e.code, e.dtype, e.count, e.value) for e in ifd.entries
    ]
    rows += [(c.code, c.dtype, 1, b"") for c in ifd.children]
    rows.sort(key=lambda r: r[0])
    values_at = start + 2 + 12 * len(rows) + 4
    table = bytearray(struct.pack(byteorder + "H", len(rows)))
    values = bytearray()
    pointer_slots: dict[int, int] = {}
    for code, dtype, count, value in rows:
        table += struct.pack(byteorder + "HHI", code, dtype, count)
        if code in {c.code for c in ifd.children}:
            pointer_slots[code] = start + len(table)
            table += b"\x00" * 4
        elif len(value) <= 4:
            table += value.ljust(4, b"\x00")
        else:
            table += struct.pack(byteorder + "I", values_at + len(values))
            values += value + (b"\x00" if len(value) % 2 else b"")
    table += b"\x00" * 4  # no next IFD
    out += table + values
    for child in ifd.children:
        struct.pack_into(
            byteorder + "I", out, pointer_slots[child.code], _write(out, child, byteorder)
        )
    return start


def ifd_values(ifd: RawIfd) -> dict[int, Any]:
    """``{code: value bytes}`` of an IFD's entries (for comparisons in tests and reports)."""
    return {e.code: e.value for e in ifd.entries}
