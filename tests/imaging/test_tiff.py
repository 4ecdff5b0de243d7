"""Slice and stack I/O on real TIFF files: order, checks, truncation, databar, metadata, atomic."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nrrn_daemon import __version__, files
from nrrn_daemon.errors import InputError, OutputError
from nrrn_daemon.files import safe_join, sha256_file
from nrrn_daemon.imaging.provenance import split_description
from nrrn_daemon.imaging.stacks import read_stack
from nrrn_daemon.imaging.tiff import read_slice, slice_is_complete
from nrrn_daemon.imaging.tiffwrite import write_slice_atomic, write_stack

FEI_TEXT = (
    b"[User]\r\nDate=01/02/2024\r\n[Image]\r\nResolutionX=64\r\nResolutionY=48\r\n"
    b"[Scan]\r\nPixelWidth=4e-09\r\n[PrivateFei]\r\nDatabarHeight=8\r\n\x00"
)
ZEISS_TEXT = (
    b"0\r\n\r\nAP_PIXEL_SIZE\r\nPixel Size = 5.0 nm\r\nDP_DETECTOR\r\nDetector = InLens\r\n\x00"
)


def _image(shape: tuple[int, int] = (56, 64), dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, int(info.max) + 1, shape).astype(dtype)


def _raw_tag(path: Path, code: int) -> tuple[int, bytes]:
    """(dtype, value bytes) of tag ``code`` exactly as stored in ``path``."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[code]
        tif.filehandle.seek(tag.valueoffset)
        return int(tag.dtype), tif.filehandle.read(tag.count)


def _fei_slice(path: Path, text: bytes = FEI_TEXT, **kwargs) -> np.ndarray:
    data = _image((56, 64), seed=1)
    tifffile.imwrite(
        path, data, metadata=None, extratags=[(34682, 2, len(text), text, True)], **kwargs
    )
    return data


# --- stacks ---------------------------------------------------------------------------------------


def test_multipage_real_volume(fib25_path: Path, fib25: np.ndarray) -> None:
    stack = read_stack([fib25_path])
    assert (len(stack), stack.shape, stack.dtype) == (32, (250, 250), np.uint8)
    assert stack.source_kind == "multipage" and stack.paths == (fib25_path,)
    assert stack.stem == fib25_path.stem and stack.names[7] == f"{fib25_path.stem}_0007.tif"
    np.testing.assert_array_equal(stack[7], fib25[7])
    np.testing.assert_array_equal(stack.to_array(), fib25)


def test_folder_in_natural_order_ignores_other_files(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        tifffile.imwrite(tmp_path / f"slice_{n}.tif", np.full((4, 5), n, np.uint8))
    tifffile.imwrite(tmp_path / "slice_3.TIFF", np.full((4, 5), 3, np.uint8))
    (tmp_path / ".slice_4.tif.ab12.part").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("not a slice")
    stack = read_stack([tmp_path])
    assert stack.source_kind == "files"
    assert stack.names == ("slice_1.tif", "slice_2.tif", "slice_3.TIFF", "slice_10.tif")
    assert [int(s[0, 0]) for s in stack] == [1, 2, 3, 10]


def test_folder_with_two_files_of_one_number_is_refused(tmp_path: Path) -> None:
    for name in ("SEM Image - SliceImage - 001.tif", "SEM Image 2 - SliceImage - 001.tif"):
        tifffile.imwrite(tmp_path / name, np.zeros((4, 5), np.uint8))
    with pytest.raises(InputError, match="both have number 1"):
        read_stack([tmp_path])


def test_file_list_keeps_given_order(tmp_path: Path) -> None:
    paths = []
    for n in (3, 1, 2):
        paths.append(tmp_path / f"s{n}.tif")
        tifffile.imwrite(paths[-1], np.full((4, 5), n, np.uint16))
    stack = read_stack(paths)
    assert stack.dtype == np.uint16 and stack.names == ("s3.tif", "s1.tif", "s2.tif")
    assert [int(s[0, 0]) for s in stack] == [3, 1, 2]


def test_one_page_file_is_a_one_slice_stack(tmp_path: Path) -> None:
    # A single slice file is a stack of one slice *file*: denoised with its metadata and databar.
    tifffile.imwrite(tmp_path / "one.tif", _image((6, 7), np.uint16))
    stack = read_stack([tmp_path / "one.tif"])
    assert (len(stack), stack.shape, stack.source_kind) == (1, (6, 7), "files")
    assert stack.names == ("one.tif",)


def test_mismatched_shape_names_the_file_and_both_shapes(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a_1.tif", np.zeros((4, 5), np.uint8))
    tifffile.imwrite(tmp_path / "a_2.tif", np.zeros((6, 5), np.uint8))
    with pytest.raises(InputError, match=r"a_2\.tif.*\(6, 5\).*a_1\.tif.*\(4, 5\)"):
        read_stack([tmp_path])


def test_mismatched_dtype_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a_1.tif", np.zeros((4, 5), np.uint8))
    tifffile.imwrite(tmp_path / "a_2.tif", np.zeros((4, 5), np.uint16))
    with pytest.raises(InputError, match=r"a_2\.tif.*uint16.*uint8"):
        read_stack([tmp_path])


def test_dtypes_rgb_and_float(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 5, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "f32.tif", np.zeros((4, 5), np.float32))
    tifffile.imwrite(tmp_path / "f64.tif", np.zeros((4, 5), np.float64))
    with pytest.raises(InputError, match="rgb.tif.*one grey channel"):
        read_slice(tmp_path / "rgb.tif")
    with pytest.raises(InputError, match="rgb.tif.*one grey channel"):
        read_stack([tmp_path / "rgb.tif"])
    with pytest.raises(InputError, match="f32.tif.*float32 is not supported"):
        read_slice(tmp_path / "f32.tif")
    assert read_stack([tmp_path / "f32.tif"], allow_float=True).dtype == np.float32
    with pytest.raises(InputError, match="float64"):
        read_stack([tmp_path / "f64.tif"], allow_float=True)
    colormap = np.zeros((3, 256), np.uint16)
    tifffile.imwrite(tmp_path / "pal.tif", np.zeros((4, 5), np.uint8), colormap=colormap)
    with pytest.raises(InputError, match="pal.tif.*colour-mapped"):
        read_slice(tmp_path / "pal.tif")


# --- broken inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"rowsperstrip": 8}, {"compression": "zlib"}])
def test_truncated_slice_is_detected(tmp_path: Path, kwargs: dict) -> None:
    path = tmp_path / "slice_1.tif"
    tifffile.imwrite(path, _image(), metadata=None, **kwargs)
    assert slice_is_complete(path) == (True, "")
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    ok, reason = slice_is_complete(path)
    assert not ok and "slice_1.tif" in reason and "retry" in reason
    with pytest.raises(InputError, match=r"slice_1\.tif.*(truncated|corrupt)"):
        read_slice(path)
    with pytest.raises(InputError, match=r"slice_1\.tif"):
        read_stack([tmp_path])[0]


def test_truncated_multipage_is_detected(tmp_path: Path, fib25_path: Path) -> None:
    path = tmp_path / "half.tif"
    data = fib25_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"half\.tif.*truncated"):
        read_stack([path])
    assert not slice_is_complete(path)[0]


def test_header_written_before_data_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _image(), metadata=None)
    with tifffile.TiffFile(path) as tif:
        first_data = tif.pages[0].dataoffsets[0]
    path.write_bytes(path.read_bytes()[:first_data])
    ok, reason = slice_is_complete(path)
    assert not ok and "truncated" in reason


@pytest.mark.parametrize("content", [b"", b"this is not a tiff at all", b"II*\x00\x08"])
def test_not_a_tiff_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.tif"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"cannot read .*fake\.tif: .*—"):
        read_slice(path)
    with pytest.raises(InputError, match=r"fake\.tif"):
        read_stack([path])
    assert not slice_is_complete(path)[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"gone\.tif: file not found"):
        read_slice(tmp_path / "gone.tif")
    assert slice_is_complete(tmp_path / "gone.tif")[0] is False
    with pytest.raises(InputError, match="no .tif"):
        read_stack([tmp_path])


# --- databar and metadata -------------------------------------------------------------------------


def test_fei_databar_split_and_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "SEM Image - SliceImage - 001.tif"
    data = _fei_slice(src)
    with tifffile.TiffFile(src) as tif:
        assert tif.is_fei and tif.fei_metadata["Image"]["ResolutionY"] == 48
    image = read_slice(src, databar="fei")
    assert image.pixels.shape == (48, 64) and image.databar.shape == (8, 64)
    assert image.full_shape == (56, 64) and image.fei["PrivateFei"]["DatabarHeight"] == 8
    denoised = (255 - image.pixels).astype(np.uint8)
    out = tmp_path / "out" / src.name
    out.parent.mkdir()
    digest = write_slice_atomic(out, image, denoised, "NRRN test")
    assert digest == sha256_file(out) == hashlib.sha256(out.read_bytes()).hexdigest()
    written = tifffile.imread(out)
    assert written.dtype == np.uint8 and written.shape == (56, 64)
    np.testing.assert_array_equal(written[48:], data[48:])
    np.testing.assert_array_equal(written[:48], denoised)
    assert _raw_tag(out, 34682) == _raw_tag(src, 34682) == (2, FEI_TEXT)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].description == "NRRN test\ninput Software: tifffile.py"
        assert tif.fei_metadata == image.fei
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_fei_text_without_nul_stays_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "s.tif"
    text = FEI_TEXT.rstrip(b"\x00")
    data = _image((56, 64), seed=1)
    tifffile.imwrite(src, data, byteorder=">", extratags=[(34682, 7, len(text), text, True)])
    with tifffile.TiffFile(src) as tif:  # make it ASCII without a NUL, as some writers do
        entry = tif.pages[0].tags[34682].offset
    raw = bytearray(src.read_bytes())
    raw[entry + 2 : entry + 4] = (2).to_bytes(2, "big")
    src.write_bytes(bytes(raw))
    assert _raw_tag(src, 34682) == (2, text)
    image = read_slice(src, databar="fei")
    out = tmp_path / "o.tif"
    write_slice_atomic(out, image, image.pixels.copy(), "done")
    assert _raw_tag(out, 34682)[1] == _raw_tag(src, 34682)[1] == text
    with tifffile.TiffFile(out) as tif:
        assert tif.byteorder == ">" and tif.fei_metadata["Image"]["ResolutionY"] == 48
    np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(src))


def test_fei_databar_needs_matching_metadata(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "plain.tif", _image())
    with pytest.raises(InputError, match=r"plain\.tif.*no FEI metadata.*databar='rows'"):
        read_slice(tmp_path / "plain.tif", databar="fei")
    _fei_slice(tmp_path / "tall.tif", FEI_TEXT.replace(b"ResolutionY=48", b"ResolutionY=70"))
    with pytest.raises(InputError, match=r"tall\.tif.*ResolutionY=70.*only 56 rows"):
        read_slice(tmp_path / "tall.tif", databar="fei")


def test_fixed_rows_databar_uint16(tmp_path: Path) -> None:
    src = tmp_path / "s.tif"
    data = _image((20, 9), np.uint16)
    tifffile.imwrite(src, data, photometric="miniswhite")
    image = read_slice(src, databar="rows", databar_rows=5)
    assert image.pixels.shape == (15, 9) and image.dtype == np.uint16
    out = tmp_path / "o.tif"
    write_slice_atomic(out, image, np.zeros((15, 9), np.uint16), "x")
    written = tifffile.imread(out)
    assert written.dtype == np.uint16
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].photometric == 0  # min-is-white kept
    np.testing.assert_array_equal(written[15:], data[15:])
    assert not written[:15].any()
    with pytest.raises(InputError, match="20 rows"):
        read_slice(src, databar="rows", databar_rows=20)
    assert read_slice(src).databar is None


def test_zeiss_and_standard_tags_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "zeiss.tif"
    tifffile.imwrite(
        src,
        _image(),
        description="acquired by SmartSEM",
        metadata=None,
        software="SmartSEM 6.0",
        datetime="2024:01:02 03:04:05",
        resolution=((2540000, 10000), (2540000, 10000)),
        resolutionunit="INCH",
        extratags=[(34118, 2, len(ZEISS_TEXT), ZEISS_TEXT, True), (315, 2, 0, "Operator", True)],
    )
    image = read_slice(src)
    out = tmp_path / "o.tif"
    write_slice_atomic(out, image, image.pixels.copy(), "NRRN test")
    assert _raw_tag(out, 34118) == _raw_tag(src, 34118)
    with tifffile.TiffFile(out) as tif, tifffile.TiffFile(src) as orig:
        page, first = tif.pages[0], orig.pages[0]
        assert tif.sem_metadata == orig.sem_metadata
        for code in (306, 315, 296):
            assert page.tags[code].value == first.tags[code].value
        for code in (282, 283):
            assert np.divide(*page.tags[code].value) == np.divide(*first.tags[code].value)
        # Software names us; the input's is kept in the description, as is its description
        assert page.software == f"nrrn-daemon {__version__}"
        assert split_description(page.description) == (
            "NRRN test\ninput Software: SmartSEM 6.0",
            "acquired by SmartSEM",
        )


def test_write_refuses_wrong_dtype_or_shape(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", _image())
    image = read_slice(tmp_path / "s.tif")
    with pytest.raises(ValueError, match="float32"):
        write_slice_atomic(tmp_path / "o.tif", image, image.pixels.astype(np.float32), "x")
    with pytest.raises(ValueError, match=r"\(55, 64\)"):
        write_slice_atomic(tmp_path / "o.tif", image, image.pixels[1:], "x")
    assert list(tmp_path.iterdir()) == [tmp_path / "s.tif"]


# --- atomic writes --------------------------------------------------------------------------------


def test_disk_full_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tifffile.imwrite(tmp_path / "in.tif", _image())
    image = read_slice(tmp_path / "in.tif")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OutputError, match=r"cannot write .*o\.tif: disk full .*retried"):
        write_slice_atomic(out_dir / "o.tif", image, image.pixels, "x")
    monkeypatch.undo()
    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        write_stack(out_dir / "stack.tif", np.zeros((2, 3, 4), np.uint8))
    assert list(out_dir.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder_is_an_output_error(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", _image())
    image = read_slice(tmp_path / "in.tif")
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            write_slice_atomic(out_dir / "o.tif", image, image.pixels, "x")
        assert list(out_dir.iterdir()) == []
    finally:
        out_dir.chmod(stat.S_IRWXU)


def test_missing_output_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="folder does not exist"):
        write_stack(tmp_path / "nope" / "s.tif", np.zeros((2, 3, 4), np.uint8))


def test_write_stack_round_trip_replaces_atomically(tmp_path: Path) -> None:
    out = tmp_path / "stack.tif"
    out.write_bytes(b"old")
    volume = _image((30, 40), np.uint16).reshape(3, 20, 20)
    digest = write_stack(out, volume, description="denoised")
    assert digest == sha256_file(out)
    stack = read_stack([out])
    assert stack.source_kind == "multipage"
    np.testing.assert_array_equal(stack.to_array(), volume)
    assert [p.name for p in tmp_path.iterdir()] == ["stack.tif"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0o600


def test_safe_join() -> None:
    folder = Path("/data/out")
    assert safe_join(folder, "slice 001.tif") == folder / "slice 001.tif"
    for bad in ("../x", "/etc/passwd", "a/b", "a\\b", "..", ".", ""):
        with pytest.raises(OutputError, match="not a plain file name"):
            safe_join(folder, bad)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(InputError, match="gone"):
        sha256_file(tmp_path / "gone")
