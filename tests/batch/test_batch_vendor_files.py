"""Real microscope layouts through the offline ``denoise`` command and ``reprocess`` (a real Dask
LocalCluster), a real tiny NRRN on the CPU, outputs read back by tifffile, skimage, imageio and
PIL (:func:`vendor_tiffs.check_output`)."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import nullcontext
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import skimage.io
import tifffile
from conftest import random_checkpoint
from helpers import zarr_io_threads  # noqa: F401
from PIL import Image, ImageSequence
from typer.testing import CliRunner
from vendor_tiffs import BAD, BAR, GREY_RAMP, HEIGHT, LAYOUTS, check_output, read_all

from nrrn_daemon import __version__
from nrrn_daemon.batch.reprocess import dask_cluster, plan_reprocess, run_plan
from nrrn_daemon.cli.app import app
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.imaging.provenance import read_provenance
from nrrn_daemon.store.store import Store

runner = CliRunner()
NAME = "slice_{:03d}.tif"


@pytest.fixture(autouse=True)
def _restore_logging():
    """``denoise``/``reprocess`` configure logging on the runner's stream; restore it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _slices(folder: Path, layout: str, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / NAME.format(k) for k in range(n)]
    for k, path in enumerate(paths):
        LAYOUTS[layout].write(path, seed=k)
    return paths


def _denoise(*args: object):
    return runner.invoke(app, ["denoise", *[str(a) for a in args], "--device", "cpu"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_denoise_a_folder_of_vendor_slices(tmp_path, tiny_checkpoint, layout):
    paths = _slices(tmp_path / "raw", layout)
    result = _denoise(tmp_path / "raw", "-o", tmp_path / "out", "--model", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    for path in paths:
        check_output(
            path, tmp_path / "out" / path.name, databar_rows=BAR if LAYOUTS[layout].databar else 0
        )


@pytest.mark.parametrize("option", [[], ["--databar", "fei"]])
def test_denoise_one_slice_file_crops_the_databar(tmp_path, tiny_checkpoint, option):
    raw = tmp_path / "raw" / "SEM Image - SliceImage - 001.tif"
    raw.parent.mkdir()
    LAYOUTS["helios-g4-34683"].write(raw, seed=3)
    result = _denoise(raw, "-o", tmp_path / "out", "--model", tiny_checkpoint, *option)
    assert result.exit_code == 0, result.output
    check_output(raw, tmp_path / "out" / raw.name, databar_rows=BAR)


def test_databar_none_denoises_the_databar_too(tmp_path, tiny_checkpoint):
    raw = tmp_path / "raw" / "SEM Image - SliceImage - 001.tif"
    raw.parent.mkdir()
    before = LAYOUTS["fei-ini-34682"].write(raw, seed=3)
    result = _denoise(raw, "-o", tmp_path / "out", "--model", tiny_checkpoint, "--databar", "none")
    assert result.exit_code == 0, result.output
    after = read_all(tmp_path / "out" / raw.name)
    assert not np.array_equal(after[HEIGHT:], before[HEIGHT:])


def _zeiss_with_data_zone(path: Path, seed: int) -> np.ndarray:
    """A ZEISS palette slice as SmartSEM saves it with its data zone on: the page is the store
    resolution (``DP_IMAGE_STORE``), the strip drawn over its bottom ``BAR`` rows."""
    full = LAYOUTS["zeiss-palette-34118"].pixels(seed)
    full[-BAR:] = 0
    full[-BAR + 2 : -2, 4:20] = 255  # scale bar
    full[-BAR + 2 : -2, 30:44:2] = 128  # "text"
    path.write_bytes(LAYOUTS["zeiss-palette-34118"].encode(full))
    return full


@pytest.mark.parametrize("option", [[], ["--databar", "rows", "--databar-rows", str(BAR)]])
def test_a_zeiss_data_zone_is_cropped_only_when_its_height_is_given(
    tmp_path, tiny_checkpoint, option
):
    raw = tmp_path / "raw" / "slice_001.tif"
    raw.parent.mkdir()
    before = _zeiss_with_data_zone(raw, seed=4)
    with tifffile.TiffFile(raw) as tif:  # the metadata's image size is the whole page
        store = tif.pages[0].tags[34118].value["dp_image_store"]
        assert store == ("Store resolution", f"{before.shape[1]} * {before.shape[0]}")
    result = _denoise(raw, "-o", tmp_path / "out", "--model", tiny_checkpoint, *option)
    assert result.exit_code == 0, result.output
    if option:
        check_output(raw, tmp_path / "out" / raw.name, databar_rows=BAR)
    else:  # "auto": no tag says where the image ends, so every row is denoised as image
        after = read_all(tmp_path / "out" / raw.name)
        assert not np.array_equal(after[-BAR:], before[-BAR:])
        check_output(raw, tmp_path / "out" / raw.name, databar_rows=0)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_denoise_refuses_a_bad_file_with_one_line_and_writes_nothing(
    tmp_path, tiny_checkpoint, kind
):
    write, expected = BAD[kind]
    _slices(tmp_path / "raw", "zeiss-palette-34118")
    write(tmp_path / "raw" / NAME.format(1))
    result = _denoise(tmp_path / "raw", "-o", tmp_path / "out", "--model", tiny_checkpoint)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert expected in error and NAME.format(1) in error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.fixture(scope="module")
def cluster():
    with dask_cluster(local_workers=2) as started:
        yield started


@pytest.mark.usefixtures("zarr_io_threads")
def test_reprocess_vendor_folders(tmp_path, cluster):
    """Each layout's folder reprocessed into TIFFs and a volume (one cluster for all)."""
    ckpt = random_checkpoint(tmp_path / "tiny.pt")
    with Store(tmp_path / "nrrn.sqlite") as store:
        for layout in sorted(LAYOUTS):
            paths = _slices(tmp_path / layout / "raw", layout)
            plan = plan_reprocess(
                str(tmp_path / layout / "raw"), store, model=str(ckpt),
                output=tmp_path / layout / "out", zarr=tmp_path / layout / "v.zarr",
                device="cpu",
            )  # fmt: skip
            summary = run_plan(plan, store, lambda: nullcontext(cluster))
            assert not summary.failed, (layout, summary.failed)
            bar = BAR if LAYOUTS[layout].databar else 0
            volume = OmeZarrVolume.open(tmp_path / layout / "v.zarr").read(0)
            for z, path in enumerate(paths):
                out = tmp_path / layout / "out" / path.name
                check_output(path, out, databar_rows=bar)
                # the volume holds the image area's grey values (palette indices of a grey ramp)
                np.testing.assert_array_equal(volume[z], tifffile.imread(out)[:HEIGHT])


@pytest.mark.parametrize("kind", sorted(BAD))
def test_reprocess_refuses_a_bad_file_with_one_line_before_writing(tmp_path, kind):
    write, expected = BAD[kind]
    _slices(tmp_path / "raw", "fei-ini-34682")
    write(tmp_path / "raw" / NAME.format(1))
    db = tmp_path / "db.sqlite"
    argv = ["reprocess", str(tmp_path / "raw"), "--db", str(db), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert expected in result.output and NAME.format(1) in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    if db.exists():  # checked before anything is recorded
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT count(*) FROM datasets").fetchone() == (0,)


def _stack_tifffile(path: Path, volume: np.ndarray) -> None:
    tifffile.imwrite(path, volume)  # Software 'tifffile.py' and a shaped JSON description


def _stack_palette(path: Path, volume: np.ndarray) -> None:
    tifffile.imwrite(path, volume, photometric="palette", colormap=GREY_RAMP)


def _stack_pil(path: Path, volume: np.ndarray) -> None:
    first, *rest = [Image.fromarray(plane) for plane in volume]
    first.save(path, save_all=True, append_images=rest)


@pytest.mark.parametrize("write", [_stack_tifffile, _stack_palette, _stack_pil])
def test_denoise_a_multipage_stack_every_reader_opens(tmp_path, tiny_checkpoint, write):
    volume = np.stack([LAYOUTS["pil"].pixels(k) for k in range(5)])
    write(tmp_path / "stack.tif", volume)
    result = _denoise(tmp_path / "stack.tif", "-o", tmp_path / "out", "--model", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "stack.tif"
    pixels = tifffile.imread(out)
    assert pixels.shape == volume.shape and pixels.dtype == volume.dtype
    assert np.abs(pixels.astype(float) - volume).mean() > 0.5
    np.testing.assert_array_equal(skimage.io.imread(out), pixels)
    np.testing.assert_array_equal(iio.imread(out), pixels)
    pil = np.stack([np.asarray(page) for page in ImageSequence.Iterator(Image.open(out))])
    np.testing.assert_array_equal(pil, pixels)
    with tifffile.TiffFile(out) as tif, tifffile.TiffFile(tmp_path / "stack.tif") as source:
        page, first = tif.pages[0], source.pages[0]
        assert page.photometric == first.photometric  # a grey-ramp palette stays a palette
        assert page.software == f"nrrn-daemon {__version__}"
        assert read_provenance(page.description) is not None


@pytest.mark.usefixtures("zarr_io_threads")
def test_reprocess_a_multipage_palette_stack_keeps_the_palette_on_every_page(tmp_path, cluster):
    volume = np.stack([LAYOUTS["pil"].pixels(k) for k in range(4)])
    _stack_palette(tmp_path / "stack.tif", volume)
    ckpt = random_checkpoint(tmp_path / "tiny.pt")
    with Store(tmp_path / "nrrn.sqlite") as store:
        plan = plan_reprocess(
            str(tmp_path / "stack.tif"), store, model=str(ckpt), output=tmp_path / "out",
            zarr=tmp_path / "v.zarr", device="cpu",
        )  # fmt: skip
        summary = run_plan(plan, store, lambda: nullcontext(cluster))
    assert not summary.failed and summary.recorded == len(volume)
    denoised = OmeZarrVolume.open(tmp_path / "v.zarr").read(0)
    outputs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outputs] == [f"stack_{z:04d}.tif" for z in range(len(volume))]
    for z, out in enumerate(outputs):
        pixels = read_all(out)  # tifffile, skimage, imageio and PIL: the same pixels
        assert pixels.dtype == volume.dtype and pixels.shape == volume[z].shape
        np.testing.assert_array_equal(pixels, denoised[z])
        assert np.abs(pixels.astype(float) - volume[z]).mean() > 0.5, "page not denoised"
        with tifffile.TiffFile(out) as tif:
            page = tif.pages[0]
            assert int(page.photometric) == 3  # palette, as the input's pages
            np.testing.assert_array_equal(page.colormap, GREY_RAMP)
            assert page.software == f"nrrn-daemon {__version__}"
            assert read_provenance(page.description) is not None
        with Image.open(out) as image:
            assert image.mode == "P"  # PIL sees a palette image too
