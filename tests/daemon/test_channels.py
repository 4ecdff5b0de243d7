"""Several detectors in one daemon (``watch.channels`` globs, or ``watch.detectors`` names):
Auto Slice & View's "SEM Image" and "SEM Image 2" slices in one folder, each its own data set with
its own triplets and model, one loop, one database writer. Real files in the FEI layout, a real
observer, a real tiny NRRN."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from test_daemon import Running, make_profile
from vendor_tiffs import BAR, LAYOUTS, check_output

from nrrn_daemon.daemon.channels import Channels, make_daemon
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.store.store import Store

FIRST = "SEM Image - SliceImage - {:03d}.tif"
SECOND = "SEM Image 2 - SliceImage - {:03d}.tif"
CHANNELS = {"SEM Image": "SEM[ _]Image[ -][-S]*.tif", "SEM Image 2": "SEM[ _]Image[ _]2[ -]*.tif"}
FORMS = {
    "channels": {"watch.channels": CHANNELS},
    "detectors": {"watch.detectors": ["SEM Image", "SEM Image 2"]},
}
"""The two ways a profile names the detectors: globs per channel, or Auto Slice & View names."""


def _profile(tmp_path: Path, ckpt: Path, form: str = "channels", **extra: object):
    return make_profile(
        tmp_path, ckpt, **{
            "watch.glob": "*.tif", "watch.index_regex": r"SliceImage ?- ?(?P<index>\d+)\.tif$",
            **FORMS[form], "image.databar": "auto", **extra,
        },
    )  # fmt: skip


def _units(db: Path) -> dict[str, tuple[str, str, list[str]]]:
    """centre name → (data set, mode, input names) of every current output."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT s.name, d.name, o.mode, o.id FROM outputs o JOIN slices s ON s.id ="
            " o.centre_slice_id JOIN datasets d ON d.id = o.dataset_id WHERE o.is_current"
        ).fetchall()
        units = {}
        for name, dataset, mode, output_id in rows:
            inputs = con.execute(
                "SELECT s.name FROM output_inputs i JOIN slices s ON s.id = i.slice_id"
                " WHERE i.output_id = ? ORDER BY s.name",
                (output_id,),
            ).fetchall()
            units[name] = (dataset, mode, [n for (n,) in inputs])
    return units


@pytest.mark.parametrize("form", sorted(FORMS))
def test_two_detectors_are_two_data_sets_in_one_burst(tmp_path, tiny_checkpoint, form):
    profile = _profile(tmp_path, tiny_checkpoint, form)
    layout = LAYOUTS["fei-ini-34682"]
    for k in range(1, 4):
        layout.write(tmp_path / "raw" / FIRST.format(k), seed=k)
        layout.write(tmp_path / "raw" / SECOND.format(k), seed=10 + k)
    with Store(profile.store.database) as store:
        daemon = make_daemon(profile, store)
        assert isinstance(daemon, Channels)
        assert daemon.work(burst=True) == "burst complete"
        ids = store.dataset_ids()
    folder = Path(profile.watch.folder).resolve()
    assert set(ids) == {f"{folder} [SEM Image]", f"{folder} [SEM Image 2]"}
    units = _units(profile.store.database)
    assert len(units) == 6
    for pattern, channel in ((FIRST, "SEM Image"), (SECOND, "SEM Image 2")):
        for k in range(1, 4):
            dataset, mode, inputs = units[pattern.format(k)]
            assert dataset == f"{folder} [{channel}]"
            # neighbours come from the same detector only
            assert inputs == sorted(pattern.format(j) for j in (k - 1, k, k + 1) if 1 <= j <= 3)
            assert mode == ("triplet" if k == 2 else "pair")
            name = pattern.format(k)
            check_output(tmp_path / "raw" / name, tmp_path / "out" / name, databar_rows=BAR)
    with sqlite3.connect(profile.store.database) as con:
        ((runs,),) = con.execute("SELECT count(*) FROM runs").fetchall()
        ((state,),) = con.execute("SELECT state_json FROM runs").fetchall()
    assert runs == 1 and '"SEM Image 2"' in state


def test_the_underscore_spelling_is_the_first_detector(tmp_path, tiny_checkpoint):
    profile = _profile(tmp_path, tiny_checkpoint)
    for k in range(1, 4):
        LAYOUTS["fei-ini-34682"].write(tmp_path / "raw" / f"SEM_Image-SliceImage-{k:03d}.tif", k)
    with Store(profile.store.database) as store:
        assert make_daemon(profile, store).work(burst=True) == "burst complete"
    units = _units(profile.store.database)
    assert {u[0] for u in units.values()} == {f"{Path(profile.watch.folder).resolve()} [SEM Image]"}
    assert units["SEM_Image-SliceImage-002.tif"][1] == "triplet"


class RunningChannels(Running):
    """The test harness of ``test_daemon`` around a :class:`Channels` loop."""

    def __init__(self, profile) -> None:
        self.store = Store(profile.store.database)
        self.outputs: list[str] = []
        self.daemon = Channels(profile, self.store, on_event=self._event)
        self.reason = None
        self.thread = threading.Thread(target=self._run, name="nrrn-test-daemon")


def test_live_two_detectors(tmp_path, tiny_checkpoint):
    profile = _profile(tmp_path, tiny_checkpoint, **{"grouping.neighbour_wait_s": 30.0})
    layout = LAYOUTS["zeiss-palette-34118"]
    volume = np.stack([layout.pixels(k) for k in range(3)])
    scopes = [
        Microscope(tmp_path / "raw", volume, pattern, interval_s=0.1, chunks=2,
                   first_index=1, encode=layout.encode)
        for pattern in (FIRST, SECOND)
    ]  # fmt: skip
    with RunningChannels(profile) as run:
        for scope in scopes:
            scope.start()
        run.wait_for(lambda: {FIRST.format(2), SECOND.format(2)} <= set(run.outputs))
        for scope in scopes:
            scope.stop()
    units = _units(profile.store.database)
    assert units[FIRST.format(2)][1:] == ("triplet", sorted(FIRST.format(j) for j in (1, 2, 3)))
    assert units[SECOND.format(2)][1:] == ("triplet", sorted(SECOND.format(j) for j in (1, 2, 3)))
    for name in (FIRST.format(2), SECOND.format(2)):
        check_output(tmp_path / "raw" / name, tmp_path / "out" / name, databar_rows=0)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"watch.channels": {"a/b": "*.tif"}}, "channel name 'a/b'"),
        ({"watch.channels": {"one": "x/*.tif"}}, "channel 'one'"),
        ({"watch.channels": {"a": "a*.tif", "b": "b*.tif"}, "output.naming": "{index}.tif"},
         "the same output names"),
    ],
)  # fmt: skip
def test_bad_channels_are_refused_with_the_reason(tmp_path, tiny_checkpoint, extra, expected):
    from nrrn_daemon.errors import NRRNError

    with pytest.raises(NRRNError, match=expected):
        make_profile(tmp_path, tiny_checkpoint, **extra)


def test_a_profile_without_channels_is_one_daemon(tmp_path, tiny_checkpoint):
    profile = make_profile(tmp_path, tiny_checkpoint)
    with Store(profile.store.database) as store:
        assert type(make_daemon(profile, store)) is Daemon
