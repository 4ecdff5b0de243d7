"""The watcher, with real observers (inotify, polling, listing) on real folders and TIFFs.

A ``microscope`` fixture plays the acquisition PC: it writes real TIFF slices, in parts with
pauses longer than the settle time, the way a slow writer on a share does. What only the listing
mode does (no stat of known files, forgetting, recursion by listing) is in test_watch_scan.py.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nrrn_daemon.errors import InputError, NRRNError
from nrrn_daemon.watch.watcher import PollResult, Watcher

SETTLE = 0.25
GRACE = 1.0
GLOB = "SEM Image - SliceImage - *.tif"
KINDS = ["native", "polling", "listing"]
EVENT_KINDS = ["native", "polling"]  # watchdog observers: a thread, events that can be lost


def tiff_decodes(path: Path) -> tuple[bool, str]:
    """A real decode check: read every byte of the image with tifffile."""
    try:
        with tifffile.TiffFile(path) as tif:
            tif.asarray()
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def slice_name(index: int) -> str:
    return f"SEM Image - SliceImage - {index:03d}.tif"


def tiff_bytes(seed: int, shape: tuple[int, int] = (192, 256)) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    return buf.getvalue()


class Seen:
    """Everything a watcher reported over several polls."""

    def __init__(self) -> None:
        self.complete: list[Path] = []
        self.failed: list[tuple[Path, str]] = []
        self.folder_errors: list[str] = []

    def add(self, result: PollResult) -> None:
        self.complete += result.complete
        self.failed += result.failed
        if result.folder_error is not None:
            self.folder_errors.append(result.folder_error)


class Clock:
    """The watcher's time in these tests: moved on by each helper poll, not by the wall clock.

    Settle times, the grace and rescan intervals then pass by the number of polls the test
    makes, whatever the machine's load; the real sleeps between polls only let the observers'
    threads deliver their events.
    """

    STEP = 0.02

    def __init__(self) -> None:
        self.now = 1000.0

    def tick(self) -> float:
        self.now += self.STEP
        return self.now


CLOCK = Clock()


def poll_until(
    watcher: Watcher, done: Callable[[Seen], bool], timeout: float = 120.0, seen: Seen | None = None
) -> Seen:
    """Poll (the watcher's time moving on by one step each) until ``done(seen)``; a real
    ``timeout`` fails only a watcher that never gets there."""
    seen = Seen() if seen is None else seen
    deadline = time.monotonic() + timeout
    while not done(seen):
        assert time.monotonic() < deadline, (
            f"gave up after {timeout} s: complete={seen.complete}, failed={seen.failed}"
        )
        time.sleep(0.02)
        seen.add(watcher.poll(CLOCK.tick()))
    return seen


def poll_for(watcher: Watcher, seconds: float, seen: Seen | None = None) -> Seen:
    """Poll for ``seconds`` of the watcher's time."""
    seen = Seen() if seen is None else seen
    end = CLOCK.now + seconds
    while CLOCK.now < end:
        seen.add(watcher.poll(CLOCK.tick()))
        time.sleep(0.02)
    return seen


def wait_seen(watcher: Watcher, files: int) -> None:
    """Poll until the watcher holds ``files`` candidates: the observer's hints (asynchronous)
    have come in, and a candidate's settle and grace times count from the poll that saw it."""
    deadline = time.monotonic() + 120.0
    while watcher.poll(CLOCK.tick()).pending < files:
        assert time.monotonic() < deadline, "the watcher never saw the file"
        time.sleep(0.02)


class Microscope:
    """Writes slices into a folder like an acquisition PC: whole, or in parts with pauses."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def write_slowly(
        self, name: str, data: bytes, *, parts: int, pause_s: float, watcher: Watcher
    ) -> Seen:
        """Open the file, write it in ``parts`` with pauses; the watcher is polled meanwhile.

        Returns what the watcher reported *while the file was incomplete*.
        """
        seen = Seen()
        size = -(-len(data) // parts)
        with open(self.folder / name, "wb") as fh:
            for start in range(0, len(data), size):
                fh.write(data[start : start + size])
                fh.flush()
                if start + size < len(data):
                    wait_seen(watcher, 1)  # then the pause is on the watcher's clock
                    poll_for(watcher, pause_s, seen)
        return seen


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "incoming"
    path.mkdir()
    return path


@pytest.fixture
def microscope(folder: Path) -> Microscope:
    return Microscope(folder)


def make_watcher(folder: Path, kind: str = "native", **kwargs: object) -> Watcher:
    options: dict = dict(
        observer=kind,
        poll_interval_s=0.1,
        settle_s=SETTLE,
        failure_grace_s=GRACE,
        rescan_interval_s=1e9,  # only events, unless a test says otherwise
        decode_check=tiff_decodes,
    )
    options.update(kwargs)
    return Watcher(folder, GLOB, **options)


@pytest.fixture(params=KINDS)
def watcher(request: pytest.FixtureRequest, folder: Path) -> Iterator[Watcher]:
    with make_watcher(folder, request.param) as w:
        yield w


def test_slow_writer_is_reported_only_once_complete(watcher: Watcher, microscope: Microscope):
    data = tiff_bytes(1)
    # Pauses of 2×settle: the partial file is stable but does not decode, so it must wait.
    during = microscope.write_slowly(
        slice_name(1), data, parts=3, pause_s=2 * SETTLE, watcher=watcher
    )
    assert during.complete == [] and during.failed == []

    seen = poll_until(watcher, lambda s: bool(s.complete))
    assert seen.complete == [microscope.folder / slice_name(1)]
    assert seen.failed == []
    # Reported once: more polls bring nothing new.
    assert poll_for(watcher, 2 * SETTLE).complete == []


def test_truncated_tiff_ends_failed_with_reason(watcher: Watcher, microscope: Microscope):
    data = tiff_bytes(2)
    path = microscope.write(slice_name(2), data[: len(data) // 2])

    wait_seen(watcher, 1)
    t0 = CLOCK.now
    seen = poll_until(watcher, lambda s: bool(s.failed))
    assert CLOCK.now - t0 >= GRACE  # not before the grace is over
    assert seen.complete == []
    [(failed_path, reason)] = seen.failed
    assert failed_path == path
    assert "failed to read" in reason
    assert poll_for(watcher, 2 * SETTLE).failed == []  # reported once


def test_a_file_fixed_within_the_grace_is_complete(watcher: Watcher, microscope: Microscope):
    data = tiff_bytes(3)
    path = microscope.write(slice_name(3), data[:1000])
    wait_seen(watcher, 1)
    poll_for(watcher, 2 * SETTLE)  # stable and undecodable, but the grace is not over
    with open(path, "ab") as fh:  # the slow writer resumes
        fh.write(data[1000:])
    seen = poll_until(watcher, lambda s: bool(s.complete or s.failed))
    assert seen.complete == [path] and seen.failed == []


def test_files_written_while_stopped_are_found_at_start(folder: Path, microscope: Microscope):
    paths = [microscope.write(slice_name(i), tiff_bytes(i)) for i in (7, 8, 9)]
    with make_watcher(folder) as watcher:
        seen = poll_until(watcher, lambda s: len(s.complete) == 3)
    assert seen.complete == paths


def test_a_restarted_watcher_reports_old_files_again(folder: Path, microscope: Microscope):
    """A new process remembers nothing: the daemon's store (sha256) dedupes; the watcher reports."""
    path = microscope.write(slice_name(1), tiff_bytes(1))
    for _ in range(2):
        with make_watcher(folder) as watcher:
            assert poll_until(watcher, lambda s: bool(s.complete)).complete == [path]


class DeafWatcher(Watcher):
    """A watcher whose observer loses every event (an inotify overflow, a remote write)."""

    def _event_wanted(self, path: Path) -> bool:
        return False


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_lost_events_are_found_by_the_periodic_rescan(
    folder: Path, microscope: Microscope, kind: str
):
    watcher = DeafWatcher(
        folder, GLOB, observer=kind, poll_interval_s=0.1, settle_s=SETTLE,
        rescan_interval_s=0.3, failure_grace_s=GRACE, decode_check=tiff_decodes,
    )  # fmt: skip
    with watcher:
        path = microscope.write(slice_name(4), tiff_bytes(4))
        seen = poll_until(watcher, lambda s: bool(s.complete))
    assert seen.complete == [path]


def test_a_forced_rescan_finds_lost_events(folder: Path, microscope: Microscope):
    watcher = DeafWatcher(
        folder, GLOB, settle_s=SETTLE, rescan_interval_s=1e9, decode_check=tiff_decodes
    )
    with watcher:
        path = microscope.write(slice_name(5), tiff_bytes(5))
        assert poll_for(watcher, 3 * SETTLE).complete == []  # deaf, and no rescan due
        watcher.rescan()
        assert poll_until(watcher, lambda s: bool(s.complete)).complete == [path]


def test_other_names_part_files_and_folders_are_ignored(
    watcher: Watcher, microscope: Microscope, folder: Path
):
    data = tiff_bytes(6)
    for name in (
        "notes.txt",
        "SEM Image - SliceImage - 006.tif.part",
        "SEM Image - SliceImage - 006.tmp",
        ".SEM Image - SliceImage - 006.tif",
        "SEM Image 2 - SliceImage - 006.tif",  # the second detector: another glob
        "sem image - sliceimage - 006.tif",  # the glob is case-sensitive
    ):
        microscope.write(name, data)
    (folder / "SEM Image - SliceImage - 999.tif").mkdir()  # a folder named like a slice
    (folder / "SEM Image - SliceImage - 999.tif" / slice_name(998)).write_bytes(data)
    wanted = microscope.write(slice_name(6), data)

    seen = poll_until(watcher, lambda s: bool(s.complete))
    poll_for(watcher, GRACE + SETTLE, seen)  # long enough for anything else to show up
    watcher.rescan()
    poll_for(watcher, GRACE + SETTLE, seen)
    assert seen.complete == [wanted]
    assert seen.failed == []


def test_a_part_file_renamed_into_place_is_reported(watcher: Watcher, folder: Path):
    part = folder / (slice_name(10) + ".part")
    part.write_bytes(tiff_bytes(10))
    poll_for(watcher, 2 * SETTLE)
    os.replace(part, folder / slice_name(10))
    seen = poll_until(watcher, lambda s: bool(s.complete))
    assert seen.complete == [folder / slice_name(10)]


@pytest.mark.parametrize("kind", EVENT_KINDS)  # the listing: test_watch_scan.py
def test_a_rewritten_file_is_reported_again(folder: Path, microscope: Microscope, kind: str):
    with make_watcher(folder, kind) as watcher:
        path = microscope.write(slice_name(11), tiff_bytes(11))
        assert poll_until(watcher, lambda s: bool(s.complete)).complete == [path]
        assert poll_for(watcher, 2 * SETTLE).complete == []

        microscope.write(slice_name(11), tiff_bytes(12, shape=(200, 256)))
        assert poll_until(watcher, lambda s: bool(s.complete)).complete == [path]


def test_the_watch_folder_is_never_written(watcher: Watcher, microscope: Microscope):
    folder = microscope.folder
    microscope.write(slice_name(1), tiff_bytes(1))
    microscope.write(slice_name(2), tiff_bytes(2)[:500])
    before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns)
    poll_until(watcher, lambda s: bool(s.complete) and bool(s.failed))
    watcher.rescan()
    poll_for(watcher, 0.2)
    assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns) == before


def test_a_missing_watch_folder_is_a_clear_error(tmp_path: Path):
    watcher = make_watcher(tmp_path / "not-mounted")
    with pytest.raises(InputError, match=r"watch folder .*not-mounted does not exist — "):
        watcher.start()
    watcher.stop()
    assert issubclass(InputError, NRRNError)


@pytest.mark.parametrize("kind", KINDS)
def test_a_vanished_folder_is_reported_and_recovered(
    folder: Path, microscope: Microscope, kind: str
):
    before = set(threading.enumerate())
    with make_watcher(folder, kind) as watcher:
        shutil.rmtree(folder)  # the share went away
        result = watcher.poll(CLOCK.tick())
        assert result.folder_error is not None and "not reachable" in result.folder_error
        assert watcher.poll(CLOCK.tick()).folder_error == result.folder_error  # keeps going

        folder.mkdir()  # back (a new inode: the old inotify watch is dead)
        first = microscope.write(slice_name(1), tiff_bytes(1))  # arrived meanwhile
        seen = poll_until(watcher, lambda s: bool(s.complete))
        assert seen.complete == [first]
        assert watcher.poll(CLOCK.tick()).folder_error is None

        # The observer (or listing) was restarted: a new file is found, with no rescan due.
        second = microscope.write(slice_name(2), tiff_bytes(2))
        assert poll_until(watcher, lambda s: bool(s.complete)).complete == [second]
    assert [t.name for t in set(threading.enumerate()) - before] == []  # old observer joined


@pytest.mark.parametrize("kind", KINDS)
def test_recursive_watch_finds_slices_in_subfolders(
    folder: Path, microscope: Microscope, kind: str
):
    sub = folder / "run-2"
    sub.mkdir()
    old = microscope.write("run-2/" + slice_name(1), tiff_bytes(1))
    with make_watcher(folder, kind, recursive=True) as watcher:
        new = microscope.write("run-2/" + slice_name(2), tiff_bytes(2))
        seen = poll_until(watcher, lambda s: len(s.complete) == 2)
    assert sorted(seen.complete) == [old, new]


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_stop_joins_every_observer_thread(folder: Path, kind: str):
    before = set(threading.enumerate())
    watcher = make_watcher(folder, kind)
    watcher.start()
    assert any(t.name == "nrrn-watch-observer" for t in threading.enumerate())
    watcher.stop()
    watcher.stop()  # twice is fine
    assert [t.name for t in set(threading.enumerate()) - before] == []


def test_settle_and_grace_on_an_explicit_clock(folder: Path, microscope: Microscope):
    """poll(now=...) decides without sleeping; a failing file is decoded twice, not per poll."""
    calls: list[Path] = []

    def counting_check(path: Path) -> tuple[bool, str]:
        calls.append(path)
        return tiff_decodes(path)

    good = microscope.write(slice_name(1), tiff_bytes(1))
    bad = microscope.write(slice_name(2), tiff_bytes(2)[:3000])
    watcher = Watcher(
        folder, GLOB, settle_s=5.0, failure_grace_s=20.0, rescan_interval_s=1e9,
        decode_check=counting_check,
    )  # fmt: skip
    with watcher:
        t0 = 1_700_000_000.0  # any clock works, e.g. the daemon's time.time(), if used throughout
        assert watcher.poll(t0 + 1.0).complete == []  # not settled
        assert calls == []
        result = watcher.poll(t0 + 6.0)
        assert result.complete == [good] and result.failed == [] and result.pending == 1
        for dt in (7.0, 10.0, 15.0):
            assert watcher.poll(t0 + dt) == PollResult(pending=1)
        [(path, reason)] = watcher.poll(t0 + 21.0).failed
        assert path == bad and "failed to read" in reason
        assert watcher.poll(t0 + 30.0) == PollResult(pending=0)
    assert calls == [good, bad, bad]


def test_known_files_are_not_reported_until_they_change(folder: Path, microscope: Microscope):
    """mark_known(): what the store already holds is skipped by the initial scan."""
    known = microscope.write(slice_name(1), tiff_bytes(1))
    new = microscope.write(slice_name(2), tiff_bytes(2))
    watcher = make_watcher(folder)
    watcher.mark_known(known)
    with watcher:
        assert not watcher.idle
        seen = poll_until(watcher, lambda s: bool(s.complete))
        poll_for(watcher, 2 * SETTLE, seen)
        assert seen.complete == [new]
        assert watcher.idle

        microscope.write(slice_name(1), tiff_bytes(3))  # the known file is replaced
        assert poll_until(watcher, lambda s: bool(s.complete)).complete == [known]


# -- links out of the watch folder ---------------------------------------------------------------
class CountingDecode:
    """The real decode check, remembering every file it opened."""

    def __init__(self) -> None:
        self.opened: list[Path] = []

    def __call__(self, path: Path) -> tuple[bool, str]:
        self.opened.append(path)
        return tiff_decodes(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_link_to_a_tiff_outside_the_folder_is_failed_unread(tmp_path: Path, kind: str):
    """Someone else's real TIFF, linked into the watch folder, is never opened (not even to
    decode it) unless ``follow_links``; a link that stays inside the folder is read as usual."""
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "someone_else" / "private.tif"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(tiff_bytes(1))
    (folder / "sub" / "kept.tif").write_bytes(tiff_bytes(2))
    (folder / slice_name(8)).symlink_to(elsewhere)
    (folder / slice_name(9)).symlink_to(Path("sub") / "kept.tif")  # inside: fine
    (folder / slice_name(10)).write_bytes(tiff_bytes(3))
    decode = CountingDecode()
    with make_watcher(folder, kind, decode_check=decode) as w:
        first = w.poll(now=0.0)  # stamps what the start-up scan found; the link fails at once
        later = w.poll(now=SETTLE + 0.01)
    assert first.failed and first.failed[0][0] == folder / slice_name(8), first
    reason = first.failed[0][1]
    assert str(elsewhere) in reason and "outside the watch folder" in reason
    assert "watch.follow_links" in reason
    assert later.complete == [folder / slice_name(9), folder / slice_name(10)], later
    assert elsewhere not in decode.opened and folder / slice_name(8) not in decode.opened

    with make_watcher(folder, kind, decode_check=decode, follow_links=True) as w:
        w.poll(now=0.0)
        allowed = w.poll(now=SETTLE + 0.01)
    assert not allowed.failed
    assert allowed.complete == [folder / slice_name(i) for i in (8, 9, 10)]


@pytest.mark.mounts
def test_files_mounted_into_the_folder_from_elsewhere_are_failed_unread(tmp_path: Path, bind_mount):
    """No link to see: someone else's TIFF bind-mounted onto a slice name, a folder of theirs
    bind-mounted inside (watched recursively), and a ``..`` link out of that mount. Each is
    failed with the reason, never opened, unless ``follow_links``."""
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    theirs = tmp_path / "someone_else"
    (theirs / "project").mkdir(parents=True)
    (theirs / "private.tif").write_bytes(tiff_bytes(1))
    (theirs / "project" / slice_name(5)).write_bytes(tiff_bytes(2))
    # climbs out through the mount's root: ../.. of folder/sub is tmp_path
    (theirs / "project" / slice_name(6)).symlink_to(Path("..") / ".." / theirs.name / "private.tif")
    (folder / slice_name(4)).write_bytes(b"")  # the mount point: a file of ours, empty
    bind_mount(theirs / "private.tif", folder / slice_name(4))
    bind_mount(theirs / "project", folder / "sub")
    (folder / slice_name(10)).write_bytes(tiff_bytes(3))
    assert not (folder / slice_name(4)).is_symlink() and (folder / slice_name(4)).stat().st_size
    decode = CountingDecode()
    with make_watcher(folder, "listing", recursive=True, decode_check=decode) as w:
        first = w.poll(now=0.0)
        later = w.poll(now=SETTLE + 0.01)
    reasons = dict(first.failed)
    assert sorted(reasons) == [folder / slice_name(4), folder / "sub" / slice_name(5),
                               folder / "sub" / slice_name(6)], first  # fmt: skip
    assert "a bind mount" in reasons[folder / slice_name(4)]
    assert str(folder / slice_name(4)) in reasons[folder / slice_name(4)]
    assert "a bind mount" in reasons[folder / "sub" / slice_name(5)]
    assert str(theirs / "private.tif") in reasons[folder / "sub" / slice_name(6)]  # the `..`
    assert all("watch.follow_links" in why for why in reasons.values())
    assert later.complete == [folder / slice_name(10)] and not later.failed, later
    assert decode.opened == [folder / slice_name(10)]

    with make_watcher(folder, "listing", recursive=True, decode_check=decode,
                      follow_links=True) as w:  # fmt: skip
        w.poll(now=0.0)
        allowed = w.poll(now=SETTLE + 0.01)
    assert not allowed.failed
    assert allowed.complete == sorted([*reasons, folder / slice_name(10)])
