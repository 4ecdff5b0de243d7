"""Real microscope layouts through the real daemon: burst and live (a real observer watching a
real folder, the microscope fixture writing each slice slowly), a real tiny NRRN on the CPU.

Every output opens with tifffile, skimage, imageio and PIL with the same pixels, keeps every tag
of its input, its databar rows byte for byte, and has its image area denoised
(:func:`vendor_tiffs.check_output`). Files that cannot be denoised as grey levels fail with one
clear line and get no output.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_daemon import Running, make_profile
from vendor_tiffs import BAD, BAR, LAYOUTS, check_output

from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.store.store import Store

NAME = "slice_{:03d}.tif"


def _outputs(db: Path) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT s.name, o.mode, o.path FROM outputs o "
            "JOIN slices s ON s.id = o.centre_slice_id WHERE o.is_current"
        ).fetchall()
    return {name: (mode, path) for name, mode, path in rows}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_burst_keeps_every_tag_and_the_databar(tmp_path, tiny_checkpoint, layout):
    vendor = LAYOUTS[layout]
    profile = make_profile(tmp_path, tiny_checkpoint, **{"image.databar": "auto"})
    for k in range(3):
        vendor.write(tmp_path / "raw" / NAME.format(k), seed=k)
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    outs = _outputs(profile.store.database)
    assert sorted(outs) == [NAME.format(k) for k in range(3)]
    assert outs[NAME.format(1)][0] == "triplet"
    for name, (_, path) in outs.items():
        check_output(tmp_path / "raw" / name, Path(path), databar_rows=BAR if vendor.databar else 0)


@pytest.mark.parametrize("layout", ["zeiss-palette-34118", "helios-g4-34683", "exif-gps-ifd"])
def test_live_acquisition_of_vendor_files(tmp_path, tiny_checkpoint, layout):
    vendor = LAYOUTS[layout]
    profile = make_profile(
        tmp_path, tiny_checkpoint,
        **{"image.databar": "auto", "watch.observer": "native", "grouping.neighbour_wait_s": 30.0},
    )  # fmt: skip
    volume = np.stack([vendor.pixels(k) for k in range(4)])
    scope = Microscope(
        tmp_path / "raw", volume, NAME, interval_s=0.1, chunks=3, chunk_pause_s=0.05,
        encode=vendor.encode,
    )  # fmt: skip
    with Running(profile) as run:
        scope.start()
        # the two interior slices are done as triplets once their neighbours are there
        run.wait_for(lambda: {NAME.format(1), NAME.format(2)} <= set(run.outputs))
        scope.stop()
    outs = _outputs(profile.store.database)
    for k in (1, 2):
        mode, path = outs[NAME.format(k)]
        assert mode == "triplet"
        check_output(
            tmp_path / "raw" / NAME.format(k), Path(path), databar_rows=BAR if vendor.databar else 0
        )


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_fail_with_one_line_and_no_output(tmp_path, tiny_checkpoint, kind):
    write, expected = BAD[kind]
    profile = make_profile(tmp_path, tiny_checkpoint, **{"image.databar": "auto"})
    for k in range(3):
        LAYOUTS["zeiss-palette-34118"].write(tmp_path / "raw" / NAME.format(k), seed=k)
    write(tmp_path / "raw" / NAME.format(1))  # the middle slice is bad
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    with sqlite3.connect(profile.store.database) as con:
        state, reason = con.execute(
            "SELECT state, reason FROM slices WHERE name = ?", (NAME.format(1),)
        ).fetchone()
    assert state == "failed" and expected in reason and "\n" not in reason
    assert NAME.format(1) not in _outputs(profile.store.database)
    assert not (tmp_path / "out" / NAME.format(1)).exists()
    # the good slices around it are still denoised
    assert {NAME.format(0), NAME.format(2)} <= set(_outputs(profile.store.database))


def test_the_live_volume_of_palette_slices_holds_their_grey_values(tmp_path, tiny_checkpoint):
    profile = make_profile(
        tmp_path, tiny_checkpoint, **{"image.databar": "auto", "output.zarr": "live.zarr"}
    )
    for k in range(3):
        LAYOUTS["zeiss-palette-34118"].write(tmp_path / "raw" / NAME.format(k), seed=k)
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    volume = OmeZarrVolume.open(tmp_path / "out" / "live.zarr").read(0)
    for k in range(3):
        out = tmp_path / "out" / NAME.format(k)
        check_output(tmp_path / "raw" / NAME.format(k), out, databar_rows=0)
        # a grey ramp: the palette indices are the grey levels the volume shows
        np.testing.assert_array_equal(volume[k], tifffile.imread(out))
