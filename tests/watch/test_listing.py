"""The ``"listing"`` observer on real folders: names only each interval, stats only what is new.

The behaviour shared with the other observers (slow writers, truncated files, ignored names, a
vanished folder...) is checked for all three in test_watch.py. Here: what makes the listing
cheap (no stat of a known file between two reconciliation scans, counted by wrapping
``os.stat`` / ``os.lstat``), what it leaves to the reconciliation (files rewritten in place),
and that its memory follows the folder. Most tests drive :meth:`Watcher.poll` on an explicit
clock, so listing intervals and settle times pass without sleeping.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_watcher import GLOB, make_watcher, slice_name, tiff_bytes

from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.watch.listing import FolderListing
from nrrn_daemon.watch.watcher import PollResult, Watcher

T0 = 1_000_000.0  # the explicit clock's start
SMALL = (16, 16)  # small TIFFs: these tests are about names and stats, not pixels


def listing(folder: Path, **kwargs: object) -> Watcher:
    """A listing watcher on an explicit clock: listing every 1 s, settle 0.5 s, no rescan."""
    options: dict = dict(poll_interval_s=1.0, settle_s=0.5, rescan_interval_s=1e9)
    options.update(kwargs)
    return make_watcher(folder, "listing", **options)


def write_slices(folder: Path, indices: range, shape: tuple[int, int] = SMALL) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        path = folder / slice_name(i)
        path.write_bytes(tiff_bytes(i, shape))
        paths.append(path)
    return paths


def settle_all(watcher: Watcher, t: float) -> list[Path]:
    """Poll at ``t`` (stat) and ``t + settle`` (decode): what was pending is reported."""
    first = watcher.poll(t)
    second = watcher.poll(t + watcher.settle_s)
    assert first.failed == [] and second.failed == []
    return first.complete + second.complete


@pytest.fixture
def stats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path given to ``os.stat`` / ``os.lstat`` (and so to ``Path.stat``) from now on."""
    calls: list[str] = []
    real_stat, real_lstat = os.stat, os.lstat

    def counting(real):  # noqa: ANN001, ANN202 - a thin wrapper
        def wrapper(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if not isinstance(path, int):
                calls.append(os.fsdecode(path))
            return real(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "stat", counting(real_stat))
    monkeypatch.setattr(os, "lstat", counting(real_lstat))
    yield calls


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "incoming"
    path.mkdir()
    return path


def test_known_files_are_not_stated_between_reconciliations(folder: Path, stats: list[str]):
    old = write_slices(folder, range(300))
    with listing(folder) as watcher:
        assert sorted(settle_all(watcher, T0)) == old

        stats.clear()
        for k in range(1, 21):  # 20 listings of a 300-file folder
            assert watcher.poll(T0 + k).complete == []
        assert set(stats) == {str(folder)}  # only the folder itself, once a poll
        assert len(stats) == 20

        [new] = write_slices(folder, range(300, 301))
        stats.clear()
        assert settle_all(watcher, T0 + 21) == [new]
        assert str(new) in stats  # the new name is stat-ed (and decoded: tifffile stats too)
        assert not set(stats) & set(map(str, old))  # no known file is


def test_recursive_listing_stats_only_new_names(folder: Path, stats: list[str]):
    old = [
        p
        for run in ("run-1", "run-2", "run-2/part-b")
        for p in write_slices(folder / run, range(40))
    ]
    with listing(folder, recursive=True) as watcher:
        assert len(settle_all(watcher, T0)) == 120

        stats.clear()
        for k in range(1, 11):
            assert watcher.poll(T0 + k).complete == []
        assert set(stats) == {str(folder)}

        [new] = write_slices(folder / "run-2" / "part-b", range(40, 41))
        stats.clear()
        assert settle_all(watcher, T0 + 11) == [new]
        assert str(new) in stats
        assert not set(stats) & set(map(str, old))  # (its folders are: tifffile's realpath)


def test_a_file_rewritten_in_place_is_found_by_the_reconciliation(folder: Path):
    [path] = write_slices(folder, range(1))
    with listing(folder, rescan_interval_s=10.0) as watcher:
        assert settle_all(watcher, T0) == [path]

        path.write_bytes(tiff_bytes(2, (32, 32)))  # same name, new content
        for k in range(1, 10):  # listings see only names: the rewrite waits for the rescan
            assert watcher.poll(T0 + k).complete == []
        assert settle_all(watcher, T0 + 10) == [path]
        assert watcher.poll(T0 + 11).complete == []  # once


def test_names_of_removed_files_are_forgotten(folder: Path):
    paths = write_slices(folder, range(50))
    (folder / "notes.txt").write_text("not a slice")
    with listing(folder) as watcher:
        assert sorted(settle_all(watcher, T0)) == paths
        assert watcher.remembered == 50 + 51  # reported files + names listed

        for path in paths[10:]:
            path.unlink()
        assert watcher.poll(T0 + 1) == PollResult()  # nothing to report
        assert watcher.remembered == 10 + 11

        (folder / "notes.txt").unlink()
        paths[10].write_bytes(tiff_bytes(10, SMALL))  # a name that comes back is new again
        assert settle_all(watcher, T0 + 2) == [paths[10]]
        assert watcher.remembered == 11 + 11


def test_recursive_listing_follows_new_and_removed_sub_folders(folder: Path):
    old = write_slices(folder / "run-1", range(3))
    hidden = write_slices(folder / ".snapshot", range(3))
    elsewhere = write_slices(folder.parent / "elsewhere", range(3))
    (folder / "link").symlink_to(folder.parent / "elsewhere")  # not followed
    with listing(folder, recursive=True) as watcher:
        assert sorted(settle_all(watcher, T0)) == old

        # A new run folder, two levels deep, written after the start: found by the listing.
        new = write_slices(folder / "run-2" / "tile-a", range(2))
        assert sorted(settle_all(watcher, T0 + 1)) == new
        remembered = watcher.remembered

        shutil.rmtree(folder / "run-1")
        assert watcher.poll(T0 + 2).complete == []
        assert watcher.remembered == remembered - 2 * 3 - 1  # 3 reported, 3 names, the folder
    reported = {str(p) for p in old + new}
    assert not any(p in reported for p in map(str, hidden + elsewhere))


def test_a_non_recursive_listing_ignores_sub_folders_and_folders_named_like_slices(
    folder: Path,
):
    write_slices(folder / "run-1", range(3))
    (folder / slice_name(7)).mkdir()  # matches the glob, but a folder
    [top] = write_slices(folder, range(1))
    with listing(folder) as watcher:
        assert settle_all(watcher, T0) == [top]
        (folder / slice_name(8)).mkdir()
        write_slices(folder / "run-1", range(3, 5))
        assert settle_all(watcher, T0 + 1) == []
        assert watcher.idle


def test_a_clock_stepped_back_does_not_stop_the_listing(folder: Path):
    with listing(folder) as watcher:
        watcher.poll(T0)
        [path] = write_slices(folder, range(1))
        assert settle_all(watcher, T0 - 3600) == [path]  # the wall clock went back an hour


def test_the_listing_runs_no_thread(folder: Path):
    before = set(threading.enumerate())
    with listing(folder) as watcher:
        write_slices(folder, range(1))
        watcher.poll(T0)
        assert set(threading.enumerate()) == before


def test_a_replaced_folder_is_listed_afresh(folder: Path):
    """A share remounted: same path, new inode, same names with other content."""
    [path] = write_slices(folder, range(1))
    with listing(folder) as watcher:
        assert settle_all(watcher, T0) == [path]
        os.rename(folder, folder.parent / "old-mount")  # kept: its inode cannot be reused
        write_slices(folder, range(1), shape=(24, 24))  # same name, new content
        assert settle_all(watcher, T0 + 0.1) == [path]  # rescanned at once, not at the interval


def test_the_listing_lists_only_when_due(folder: Path, monkeypatch: pytest.MonkeyPatch):
    listed: list[str] = []
    real = os.listdir

    def counting(path):  # noqa: ANN001, ANN202
        listed.append(os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    with listing(folder, poll_interval_s=2.0) as watcher:
        listed.clear()
        for dt in np.arange(0.0, 10.0, 0.1):  # the daemon polls every 0.1 s
            watcher.poll(T0 + dt)
        assert len(listed) == 4  # at +2, +4, +6, +8 s: the first poll only starts the clock


def test_a_microscope_writing_slowly_into_a_big_folder(tmp_path: Path):
    """Real time: slices written in parts into a 2,000-file folder, each reported once, whole."""
    folder = tmp_path / "incoming"
    known = write_slices(folder, range(2000))
    volume = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    scope = Microscope(
        folder, volume, name_pattern="SEM Image - SliceImage - {:04d}.tif", first_index=5000,
        interval_s=0.2, chunks=3, chunk_pause_s=0.3,
    )  # fmt: skip
    watcher = make_watcher(folder, "listing", poll_interval_s=0.1, settle_s=0.15)
    for path in known:
        watcher.mark_known(path)  # as the daemon does for what its store holds
    reported: dict[Path, int] = {}  # path -> its size when it was reported
    failed: list[tuple[Path, str]] = []

    def take(result: PollResult) -> None:
        failed.extend(result.failed)
        for path in result.complete:
            assert path not in reported, f"{path} reported twice"
            reported[path] = path.stat().st_size

    with watcher:
        scope.start()
        try:
            deadline = time.monotonic() + 20.0
            while len(reported) < len(volume):
                assert time.monotonic() < deadline, f"gave up: {reported}, {failed}"
                take(watcher.poll())
                time.sleep(0.02)
            # Nothing more comes: every slice is written whole by now, so a rescan that stats
            # every file, then polls until nothing is pending, would report any again.
            watcher.rescan()
            while True:
                take(watcher.poll())
                if watcher.idle:
                    break
                assert time.monotonic() < deadline, f"still pending: {reported}, {failed}"
                time.sleep(0.02)
        finally:
            scope.stop()
    assert list(reported) == scope.written and failed == []
    for path, size in reported.items():  # reported whole: the size it had then is its final size
        assert size == path.stat().st_size


def test_folder_listing_alone(folder: Path):
    """FolderListing is a plain object: names in, new paths and vanished paths out."""
    write_slices(folder, range(2))
    (folder / "a.tif.part").write_bytes(b"")
    lister = FolderListing(folder, GLOB, recursive=False, poll_interval_s=1.0)
    lister.rebuild()
    assert lister.take(T0) == (set(), set())  # starts the clock
    assert len(lister) == 3
    [new] = write_slices(folder, range(2, 3))
    (folder / slice_name(0)).unlink()
    assert lister.take(T0 + 0.5) == (set(), set())  # not due
    assert lister.take(T0 + 1.0) == ({new}, {folder / slice_name(0)})
    lister.stop()
    assert len(lister) == 0
