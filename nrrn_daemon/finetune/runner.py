"""The daemon's side of fine-tuning: when to start one, the subprocess, its result.

A :class:`~nrrn_daemon.finetune.schedule.FinetuneScheduler` (cron, or the early trigger), a request
file written by ``nrrn-daemon finetune``, or :meth:`FinetuneRunner.request` only raise a flag;
the daemon loop calls :meth:`FinetuneRunner.turn`, which starts ``python -m
nrrn_daemon.finetune.run`` as a subprocess (so live denoising goes on), and records the child's
JSON result when it exits (the daemon stays the database's one writer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.finetune.run import (
    FinetuneJob,
    FinetuneResult,
    begin,
    failed_result,
    live_flag,
    record_result,
)
from nrrn_daemon.finetune.schedule import FinetuneScheduler, cron_trigger, early_due
from nrrn_daemon.store.store import Store

log = logging.getLogger("nrrn_daemon")

REQUEST_SUFFIX = ".finetune-request.json"
"""``<database>`` + this: a fine-tune asked for by ``nrrn-daemon finetune`` (taken by the loop)."""
CHECK_S = 1.0
"""Seconds between two looks at the fine-tune subprocess and the request file."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_for(
    profile: Profile, *, db: Path, dataset: str, parent: str, models_dir: Path,
    minutes: float | None = None, steps: int | None = None,
) -> FinetuneJob:  # fmt: skip
    """The fine-tune job a profile asks for (by the daemon's runner and ``nrrn-daemon finetune``).

    Repeat-scan data sets with ≥ 3 scans per slice train on scan triplets; otherwise on
    adjacent-slice triplets (with 2 scans per slice, of each index's first scan).
    """
    g = profile.grouping
    scans = g.scans_per_slice if g.mode == "repeat-scans" and g.scans_per_slice >= 3 else 1
    return FinetuneJob(
        db=str(db), dataset=dataset, parent=parent, models_dir=str(models_dir),
        minutes=float(minutes if minutes is not None else profile.finetune.minutes),
        validation_fraction=profile.finetune.validation_fraction, steps=steps,
        device=profile.model.device, databar=profile.image.databar,
        databar_rows=profile.image.databar_rows, scans_per_slice=scans,
        precision=profile.model.precision, compile=profile.model.compile,
        frames=profile.frames.model_dump(),
    )  # fmt: skip


def request_file(db: Path) -> Path:
    """Where ``nrrn-daemon finetune`` leaves a request for a running daemon."""
    return Path(str(db) + REQUEST_SUFFIX)


@dataclass
class _Child:
    """A fine-tune subprocess started by the daemon."""

    proc: subprocess.Popen[bytes]
    finetune_id: int
    job: FinetuneJob
    result_path: Path
    log_path: Path
    started_at: float


class FinetuneRunner:
    """Starts, watches and records the fine-tunes of one data set.

    Parameters
    ----------
    profile, store, dataset_id, dataset_name
        The daemon's profile, store (its one writer) and data set.
    trigger
        An APScheduler trigger replacing the profile's ``finetune.cron`` (tests).
    on_event
        The daemon's live-view callback.
    """

    def __init__(
        self,
        profile: Profile,
        store: Store,
        dataset_id: int,
        dataset_name: str,
        *,
        trigger: Any = None,
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.profile = profile
        self.store = store
        self.dataset_id = dataset_id
        self.dataset_name = dataset_name
        self.state_folder = Path(store.path).parent
        self.on_event = on_event
        self._trigger = trigger
        self._scheduler: FinetuneScheduler | None = None
        self._child: _Child | None = None
        self._requested: str | None = None
        self._early_checked = False
        self._last_check = 0.0

    def start(self) -> None:
        """Close fine-tunes whose process died; start the schedule (when enabled)."""
        closed = self.store.close_dead_finetunes(pid_alive)
        if closed:
            log.warning("%d interrupted fine-tune(s) recorded as failed", closed)
        if not self.profile.finetune.enabled:
            return
        trigger = self._trigger or cron_trigger(self.profile.finetune.cron)
        self._scheduler = FinetuneScheduler(
            self.store.path, f"finetune:{self.dataset_name}", trigger
        )
        self._scheduler.start()
        log.info("fine-tune scheduled: next at %s", self.next_run())

    def request(self, reason: str = "manual") -> None:
        """Ask for a fine-tune at the loop's next look (thread-safe)."""
        self._requested = reason

    def turn(self, now: float, parent: str) -> bool:
        """Collect a finished child, else start one if asked; True when a child finished.

        ``parent`` is the checkpoint in service, which a new fine-tune starts from.
        """
        if now - self._last_check < CHECK_S:
            return False
        self._last_check = now
        if self._child is not None:
            if self._child.proc.poll() is None:
                return False
            self._collect()
            return True
        reason, self._requested = self._requested, None
        if reason is None and self._scheduler is not None:
            reason = self._scheduler.take_request()
        overrides: dict[str, Any] = {}
        asked = request_file(self.store.path)
        if reason is None and asked.exists():
            try:
                overrides = json.loads(asked.read_text() or "{}")
            except (OSError, ValueError):
                overrides = {}
            asked.unlink(missing_ok=True)
            reason = "request"
        if reason is None and self._scheduler is not None and not self._early_checked:
            denoised, finetunes = self.store.finetune_counts(self.dataset_id)
            self._early_checked = finetunes > 0
            if early_due(self.profile.finetune, denoised, finetunes):
                reason = "early"
        if reason is not None:
            self._spawn(reason, overrides, parent)
        return False

    def _spawn(self, reason: str, overrides: dict[str, Any], parent: str) -> None:
        job = job_for(
            self.profile, db=Path(self.store.path), dataset=self.dataset_name, parent=parent,
            models_dir=self.state_folder / "models", minutes=overrides.get("minutes") or None,
            steps=overrides.get("steps"),
        )  # fmt: skip
        folder = self.state_folder / "finetune"
        folder.mkdir(parents=True, exist_ok=True)
        ft_id = begin(self.store, job, os.getpid(), reason)
        job_path = folder / f"{ft_id}.job.json"
        job_path.write_text(json.dumps(asdict(job)))
        result_path, log_path = folder / f"{ft_id}.result.json", folder / f"{ft_id}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nrrn_daemon.finetune.run", str(job_path), str(result_path)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self._child = _Child(proc, ft_id, job, result_path, log_path, time.time())
        log.info(
            "fine-tune %d started (%s, pid %d, ≤ %.1f min)", ft_id, reason, proc.pid, job.minutes
        )
        self.on_event("finetune", {"state": "started", "id": ft_id})

    def _collect(self) -> None:
        child, self._child = self._child, None
        assert child is not None
        try:
            result = FinetuneResult.from_json(child.result_path.read_text())
        except (OSError, ValueError, TypeError) as exc:
            tail = (
                child.log_path.read_text(errors="replace")[-500:] if child.log_path.exists() else ""
            )
            result = failed_result(
                child.job, f"fine-tune process exited {child.proc.returncode} without a result "
                f"({exc}); log {child.log_path}: {tail.strip()}",
            )  # fmt: skip
        record_result(self.store, child.finetune_id, result)
        log.info("fine-tune %d %s: %s", child.finetune_id, result.status, "; ".join(
            result.reasons) or result.error)  # fmt: skip
        self.on_event("finetune", {"state": result.status, "id": child.finetune_id})

    def stop(self) -> None:
        """Stop the schedule; end a running child (recorded as failed: the daemon stopped)."""
        if self._child is not None:
            child, self._child = self._child, None
            child.proc.terminate()
            try:
                child.proc.wait(10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            record_result(
                self.store, child.finetune_id, failed_result(child.job, "the daemon stopped")
            )
        if self._scheduler is not None:
            self._scheduler.shutdown()
            self._scheduler = None

    @property
    def running(self) -> bool:
        """Whether a fine-tune subprocess is running now."""
        return self._child is not None

    @contextlib.contextmanager
    def live_first(self) -> Iterator[None]:
        """Around a live unit of work: a running fine-tune pauses between its steps."""
        if self._child is None:
            yield
            return
        flag = live_flag(self.store.path)
        flag.touch()
        try:
            yield
        finally:
            flag.unlink(missing_ok=True)

    def next_run(self) -> str | None:
        """ "running since …", the next scheduled time (ISO), or None when not scheduled."""
        if self._child is not None:
            started = time.strftime("%H:%M:%S", time.localtime(self._child.started_at))
            return f"running since {started} (pid {self._child.proc.pid})"
        when = self._scheduler.next_run_time() if self._scheduler is not None else None
        return None if when is None else when.isoformat(timespec="seconds")
