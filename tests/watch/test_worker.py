"""The watch worker on a real hung folder: a FUSE file system that stops answering on demand.

No ``os`` function is patched: the watcher's listing, stats and decode checks really block in the
kernel, as on an SMB/NFS share whose server went away, until the file system answers again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from stallfs import StalledShare
from test_watcher import GLOB, make_watcher, slice_name, tiff_bytes

from nrrn_daemon.watch.worker import PollWorker

pytestmark = pytest.mark.mounts


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_hung_share_is_reported_and_watching_resumes(share: StalledShare) -> None:
    assert GLOB  # the watcher's name pattern, as in test_watcher
    (share.source / slice_name(1)).write_bytes(tiff_bytes(1))
    clock = Clock()
    finished = threading.Event()
    with make_watcher(share.mountpoint, "listing", rescan_interval_s=1e9) as watcher:
        worker = PollWorker(watcher, deadline_s=45.0, wait_s=0.0, on_done=finished.set, clock=clock)
        worker.start(start_watcher=False)  # make_watcher started it
        try:
            share.stall()
            finished.clear()
            first = worker.poll(now=0.0)  # asks; the worker is now stuck in the kernel
            assert first.folder_error is None and not first.complete
            clock.t = 44.0
            assert worker.poll(now=44.0).folder_error is None, "within the deadline"
            clock.t = 46.0
            late = worker.poll(now=46.0)
            assert late.folder_error is not None and "not answering for 46 s" in late.folder_error
            assert str(share.mountpoint) in late.folder_error
            assert not worker.idle and not finished.is_set(), "the stuck poll is still running"
            (share.source / slice_name(2)).write_bytes(tiff_bytes(2))  # written on the server
            share.answer()
            assert finished.wait(30), "the poll returned once the share answered"
            worker.wait_s = 30.0  # a healthy folder: each poll is waited for, as by the loop
            complete: list[Path] = []
            now = 46.0
            while len(complete) < 2:  # settle_s on the loop's clock, then both decode
                result = worker.poll(now=now)
                assert result.folder_error is None, result
                complete += result.complete
                now += 1.0
                assert now < 60, complete
            assert sorted(complete) == [share.mountpoint / slice_name(i) for i in (1, 2)]
        finally:
            share.answer()
            assert worker.stop(timeout=30)
