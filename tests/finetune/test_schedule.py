"""The fine-tune schedule: APScheduler with its job store in the daemon's SQLite file."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.triggers.interval import IntervalTrigger

from nrrn_daemon.config.profiles import FinetuneSettings
from nrrn_daemon.finetune.schedule import JOBS_TABLE, FinetuneScheduler, cron_trigger, early_due
from nrrn_daemon.store.store import Store


def wait_request(sched: FinetuneScheduler, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reason = sched.take_request()
        if reason is not None:
            return reason
        time.sleep(0.02)
    return None


def test_the_schedule_fires_and_persists_across_a_restart(tmp_path: Path) -> None:
    """No bound on how fast anything runs: the waits are generous deadlines, and the one time
    comparison is against the schedule itself (the next regular run, 5 s after a missed one)."""
    db = tmp_path / "db.sqlite"
    Store(db).close()  # the daemon's database exists first
    interval = 5.0
    grid = datetime.now().astimezone() + timedelta(seconds=0.3)

    def trigger() -> IntervalTrigger:  # the same trigger each start: the job is kept
        return IntervalTrigger(seconds=interval, start_date=grid)

    first = FinetuneScheduler(db, "finetune:ds", trigger())
    first.start()
    try:
        assert wait_request(first, 60.0) == "schedule"
        planned = first.next_run_time()
    finally:
        first.shutdown()
    assert planned is not None
    con = sqlite3.connect(db)
    (stored,) = con.execute(
        f"SELECT next_run_time FROM {JOBS_TABLE} WHERE id = 'finetune:ds'"
    ).fetchone()
    con.close()
    assert abs(stored - planned.timestamp()) < 1e-3, "the job's next run is kept in the SQLite file"
    while datetime.now().astimezone() < planned + timedelta(seconds=0.2):
        time.sleep(0.05)  # the daemon is down while the planned run falls due
    second = FinetuneScheduler(db, "finetune:ds", trigger())
    second.start()
    try:
        # The persisted (missed) run fires at start; a fresh schedule would first fire at the
        # next point of the grid, a whole interval after the missed one.
        assert wait_request(second, 60.0) == "schedule"
        fired = datetime.now().astimezone()
        assert fired < planned + timedelta(seconds=interval), (fired, planned)
        assert second.next_run_time() > fired, "rescheduled, not left due"
    finally:
        second.shutdown()
    with Store(db, readonly=True) as store:  # the store still opens the shared file
        assert store.status()["run"] is None


def test_a_cron_trigger_is_local_time_and_an_unchanged_job_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    Store(db).close()
    sched = FinetuneScheduler(db, "finetune:ds", cron_trigger("0 2 * * *"))
    sched.start()
    try:
        nxt = sched.next_run_time()
        assert nxt is not None and nxt.hour == 2 and nxt.minute == 0
        assert nxt - datetime.now(nxt.tzinfo) <= timedelta(days=1)
        assert sched.take_request() is None
        sched.request("manual")
        assert sched.take_request() == "manual" and sched.take_request() is None
    finally:
        sched.shutdown()
    again = FinetuneScheduler(db, "finetune:ds", cron_trigger("0 2 * * *"))
    again.start()
    try:
        assert again.next_run_time() == nxt
    finally:
        again.shutdown()


def test_the_early_trigger() -> None:
    settings = FinetuneSettings(early_after_slices=10)
    assert not early_due(settings, 9, 0)
    assert early_due(settings, 10, 0)
    assert not early_due(settings, 50, 1), "only before the first fine-tune"
    assert not early_due(FinetuneSettings(early_after_slices=0), 50, 0)
    assert not early_due(FinetuneSettings(enabled=False, early_after_slices=1), 50, 0)
