"""OME-Zarr volumes: NGFF metadata read back by ome-zarr and ome-zarr-models, the pyramid, and
the live volume that grows one slice at a time; voxel sizes from real TIFF metadata."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import tifffile
import zarr
from helpers import zarr_io_threads  # noqa: F401
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader
from ome_zarr_models.v05 import Image

from nrrn_daemon.errors import InputError, OutputError
from nrrn_daemon.imaging.omezarr import (
    LiveVolume,
    OmeZarrVolume,
    auto_levels,
    downsample2,
    level_shapes,
)
from nrrn_daemon.imaging.voxels import VoxelSize, parse_voxel_size, voxel_size_from_tiff

pytestmark = pytest.mark.usefixtures("zarr_io_threads")


def reference_downsample(image: np.ndarray) -> np.ndarray:
    """2×2 block mean by reshaping, after repeating an odd last row/column; round half up."""
    h, w = image.shape
    rows = np.vstack([image, image[-1:]]) if h % 2 else image
    full = np.hstack([rows, rows[:, -1:]]) if w % 2 else rows
    blocks = full.astype(np.float64).reshape(full.shape[0] // 2, 2, full.shape[1] // 2, 2)
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(image.dtype)


@pytest.fixture
def slices(fib25) -> np.ndarray:
    return np.ascontiguousarray(fib25[:9, :201, :250])  # odd height: edge rows repeat


def test_metadata_validates_and_reads_back_with_ome_zarr(tmp_path, slices):
    path = tmp_path / "vol.zarr"
    volume = OmeZarrVolume.create(
        path, depth=len(slices), slice_shape=slices.shape[1:], dtype=slices.dtype,
        voxel_size=VoxelSize(20.0, 8.0, 8.0), levels=3, name="fib25",
    )  # fmt: skip
    for z, plane in enumerate(slices):
        volume.write_slice(z, plane)

    image = Image.from_zarr(zarr.open_group(path, mode="r"))  # the NGFF 0.5 schema, strictly
    assert image.ome_attributes.version == "0.5"

    nodes = list(Reader(parse_url(path))())
    assert Multiscales.matches(nodes[0].zarr)
    meta = zarr.open_group(path, mode="r").attrs["ome"]
    assert meta["version"] == "0.5"
    (ms,) = meta["multiscales"]
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [
        ("z", "space", "nanometer"), ("y", "space", "nanometer"), ("x", "space", "nanometer"),
    ]  # fmt: skip
    levels = nodes[0].data
    assert [lvl.shape for lvl in levels] == [(9, 201, 250), (9, 101, 125), (9, 51, 63)]
    for k, dataset in enumerate(ms["datasets"]):
        transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
        assert dataset["path"] == str(k)
        assert transforms["scale"]["scale"] == [20.0, 8.0 * 2**k, 8.0 * 2**k]
        # a coarse pixel's centre lies between the fine pixels it averages
        shift = transforms.get("translation", {"translation": [0.0, 0.0, 0.0]})["translation"]
        assert shift == [0.0, (2**k - 1) * 4.0, (2**k - 1) * 4.0]
    np.testing.assert_array_equal(np.asarray(levels[0]), slices)
    expected = slices
    for k in (1, 2):
        expected = np.stack([reference_downsample(p) for p in expected])
        np.testing.assert_array_equal(np.asarray(levels[k]), expected)


def test_one_file_per_slice_and_level(tmp_path, slices):
    """Concurrent writers of different slices never touch the same file."""
    volume = OmeZarrVolume.create(
        tmp_path / "v.zarr", depth=3, slice_shape=(1100, 600), dtype=np.uint16, levels=2
    )
    assert not volume.has_slice(1)
    volume.write_slice(1, np.zeros((1100, 600), np.uint16))  # an all-zero slice is written too
    assert volume.has_slice(1) and not volume.has_slice(0) and not volume.has_slice(2)
    files = sorted(
        p.relative_to(tmp_path / "v.zarr").as_posix()
        for p in (tmp_path / "v.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"
    )  # fmt: skip
    assert files == ["0/c/1/0/0", "1/c/1/0/0"]


def test_live_slices_out_of_order_give_the_same_volume_as_one_write(tmp_path, slices):
    at_once = OmeZarrVolume.create(
        tmp_path / "once.zarr", depth=9, slice_shape=slices.shape[1:], dtype=np.uint8, levels=3
    )
    for z, plane in enumerate(slices):
        at_once.write_slice(z, plane)
    live = LiveVolume(
        tmp_path / "live.zarr", slice_shape=slices.shape[1:], dtype=np.uint8, levels=3,
        index_offset=1, voxel_size=VoxelSize(10.0, 10.0, 10.0),
    )  # fmt: skip
    assert live.depth == 0
    order = list(range(9))
    random.Random(4).shuffle(order)
    for z in order:
        assert live.write_slice(z + 1, slices[z]) == z  # slice index 1 is z 0
    reopened = OmeZarrVolume.open(tmp_path / "live.zarr")
    assert reopened.shape == (9, 201, 250)
    for k in range(3):
        np.testing.assert_array_equal(reopened.read(k), at_once.read(k))
    Image.from_zarr(zarr.open_group(tmp_path / "live.zarr", mode="r"))


def test_live_volume_reopens_where_it_stopped_and_appends(tmp_path, slices):
    live = LiveVolume(tmp_path / "live.zarr", slice_shape=slices.shape[1:], dtype=np.uint8,
                      index_offset=5)  # fmt: skip
    live.write_slice(5, slices[0])
    live.write_slice(7, slices[2])  # index 6 not acquired yet: a plane of zeros
    again = LiveVolume(tmp_path / "live.zarr", slice_shape=slices.shape[1:], dtype=np.uint8)
    assert (again.index_offset, again.depth) == (5, 3)
    assert again.append(slices[3]) == 3
    data = again.volume.read(0)
    np.testing.assert_array_equal(data[[0, 2, 3]], slices[[0, 2, 3]])
    assert not data[1].any() and not again.volume.has_slice(1)
    with pytest.raises(ValueError, match="below the volume's index offset"):
        again.write_slice(4, slices[0])


def test_an_incompatible_path_is_refused_with_a_clear_message(tmp_path):
    OmeZarrVolume.create(tmp_path / "a.zarr", depth=1, slice_shape=(64, 64), dtype=np.uint8)
    with pytest.raises(OutputError, match="holds 64×64 uint8 slices, these are 64×64 uint16"):
        LiveVolume(tmp_path / "a.zarr", slice_shape=(64, 64), dtype=np.uint16)
    (tmp_path / "plain").mkdir()
    with pytest.raises(OutputError, match="is not a Zarr v3 group"):
        OmeZarrVolume.open(tmp_path / "plain")
    zarr.open_group(tmp_path / "bare.zarr", mode="w", zarr_format=3)
    with pytest.raises(OutputError, match="is not an OME-Zarr 0.5 volume"):
        OmeZarrVolume.open(tmp_path / "bare.zarr")
    with pytest.raises(OutputError, match="already exists"):
        OmeZarrVolume.create(tmp_path / "a.zarr", depth=1, slice_shape=(8, 8), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (1, 3), (250, 201)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_downsample2_is_the_rounded_block_mean(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=dtype)
    got = downsample2(image)
    assert got.dtype == dtype and got.shape == ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    np.testing.assert_array_equal(got, reference_downsample(image))
    flat = np.full(shape, 77, dtype)
    assert (downsample2(flat) == 77).all()


def test_automatic_levels_stop_near_256_pixels():
    assert auto_levels((250, 250)) == 1
    assert auto_levels((4096, 6144)) == 6  # 6144 → 192
    assert level_shapes((4096, 6144), 6)[-1] == (128, 192)


def test_voxel_size_from_imagej_metadata_of_the_real_volume(fib25_path):
    voxel = voxel_size_from_tiff(fib25_path)
    assert voxel.zyx() == pytest.approx([10.0, 10.0, 10.0]) and voxel.unit == "nanometer"


def test_voxel_size_from_fei_metadata_takes_z_from_x_with_a_warning(tmp_path, caplog):
    fei = "[Scan]\r\nPixelWidth=4.5e-09\r\nPixelHeight=4.5e-09\r\n"
    path = tmp_path / "fei.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8),
                     extratags=[(34682, "s", 0, fei, True)])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="nrrn_daemon"):
        voxel = voxel_size_from_tiff(path)
    assert voxel.zyx() == pytest.approx([4.5, 4.5, 4.5]) and voxel.source == "FEI metadata"
    assert "records no slice spacing" in caplog.text


def test_voxel_size_from_resolution_in_centimetres_and_none_at_all(tmp_path, caplog):
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, np.zeros((8, 8), np.uint8), resolution=(2e6, 1e6), resolutionunit=3)
    assert voxel_size_from_tiff(cm).zyx()[1:] == pytest.approx([10.0, 5.0])  # y, x in nm
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, np.zeros((8, 8), np.uint8))  # tifffile's default: 1 px per inch
    with caplog.at_level(logging.WARNING, logger="nrrn_daemon"):
        voxel = voxel_size_from_tiff(bare)
    assert voxel.zyx() == [1.0, 1.0, 1.0] and voxel.unit is None
    assert "records no pixel size" in caplog.text


def test_voxel_size_option():
    assert parse_voxel_size("30,5,5").zyx() == [30.0, 5.0, 5.0]
    with pytest.raises(InputError, match="three comma-separated numbers"):
        parse_voxel_size("5,5")
    with pytest.raises(InputError, match="positive"):
        parse_voxel_size("0,5,5")
