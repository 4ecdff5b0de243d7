"""Slice TIFFs in the layouts real microscopes write, built here with tifffile (and PIL), and the
checks every output of such a slice must pass (importable: ``tests`` is on pythonpath).

Layouts (:data:`LAYOUTS`): Thermo Fisher INI metadata in 34682 with a databar; XML in 34680;
Helios G4's 34680 + 34682 + 34683; EXIF and GPS IFDs (34665, 34853: sub-IFDs built here by
hand, since neither tifffile nor PIL writes them into a TIFF); ZEISS SmartSEM's 34118 on an 8-bit
grey-ramp palette image (photometric 3); 16-bit with a databar; a databar under ResolutionY while
DatabarHeight says 0; and plain stacks as tifffile (Software 'tifffile.py', shaped JSON
description) and PIL write them.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import skimage.io
import tifffile
from PIL import Image

from nrrn_daemon import __version__
from nrrn_daemon.imaging.provenance import read_provenance, split_description

HEIGHT, WIDTH, BAR = 40, 48, 8
"""Image rows, columns, and databar rows of the layouts that have a databar."""
GREY_RAMP = np.stack([np.arange(256, dtype=np.uint16) * 257] * 3)
"""ZEISS's palette: a linear grey ramp, 0, 257, ... 65535 on R, G and B."""
LAYOUT_TAGS = {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 320, 339}
"""Tags that describe the stored layout (checked separately: shape, dtype, photometric, map)."""


def fei_ini(res_y: int, databar_height: int) -> bytes:
    return (
        b"[User]\r\nDate=01/02/2024\r\nUser=facility\r\n[System]\r\nSystemType=Helios G4 PFIB\r\n"
        + f"[Image]\r\nResolutionX={WIDTH}\r\nResolutionY={res_y}\r\n".encode()
        + b"[Scan]\r\nPixelWidth=4e-09\r\nPixelHeight=4e-09\r\n[PrivateFei]\r\n"
        + f"DatabarHeight={databar_height}\r\n".encode()
        + b"\x00"
    )


FEI_XML = (
    b'<?xml version="1.0"?><Metadata><Instrument><Manufacturer>Thermo Fisher</Manufacturer>'
    b"<ControlSoftwareVersion>12.1</ControlSoftwareVersion></Instrument>"
    b"<BinaryResult><PixelSize><X>4E-09</X><Y>4E-09</Y></PixelSize></BinaryResult></Metadata>"
)
ZEISS_TEXT = (
    b"0\r\n\r\nAP_PIXEL_SIZE\r\nPixel Size = 5.0 nm\r\nDP_DETECTOR\r\nDetector = InLens\r\n"
    b"AP_WD\r\nWD = 5.1 mm\r\nDP_IMAGE_STORE\r\n"
    + f"Store resolution = {WIDTH} * {HEIGHT}\r\n".encode()
    + f"AP_HEIGHT\r\nHeight = {HEIGHT * 5.0:.1f} nm\r\n".encode()
    + b"\x00"
)
"""SmartSEM's tag 34118 as real files have it: the store resolution is the whole page (a data
zone, when SmartSEM burns one in, is drawn over the image's bottom rows; no tag says how high)."""
TITAN = b"\x01\x02\x03\x04binary Helios G4 block\x00\xff"


def _image(seed: int, dtype: type, rows: int) -> np.ndarray:
    """A structured, noisy slice: the tiny network changes it; different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :WIDTH]
    top = float(np.iinfo(dtype).max)
    clean = 0.5 + 0.3 * np.sin(xx / 4.0) * np.cos(yy / 5.0)
    noisy = clean + rng.normal(0, 0.08, clean.shape)
    return (np.clip(noisy, 0, 1) * top).astype(dtype)


def _with_databar(image: np.ndarray) -> np.ndarray:
    """The image above a databar: a flat strip with 'text' and a scale bar (fixed pattern)."""
    top = np.iinfo(image.dtype).max
    bar = np.zeros((BAR, WIDTH), image.dtype)
    bar[2:6, 4:20] = top  # scale bar
    bar[2:6, 30:44:2] = top // 2  # "text"
    return np.concatenate([image, bar])


def _exif_and_gps(data: bytes) -> bytes:
    """Append a small EXIF IFD and a GPS IFD to a little-endian classic TIFF whose first IFD ends
    with placeholders 65000 and 65001 (tifffile writes no 34665/34853), and make them the 34665
    and 34853 pointers to the new IFDs (by hand: no library here writes them). The placeholders
    sort last, as 34665 and 34853 do among this layout's tags."""
    out = bytearray(data)

    def append(entries: list[tuple[int, int, int, bytes]]) -> int:
        if len(out) % 2:
            out.extend(b"\x00")
        start = len(out)
        values_at = start + 2 + 12 * len(entries) + 4
        table, values = struct.pack("<H", len(entries)), b""
        for code, dtype, count, value in entries:
            if len(value) <= 4:
                table += struct.pack("<HHI", code, dtype, count) + value.ljust(4, b"\x00")
            else:
                table += struct.pack("<HHII", code, dtype, count, values_at + len(values))
                values += value
        out.extend(table + struct.pack("<I", 0) + values)
        return start

    date = b"2024:01:02 03:04:05\x00"
    exif = append([
        (0x9003, 2, len(date), date), (0x920A, 5, 1, struct.pack("<II", 1234, 100)),
        (0xA002, 4, 1, struct.pack("<I", WIDTH)), (0xA003, 4, 1, struct.pack("<I", HEIGHT)),
    ])  # fmt: skip
    gps = append([(0, 1, 4, bytes([2, 3, 0, 0])), (1, 2, 2, b"N\x00")])
    first = struct.unpack_from("<I", out, 4)[0]
    (count,) = struct.unpack_from("<H", out, first)
    codes = [struct.unpack_from("<H", out, first + 2 + 12 * i)[0] for i in range(count)]
    assert codes[-2:] == [65000, 65001], codes
    struct.pack_into("<HHII", out, first + 2 + 12 * (count - 2), 34665, 4, 1, exif)
    struct.pack_into("<HHII", out, first + 2 + 12 * (count - 1), 34853, 4, 1, gps)
    return bytes(out)


@dataclass(frozen=True)
class Layout:
    """One vendor's slice layout: how to write a slice, and where its image ends."""

    name: str
    dtype: type
    databar: bool
    encode: Callable[[np.ndarray], bytes]

    def pixels(self, seed: int) -> np.ndarray:
        """The full slice (databar included) of seed ``seed``."""
        image = _image(seed, self.dtype, HEIGHT)
        return _with_databar(image) if self.databar else image

    def write(self, path: Path, seed: int) -> np.ndarray:
        full = self.pixels(seed)
        path.write_bytes(self.encode(full))
        return full

    @property
    def image_rows(self) -> int:
        return HEIGHT


def _tiff(image: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **kwargs)
    return buffer.getvalue()


def _pil(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="TIFF", dpi=(300, 300))
    return buffer.getvalue()


_FEI = {"resolution": (250, 250), "resolutionunit": 3, "software": "Helios G4 PFIB"}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("fei-ini-34682", np.uint8, True, lambda a: _tiff(
            a, metadata=None, extratags=[(34682, 2, 0, fei_ini(HEIGHT, BAR), True)], **_FEI,
        )),
        Layout("fei-xml-34680", np.uint8, False, lambda a: _tiff(
            a, metadata=None, extratags=[(34680, 2, 0, FEI_XML, True)], **_FEI,
        )),
        Layout("helios-g4-34683", np.uint8, True, lambda a: _tiff(
            a, metadata=None, description="Helios G4", **_FEI, extratags=[
                (34680, 2, 0, FEI_XML, True), (34682, 2, 0, fei_ini(HEIGHT, BAR), True),
                (34683, 7, len(TITAN), TITAN, True),
            ],
        )),
        Layout("exif-gps-ifd", np.uint8, False, lambda a: _exif_and_gps(_tiff(
            a, metadata=None, byteorder="<",
            extratags=[(65000, 4, 1, 0, True), (65001, 4, 1, 0, True)],
            software="Teneo", resolution=(100, 100),
        ))),
        Layout("zeiss-palette-34118", np.uint8, False, lambda a: _tiff(
            a, metadata=None, photometric="palette", colormap=GREY_RAMP, software="SmartSEM",
            extratags=[(34118, 2, 0, ZEISS_TEXT, True)], resolution=(2000, 2000),
        )),
        Layout("fei-16bit", np.uint16, True, lambda a: _tiff(
            a, metadata=None, extratags=[(34682, 2, 0, fei_ini(HEIGHT, BAR), True)], **_FEI,
        )),
        Layout("databar-height-0", np.uint8, True, lambda a: _tiff(
            a, metadata=None, extratags=[(34682, 2, 0, fei_ini(HEIGHT, 0), True)], **_FEI,
        )),
        Layout("tifffile-shaped", np.uint8, False, lambda a: _tiff(a)),
        Layout("pil", np.uint8, False, _pil),
    )
}  # fmt: skip


def read_all(path: Path) -> np.ndarray:
    """The pixels of ``path`` by tifffile, checked equal with skimage, imageio and PIL."""
    ref = tifffile.imread(path)
    others = {
        "skimage.io.imread": skimage.io.imread(path),
        "imageio.v3.imread": iio.imread(path),
        "PIL": np.asarray(Image.open(path)),
    }
    for reader, pixels in others.items():
        assert pixels.shape == ref.shape and pixels.dtype == ref.dtype, reader
        np.testing.assert_array_equal(pixels, ref, err_msg=reader)
    return ref


def _tag_values(path: Path) -> dict[int, object]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        values: dict[int, object] = {}
        for tag in page.tags.values():
            tif.filehandle.seek(tag.valueoffset)
            raw = tif.filehandle.read(tag.count * struct.calcsize(
                tifffile.TIFF.DATA_FORMATS[int(tag.dtype)]
            ))  # fmt: skip
            values[tag.code] = (tag.value, raw if tag.code >= 32768 and tag.code != 34665 else None)
        values[-262] = int(page.photometric)
        values[-320] = None if page.colormap is None else page.colormap.tolist()
        values[-270] = page.description
        return values


def check_output(source: Path, output: Path, *, databar_rows: int) -> None:
    """Assert what a user relies on for the output of one vendor slice.

    The four readers open it and agree; shape, dtype, photometric and palette are the input's;
    the bottom ``databar_rows`` rows are byte-identical and the image above them changed; every
    tag of the input is there with the same value (vendor tags byte for byte, EXIF as a sub-IFD)
    but the description, which keeps the input's inside ours, and Software, which names us.
    """
    before, after = read_all(source), read_all(output)
    assert after.shape == before.shape and after.dtype == before.dtype
    rows = before.shape[0] - databar_rows
    assert np.array_equal(after[rows:], before[rows:]), "databar rows changed"
    assert np.abs(after[:rows].astype(float) - before[:rows]).mean() > 0.5, "image not denoised"
    want, got = _tag_values(source), _tag_values(output)
    assert got[-262] == want[-262] and got[-320] == want[-320]
    for code, value in want.items():
        if code in LAYOUT_TAGS or code in (270, 305, -270, -262, -320):
            continue
        assert code in got, f"tag {code} dropped"
        assert got[code] == value, f"tag {code}: {got[code]!r} != {value!r}"
    assert got[305][0] == f"nrrn-daemon {__version__}"
    description = str(got[-270])
    assert not description.startswith("{") and read_provenance(description) is not None
    assert split_description(description)[1] == (want[-270] or None)


# --- files that cannot be denoised as grey levels -------------------------------------------


def _colour_palette(path: Path) -> None:
    cmap = np.stack([np.arange(256, dtype=np.uint16) * 257] * 3)
    cmap[0] = cmap[0][::-1]  # red falls while green and blue rise: a colour palette
    tifffile.imwrite(path, np.zeros((40, 48), np.uint8), photometric="palette", colormap=cmap)


def _rgb(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((40, 48, 3), np.uint8), photometric="rgb")


def _float(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((40, 48), np.float32))


BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "colour palette": (_colour_palette, "colour palette, not a grey ramp"),
    "rgb": (_rgb, "3 samples per pixel (RGB?)"),
    "float": (_float, "pixel type float32 is not supported"),
}
