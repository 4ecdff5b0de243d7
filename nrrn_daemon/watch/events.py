"""Hints from a watchdog observer: event handlers only put paths on a small thread-safe inbox.

Used by :class:`nrrn_daemon.watch.watcher.Watcher` for its ``"native"`` (inotify on Linux) and
``"polling"`` (watchdog's :class:`~watchdog.observers.polling.PollingObserver`) observers.
The observer thread decides nothing: it filters by name and records the path; the watcher's
:meth:`~nrrn_daemon.watch.watcher.Watcher.poll` drains the inbox from the daemon loop's thread.

watchdog's polling observer snapshots the folder every interval, with one ``stat`` per file:
on a 10,000-file folder that is about a tenth of a core at a 1 s interval (BENCHMARKS.md §9).
:mod:`nrrn_daemon.watch.listing` offers the cheaper ``"listing"`` mode for such folders.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

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

OBSERVER_THREAD_NAME = "nrrn-watch-observer"


class Hints(Protocol):
    """A watcher's source of hints: :class:`EventHints` or :class:`~.watch_scan.FolderListing`."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def waiting(self) -> bool: ...
    def take(self, now: float) -> tuple[set[Path], set[Path]]: ...
    def rebuild(self) -> None: ...
    def __len__(self) -> int: ...


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


class EventHints:
    """A watchdog observer on one folder whose events become paths in an inbox.

    Parameters
    ----------
    folder
        The folder to observe.
    wanted
        ``wanted(path)``: called on the observer thread; only paths it accepts are kept.
    recursive
        Also observe sub-folders.
    polling
        Use watchdog's polling observer (every ``poll_interval_s``) instead of inotify.
    poll_interval_s
        Interval of the polling observer.
    """

    def __init__(
        self,
        folder: Path,
        wanted: Callable[[Path], bool],
        *,
        recursive: bool,
        polling: bool,
        poll_interval_s: float,
    ) -> None:
        self.folder = folder
        self._wanted = wanted
        self.recursive = recursive
        self.polling = polling
        self.poll_interval_s = poll_interval_s
        self._inbox = _Inbox()
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        """Start the observer thread (raises :class:`OSError` if the folder cannot be watched)."""
        observer: BaseObserver = (
            PollingObserver(timeout=self.poll_interval_s) if self.polling else Observer()
        )
        observer.name = OBSERVER_THREAD_NAME
        observer.schedule(
            _Handler(self._offer),
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

    def stop(self) -> None:
        """Stop the observer and join its threads. Safe to call twice."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        if observer.ident is not None:
            observer.join()

    @property
    def alive(self) -> bool:
        """The observer and all its emitters run (an emitter dies when its folder vanishes)."""
        observer = self._observer
        return (
            observer is not None
            and observer.is_alive()
            and all(emitter.is_alive() for emitter in observer.emitters)
        )

    @property
    def waiting(self) -> bool:
        """Paths are in the inbox, not yet taken."""
        return bool(self._inbox)

    def take(self, now: float) -> tuple[set[Path], set[Path]]:
        """Return ``(hinted paths, vanished paths)``; an observer reports no vanished paths."""
        return self._inbox.drain(), set()

    def rebuild(self) -> None:
        """Nothing to rebuild: the observer keeps no list of names."""

    def __len__(self) -> int:
        """Names remembered: none (the inbox only holds paths until the next poll)."""
        return 0

    def _offer(self, path: Path) -> None:
        """Called on the observer thread: filter by name and put on the inbox, nothing else."""
        if self._wanted(path):
            self._inbox.put(path)
