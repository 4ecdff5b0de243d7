"""Notice each new slice in the microscope's output folder once it is completely written.

A watchdog observer (inotify, or polling for network shares where inotify sees nothing of
remote writes) only *hints* that something changed: its handler puts the path in a small
thread-safe inbox and does nothing else. All decisions happen in :meth:`Watcher.poll`, which
the daemon loop calls from its own thread:

1. drain the inbox into a table of *candidates* (files not yet complete);
2. every ``rescan_interval_s`` (and at start, and after the folder comes back) list the folder
   with :func:`os.scandir` — a reconciliation scan that finds slices written while the daemon
   was down and events the observer lost (inotify queue overflow, a share remounted...);
3. stat every candidate: a file whose size and mtime have not changed for ``settle_s`` is
   *stable*; a stable file is *complete* once ``decode_check`` decodes it fully.

A stable file that does not decode may still be written by a slow writer that pauses for
longer than ``settle_s``; it stays a candidate and is reported as *failed* (with the reason)
only when it has been stable and undecodable for ``failure_grace_s``.

Memory stays flat: the candidate table holds only files that are not complete yet. For each
reported file, one ``(size, mtime_ns)`` pair is remembered so that a later change (a repeat
write, a fixed file) is reported again — one small entry per file in the folder, dropped when
the file disappears from the folder. Whether a re-reported file is a duplicate is for the
daemon to decide (by sha256).

The watcher never writes into the watch folder: no temporary files, no locks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from nrrn_daemon.errors import InputError

log = logging.getLogger(__name__)

DecodeCheck = Callable[[Path], tuple[bool, str]]
"""``check(path) -> (ok, reason)``: decode the whole image; ``reason`` says why not when not ok."""

IGNORED_SUFFIXES = (".part", ".tmp")
"""Names a writer uses while a file is not finished; never slices."""

ObserverKind = Literal["native", "polling"]


@dataclass(frozen=True)
class PollResult:
    """What one :meth:`Watcher.poll` found.

    Attributes
    ----------
    complete
        Files that are stable and decode, in name order. Each is reported once per content:
        again only if its size or mtime changes later.
    failed
        ``(path, reason)`` for files stable but undecodable for ``failure_grace_s``.
    folder_error
        Why the watch folder cannot be read right now (network outage, unmounted share), or
        ``None``. Polling goes on and recovers by itself when the folder is back.
    pending
        Number of files seen but not complete yet.
    """

    complete: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    folder_error: str | None = None
    pending: int = 0


@dataclass(slots=True)
class _Candidate:
    """A file seen but not yet reported; times are on the clock of :meth:`Watcher.poll`'s ``now``.

    ``size`` is ``None`` until the first :meth:`Watcher.poll` stats the file and stamps the times.
    """

    size: int | None = None
    mtime_ns: int | None = None
    first_seen: float = 0.0
    stable_since: float = 0.0
    decode_error: str | None = None  # why the last decode of this (size, mtime) failed


class _Inbox:
    """A thread-safe set of paths: the observer thread adds, the daemon loop drains.

    A set rather than a queue: a 24 MB slice written in small chunks yields hundreds of
    modified events, and the inbox keeps one entry per file however many arrive between polls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[Path] = set()

    def put(self, path: Path) -> None:
        with self._lock:
            self._paths.add(path)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._paths)

    def drain(self) -> set[Path]:
        with self._lock:
            paths, self._paths = self._paths, set()
        return paths


class _Handler(FileSystemEventHandler):
    """Puts the path of every created / modified / moved-to / closed file on the inbox."""

    def __init__(self, offer: Callable[[Path], None]) -> None:
        self._offer = offer

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "moved", "closed"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        if path:
            self._offer(Path(os.fsdecode(path)))


def _default_decode_check() -> DecodeCheck:
    from nrrn_daemon.imageio import slice_is_complete  # late: only the daemon needs it

    return slice_is_complete


class Watcher:
    """Watch one folder for slice files and report each once it is completely written.

    Parameters
    ----------
    folder
        The microscope's output folder. Only read, never written.
    glob
        Pattern matched against file *names* (case-sensitive), e.g. ``"SEM Image - *.tif"``.
        Names starting with ``.`` or ending in ``.part`` / ``.tmp`` are always ignored.
    recursive
        Also watch sub-folders.
    observer
        ``"native"`` (inotify on Linux) or ``"polling"`` — needed on CIFS/NFS clients, where
        inotify sees nothing of writes made by the acquisition PC.
    poll_interval_s
        Interval of the polling observer.
    settle_s
        How long size and mtime must stay unchanged before a file is decoded.
    rescan_interval_s
        Interval of the reconciliation scan that finds files whose events were lost.
    failure_grace_s
        How long a stable file may fail to decode before it is reported as failed;
        default ``max(3 * settle_s, 10.0)``.
    decode_check
        ``check(path) -> (ok, reason)``, decoding the whole image; default
        :func:`nrrn_daemon.imageio.slice_is_complete`.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        glob: str,
        *,
        recursive: bool = False,
        observer: ObserverKind = "native",
        poll_interval_s: float = 2.0,
        settle_s: float = 2.0,
        rescan_interval_s: float = 60.0,
        failure_grace_s: float | None = None,
        decode_check: DecodeCheck | None = None,
    ) -> None:
        if observer not in ("native", "polling"):
            raise ValueError(f"observer must be 'native' or 'polling', got {observer!r}")
        self.folder = Path(os.path.abspath(folder))
        self.glob = glob
        self.recursive = recursive
        self.observer_kind: ObserverKind = observer
        self.poll_interval_s = poll_interval_s
        self.settle_s = settle_s
        self.rescan_interval_s = rescan_interval_s
        self.failure_grace_s = (
            max(3.0 * settle_s, 10.0) if failure_grace_s is None else failure_grace_s
        )
        self._decode_check = decode_check if decode_check is not None else _default_decode_check()
        self._inbox = _Inbox()
        self._candidates: dict[Path, _Candidate] = {}
        self._reported: dict[Path, tuple[int, int]] = {}
        self._observer: BaseObserver | None = None
        self._folder_id: tuple[int, int] | None = None  # (st_dev, st_ino) the observer watches
        self._last_scan: float | None = float("-inf")  # None: scanned at start, not stamped
        self._rescan_forced = False
        self._folder_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer and scan the folder for slices written while we were down.

        Raises
        ------
        InputError
            If the watch folder does not exist, is not a folder, or cannot be read.
        """
        self.check_folder()
        try:
            self._start_observer()
            self._scan()
        except OSError as exc:
            self.stop()
            raise InputError(
                f"cannot watch folder {self.folder}: {exc} — give the service user read access"
            ) from exc

    def check_folder(self) -> None:
        """Raise :class:`InputError` unless the watch folder exists and is a folder."""
        if not self.folder.exists():
            raise InputError(
                f"watch folder {self.folder} does not exist — create it, mount the share, "
                "or fix the profile's watch folder"
            )
        if not self.folder.is_dir():
            raise InputError(f"watch folder {self.folder} is not a folder — fix the profile")

    def stop(self) -> None:
        """Stop the observer and join its threads. Safe to call twice."""
        self._stop_observer()

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def rescan(self) -> None:
        """Make the next :meth:`poll` run a reconciliation scan."""
        self._rescan_forced = True

    def mark_known(self, path: str | os.PathLike[str]) -> None:
        """Treat ``path``, as it is now, as already reported (e.g. recorded in the store).

        Call before :meth:`start`: the initial scan then skips it unless it changes later.
        """
        path = Path(os.path.abspath(path))
        try:
            st = os.stat(path)
        except OSError:
            return
        self._reported[path] = (st.st_size, st.st_mtime_ns)
        self._candidates.pop(path, None)

    @property
    def idle(self) -> bool:
        """Nothing pending: no candidate waits to settle or decode, no event waits to be seen."""
        return not self._candidates and not self._inbox

    # -- the daemon loop's call ------------------------------------------------------------

    def poll(self, now: float | None = None) -> PollResult:
        """Take in events, rescan when due, and return the files that are now complete.

        Parameters
        ----------
        now
            The current time in seconds, on any clock as long as every call uses the same one
            (a monotonic clock is safest: a wall-clock jump can shorten the settle time);
            default :func:`time.monotonic`.

        Returns
        -------
        PollResult
            Complete and failed files, and the folder's error state.
        """
        now = time.monotonic() if now is None else now
        if not self._folder_ok():
            return PollResult(folder_error=self._folder_error, pending=len(self._candidates))
        if self._last_scan is None:
            self._last_scan = now  # the scan made by start()
        for path in self._inbox.drain():
            self._candidates.setdefault(path, _Candidate())
        if self._rescan_forced or now - self._last_scan >= self.rescan_interval_s:
            try:
                self._scan(now)
            except OSError as exc:
                self._set_folder_error(f"cannot list watch folder {self.folder}: {exc}")
                return PollResult(folder_error=self._folder_error, pending=len(self._candidates))
        complete: list[Path] = []
        failed: list[tuple[Path, str]] = []
        for path in sorted(self._candidates):
            verdict = self._judge(path, self._candidates[path], now)
            if verdict is None:
                continue
            ok, reason = verdict
            if ok:
                complete.append(path)
            else:
                failed.append((path, reason))
        return PollResult(complete, failed, None, len(self._candidates))

    # -- internals -------------------------------------------------------------------------

    def _wanted(self, path: Path) -> bool:
        name = path.name
        if name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES):
            return False
        if not fnmatchcase(name, self.glob):
            return False
        if self.recursive:
            return path.is_relative_to(self.folder)
        return path.parent == self.folder

    def _enqueue(self, path: Path) -> None:
        """Called on the observer thread: filter by name and put on the inbox, nothing else."""
        if self._wanted(path):
            self._inbox.put(path)

    def _judge(self, path: Path, cand: _Candidate, now: float) -> tuple[bool, str] | None:
        """Stat one candidate; return ``(ok, reason)`` once it is decided, else ``None``."""
        try:
            st = os.stat(path)
        except FileNotFoundError:  # deleted or renamed away: forget it
            del self._candidates[path]
            self._reported.pop(path, None)
            return None
        except OSError as exc:  # transient (share hiccup): try again next poll
            log.debug("cannot stat %s: %s", path, exc)
            return None
        sig = (st.st_size, st.st_mtime_ns)
        if sig != (cand.size, cand.mtime_ns):
            if self._reported.get(path) == sig:  # an event for content already reported
                del self._candidates[path]
                return None
            if cand.size is None:
                cand.first_seen = now
            cand.size, cand.mtime_ns = sig
            cand.stable_since = now
            cand.decode_error = None
            return None
        stable_for = now - cand.stable_since
        if stable_for < self.settle_s:
            return None
        if cand.decode_error is not None and stable_for < self.failure_grace_s:
            return None  # decoded once and failed; look again when the grace is over
        ok, reason = self._decode(path)
        if not ok and stable_for < self.failure_grace_s:
            cand.decode_error = reason
            return None
        del self._candidates[path]
        self._reported[path] = sig
        if not ok:
            log.warning("%s stayed undecodable for %.1f s: %s", path, stable_for, reason)
        return ok, reason

    def _decode(self, path: Path) -> tuple[bool, str]:
        try:
            return self._decode_check(path)
        except OSError as exc:
            return False, f"cannot read {path}: {exc}"

    def _iter_folder(self, folder: Path) -> Iterator[os.DirEntry[str]]:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if self.recursive:
                        yield from self._iter_folder(Path(entry.path))
                elif entry.is_file():
                    yield entry

    def _scan(self, now: float | None = None) -> None:
        """Reconciliation scan: add files that are new or changed since they were reported.

        The new candidates are stamped by the next :meth:`poll` (so that every time comes from
        its ``now``); ``now=None`` (from :meth:`start`) leaves the scan time to it too.
        """
        present: set[Path] = set()
        for entry in self._iter_folder(self.folder):
            path = Path(entry.path)
            if not self._wanted(path):
                continue
            present.add(path)
            if path in self._candidates:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if self._reported.get(path) != sig:
                self._candidates[path] = _Candidate()
        for gone in self._reported.keys() - present:  # keep the memory of reported files flat
            del self._reported[gone]
        self._last_scan = now
        self._rescan_forced = False

    def _folder_ok(self) -> bool:
        """Check the folder; restart the observer when it came back or was replaced."""
        try:
            st = os.stat(self.folder)
        except OSError as exc:
            self._set_folder_error(f"watch folder {self.folder} is not reachable: {exc}")
            return False
        observer_dead = (
            self._observer is None
            or not self._observer.is_alive()
            or any(not emitter.is_alive() for emitter in self._observer.emitters)
        )
        if observer_dead or (st.st_dev, st.st_ino) != self._folder_id:
            try:
                self._stop_observer()
                self._start_observer()
            except OSError as exc:
                self._set_folder_error(f"cannot watch folder {self.folder}: {exc}")
                return False
            self._rescan_forced = True
        if self._folder_error is not None:
            log.warning("watch folder %s is back; rescanning", self.folder)
            self._folder_error = None
            self._rescan_forced = True
        return True

    def _set_folder_error(self, message: str) -> None:
        if self._folder_error is None:
            log.warning("%s — will keep trying", message)
        self._folder_error = message

    def _start_observer(self) -> None:
        st = os.stat(self.folder)
        observer: BaseObserver = (
            PollingObserver(timeout=self.poll_interval_s)
            if self.observer_kind == "polling"
            else Observer()
        )
        observer.name = "nrrn-watch-observer"
        observer.schedule(
            _Handler(self._enqueue),
            str(self.folder),
            recursive=self.recursive,
            event_filter=[FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent],
        )
        try:
            observer.start()
        except BaseException:
            observer.stop()  # also closes the inotify descriptor thread
            raise
        self._observer = observer
        self._folder_id = (st.st_dev, st.st_ino)

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        if observer.ident is not None:
            observer.join()
