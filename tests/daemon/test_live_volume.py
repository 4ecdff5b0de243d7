"""The daemon's live OME-Zarr volume: each denoised slice also lands in one growing volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from helpers import zarr_io_threads  # noqa: F401
from test_daemon import make_profile

from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.errors import ProfileError
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.store.store import Store

pytestmark = pytest.mark.usefixtures("zarr_io_threads")

NAME = "slice_{:04d}.tif"


def profile_for(tmp_path: Path, ckpt: Path, **extra: object):
    return make_profile(tmp_path, ckpt, **{"grouping.neighbour_wait_s": 30.0, **extra})


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(20, 230, size=(7, 40, 56), dtype=np.uint8)


def test_every_output_is_also_in_the_live_volume(tmp_path, tiny_checkpoint, volume) -> None:
    profile = profile_for(tmp_path, tiny_checkpoint, **{"output.zarr": "live.ome.zarr"})
    assert profile.output.zarr_path == tmp_path / "out" / "live.ome.zarr"
    # Out of order, as a microscope's repeat or a late copy would deliver them.
    Microscope(tmp_path / "raw", volume, NAME, interval_s=0.0, chunks=1,
               order=[3, 0, 6, 1, 5, 2, 4]).run()  # fmt: skip
    with Store(profile.store.database) as store:
        daemon = Daemon(profile, store)
        assert daemon.work(burst=True) == "burst complete"
        live = store.status()["run"]["live"]["live_volume"]
    assert live["written"] == len(volume) and live["errors"] == 0

    vol = OmeZarrVolume.open(tmp_path / "out" / "live.ome.zarr")
    stack = vol.read(0)
    assert stack.shape == volume.shape and stack.dtype == np.uint8
    for k in range(len(volume)):
        np.testing.assert_array_equal(stack[k], tifffile.imread(tmp_path / "out" / NAME.format(k)))
    # A pyramid level is the 2×2 mean of the level above (NGFF metadata checked in test_omezarr).
    group = zarr.open_group(tmp_path / "out" / "live.ome.zarr", mode="r")
    scales = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(scales) == vol.levels >= 1


def test_a_volume_that_cannot_be_written_never_fails_a_slice(
    tmp_path, tiny_checkpoint, volume
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "live.ome.zarr").write_text("not a volume")
    profile = profile_for(tmp_path, tiny_checkpoint, **{"output.zarr": "live.ome.zarr"})
    Microscope(tmp_path / "raw", volume[:3], NAME, interval_s=0.0, chunks=1).run()
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
        live = store.status()["run"]["live"]["live_volume"]
    assert live["written"] == 0 and live["errors"] == 3
    assert "live.ome.zarr" in live["last_error"] or "volume" in live["last_error"]
    assert sorted(p.name for p in (tmp_path / "out").glob("slice_*.tif")) == [
        NAME.format(k) for k in range(3)
    ], "every TIFF output is written"


def test_a_live_volume_inside_the_watch_folder_is_refused(tmp_path, tiny_checkpoint) -> None:
    with pytest.raises(ProfileError, match="output.zarr"):
        profile_for(tmp_path, tiny_checkpoint, **{"output.zarr": str(tmp_path / "raw" / "v")})
