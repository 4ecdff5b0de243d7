"""When the daemon fine-tunes: APScheduler 3 with a cron trigger and a job store in SQLite.

A :class:`FinetuneScheduler` runs an APScheduler ``BackgroundScheduler`` whose one job per data
set fires on the profile's ``finetune.cron`` (local time). The job store is APScheduler's
``SQLAlchemyJobStore`` in the daemon's own SQLite file (table ``apscheduler_jobs``), so the next
run time survives a restart: a run missed while the daemon was down fires once at start (misfires
are coalesced, within :data:`MISFIRE_GRACE_S`). ``max_instances=1``.

The job does no work: it only sets a flag that the daemon's loop takes with
:meth:`FinetuneScheduler.take_request` and acts on (it starts the fine-tune subprocess). Because
the job store pickles the job's function by reference and its arguments by value, the job is the
module-level :func:`_fire` called with the job id; :data:`_LIVE` maps job ids to the running
schedulers of this process (the only module-level state, and why it exists).

The early trigger (a first fine-tune once a data set has ``early_after_slices`` denoised slices)
is not a time trigger: the daemon checks :func:`early_due` on its heartbeat.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from nrrn_daemon.config.profiles import FinetuneSettings

MISFIRE_GRACE_S = 6 * 3600
"""A scheduled fine-tune missed (daemon down) by less than this still runs once at start."""
JOBS_TABLE = "apscheduler_jobs"

_LIVE: dict[str, FinetuneScheduler] = {}
_LIVE_LOCK = threading.Lock()


def _fire(job_id: str) -> None:
    """The scheduled job: flag the scheduler that owns ``job_id`` (nothing else)."""
    with _LIVE_LOCK:
        owner = _LIVE.get(job_id)
    if owner is not None:
        owner.request("schedule")


def cron_trigger(cron: str) -> CronTrigger:
    """A trigger from a 5-field crontab expression, in the machine's local time zone."""
    from tzlocal import get_localzone

    return CronTrigger.from_crontab(cron, timezone=get_localzone())


def early_due(settings: FinetuneSettings, denoised: int, finetunes_so_far: int) -> bool:
    """Is the early fine-tune due: enabled, never fine-tuned yet, and enough slices denoised?"""
    n = settings.early_after_slices
    return settings.enabled and n > 0 and finetunes_so_far == 0 and denoised >= n


class FinetuneScheduler:
    """The daemon's fine-tune schedule for one data set.

    Parameters
    ----------
    database
        The daemon's SQLite file; the job store lives in its ``apscheduler_jobs`` table.
    job_id
        One per data set (``"finetune:<data set name>"``).
    trigger
        When to fire; :func:`cron_trigger` of the profile's ``finetune.cron`` in the daemon
        (tests pass a short interval trigger).
    """

    def __init__(self, database: str | Path, job_id: str, trigger: BaseTrigger) -> None:
        self.job_id = job_id
        self.trigger = trigger
        self._flag = threading.Event()
        self._reason: str | None = None
        self._scheduler = BackgroundScheduler(
            jobstores={
                "default": SQLAlchemyJobStore(
                    url=f"sqlite:///{Path(database).expanduser().absolute()}",
                    tablename=JOBS_TABLE,
                    engine_options={"connect_args": {"timeout": 5}},
                )
            },
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": MISFIRE_GRACE_S,
            },
            daemon=True,
        )

    def start(self) -> None:
        """Start the scheduler thread, keeping a persisted job whose trigger is unchanged."""
        with _LIVE_LOCK:
            _LIVE[self.job_id] = self
        self._scheduler.start(paused=True)
        job = self._scheduler.get_job(self.job_id)
        if job is None or str(job.trigger) != str(self.trigger):
            self._scheduler.add_job(
                _fire, self.trigger, args=[self.job_id], id=self.job_id,
                name="nrrn-finetune", replace_existing=True,
            )  # fmt: skip
        self._scheduler.resume()

    def shutdown(self) -> None:
        """Stop the scheduler and join its threads (the job stays in the store)."""
        with _LIVE_LOCK:
            if _LIVE.get(self.job_id) is self:
                del _LIVE[self.job_id]
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)  # also disposes the job store's engine

    def remove(self) -> None:
        """Delete the persisted job (fine-tuning disabled)."""
        if self._scheduler.get_job(self.job_id) is not None:
            self._scheduler.remove_job(self.job_id)

    def next_run_time(self) -> datetime | None:
        """When the job fires next (time-zone aware), or ``None``."""
        job = self._scheduler.get_job(self.job_id)
        return None if job is None else job.next_run_time

    def request(self, reason: str) -> None:
        """Ask for a fine-tune (thread-safe); the daemon's loop takes it."""
        self._reason = reason
        self._flag.set()

    def take_request(self) -> str | None:
        """The pending request's reason (``"schedule"``...), clearing it; ``None`` if none."""
        if not self._flag.is_set():
            return None
        self._flag.clear()
        reason, self._reason = self._reason, None
        return reason or "schedule"
