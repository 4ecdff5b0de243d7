"""Notice each new slice in the microscope's output folder once it is completely written.

Something *hints* that a file may be new or changed; :meth:`Watcher.poll`, called by the
daemon loop from its own thread, decides. The hints (``observer``) come from a watchdog inotify
observer (``"native"``: nearly free, but blind to writes made to a network share by another
machine), watchdog's polling observer (``"polling"``: stats every file each interval, about a
tenth of a core on a 10,000-file folder at 1 s), both in :mod:`nrrn_daemon.watch.events`, or a
listing of the folder's *names* that hands on only new ones (``"listing"``, cheap on shares with
big folders: :mod:`nrrn_daemon.watch.listing`).

Each :meth:`Watcher.poll`:

1. every ``rescan_interval_s`` (and at start, and after the folder comes back) runs a
   reconciliation scan that stats every file: it finds slices written while the daemon was
   down, events lost (inotify queue overflow, a share remounted...) and files rewritten in
   place under a name the listing knows;
2. takes the hints into a table of *candidates* (files not yet complete);
3. stats every candidate: a file whose size and mtime have not changed for ``settle_s`` is
   *stable*; a stable file is *complete* once ``decode_check`` decodes it fully.

A stable file that does not decode may still be written by a slow writer that pauses for
longer than ``settle_s``; it stays a candidate and is reported as *failed* (with the reason)
only when it has been stable and undecodable for ``failure_grace_s``.

Memory stays flat: candidates are only files not complete yet; each reported file leaves one
``(size, mtime_ns)`` pair, so that a later change is reported again (whether it is a duplicate
is for the daemon to decide, by sha256), dropped when the file leaves the folder. The watcher
never writes into the watch folder: no temporary files, no locks.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nrrn_daemon.errors import InputError
from nrrn_daemon.watch.events import EventHints, Hints
from nrrn_daemon.watch.listing import IGNORED_SUFFIXES, FolderListing, iter_files, name_wanted

__all__ = ["IGNORED_SUFFIXES", "OBSERVER_KINDS", "DecodeCheck", "PollResult", "Watcher"]

log = logging.getLogger(__name__)

DecodeCheck = Callable[[Path], tuple[bool, str]]
"""``check(path) -> (ok, reason)``: decode the whole image; ``reason`` says why not when not ok."""

ObserverKind = Literal["native", "polling", "listing"]
OBSERVER_KINDS: tuple[ObserverKind, ...] = ("native", "polling", "listing")


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


def _default_decode_check() -> DecodeCheck:
    from nrrn_daemon.imaging.tiff import slice_is_complete  # late: only the daemon needs it

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
        ``"native"`` (inotify on Linux), ``"polling"`` (watchdog's polling observer: stats every
        file each interval) or ``"listing"`` (lists names each interval, stats only new files;
        files rewritten in place are seen by the reconciliation scan). The last two are needed
        on CIFS/NFS clients, where inotify sees nothing of writes made by the acquisition PC.
    poll_interval_s
        Interval of the polling observer and of the listing.
    settle_s
        How long size and mtime must stay unchanged before a file is decoded.
    rescan_interval_s
        Interval of the reconciliation scan that stats every file.
    failure_grace_s
        How long a stable file may fail to decode before it is reported as failed;
        default ``max(3 * settle_s, 10.0)``.
    decode_check
        ``check(path) -> (ok, reason)``, decoding the whole image; default
        :func:`nrrn_daemon.imaging.tiff.slice_is_complete`.
    follow_links
        Read files whose real path lies outside ``folder`` (a symbolic link out of it, a
        ``..`` through a mount). When false (the default) such a file is never opened: it is
        reported as failed, with its target, at once.
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
        follow_links: bool = False,
    ) -> None:
        if observer not in OBSERVER_KINDS:
            raise ValueError(f"observer must be one of {OBSERVER_KINDS}, got {observer!r}")
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
        self.follow_links = follow_links
        self._candidates: dict[Path, _Candidate] = {}
        self._reported: dict[Path, tuple[int, int]] = {}
        self._hints: Hints = (
            FolderListing(self.folder, glob, recursive=recursive, poll_interval_s=poll_interval_s)
            if observer == "listing"
            else EventHints(
                self.folder,
                self._event_wanted,
                recursive=recursive,
                polling=observer == "polling",
                poll_interval_s=poll_interval_s,
            )
        )
        self._folder_id: tuple[int, int] | None = None  # (st_dev, st_ino) the hints watch
        self._last_scan: float | None = float("-inf")  # None: scanned at start, not stamped
        self._rescan_forced = False
        self._folder_error: str | None = None
        self._mounts: list[tuple[Path, str]] | None = None  # mounts inside the folder, this poll

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
            self._restart_hints(os.stat(self.folder))
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
        self._hints.stop()

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
        return not self._candidates and not self._hints.waiting

    @property
    def remembered(self) -> int:
        """Entries held in memory: candidates, reported files and, when listing, known names.

        It follows the folder's size: entries of files that disappear are dropped.
        """
        return len(self._candidates) + len(self._reported) + len(self._hints)

    # -- the daemon loop's call ------------------------------------------------------------

    def poll(self, now: float | None = None) -> PollResult:
        """Take in hints, rescan when due, and return the files that are now complete.

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
        self._mounts = None
        error = self._take_hints(now)
        if error is not None:
            if self._folder_error is None:
                log.warning("%s — will keep trying", error)
            self._folder_error = error
            return PollResult(folder_error=error, pending=len(self._candidates))
        if self._folder_error is not None:
            log.warning("watch folder %s is back", self.folder)
            self._folder_error = None
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

    def _take_hints(self, now: float) -> str | None:
        """Check the folder, rescan when due, take the hints; say why the folder is unreadable.

        The hints are restarted when their folder was replaced (a share remounted: a new inode)
        or their observer died; a rescan follows, and one follows the end of any folder error.
        """
        try:
            st = os.stat(self.folder)
        except OSError as exc:
            return f"watch folder {self.folder} is not reachable: {exc}"
        if not self._hints.alive or (st.st_dev, st.st_ino) != self._folder_id:
            try:
                self._restart_hints(st)
            except OSError as exc:
                return f"cannot watch folder {self.folder}: {exc}"
            self._rescan_forced = True
        if self._folder_error is not None:
            self._rescan_forced = True
        if self._last_scan is None:
            self._last_scan = now  # the scan made by start()
        since_scan = now - self._last_scan
        try:
            if self._rescan_forced or not 0.0 <= since_scan < self.rescan_interval_s:
                self._scan(now)
            new, vanished = self._hints.take(now)
        except OSError as exc:
            return f"cannot list watch folder {self.folder}: {exc}"
        for path in vanished:  # the listing saw these go: forget them now
            self._candidates.pop(path, None)
            self._reported.pop(path, None)
        for path in new:
            self._candidates.setdefault(path, _Candidate())
        return None

    def _event_wanted(self, path: Path) -> bool:
        """Whether an observer's event path is a slice file in the watched folder (any thread)."""
        if not name_wanted(path.name, self.glob):
            return False
        if self.recursive:
            return path.is_relative_to(self.folder)
        return path.parent == self.folder

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
        if not stat.S_ISREG(st.st_mode):  # a folder named like a slice: the listing hints names
            del self._candidates[path]
            return None
        sig = (st.st_size, st.st_mtime_ns)
        outside = None if self.follow_links else self._outside(path)
        if outside is not None:  # never opened, not even to decode it
            del self._candidates[path]
            self._reported[path] = sig
            log.warning("%s", outside)
            return False, outside
        if sig != (cand.size, cand.mtime_ns):
            if self._reported.get(path) == sig:  # a hint for content already reported
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

    def _outside(self, path: Path) -> str | None:
        """Why ``path`` must not be read: its real path lies outside the watch folder (a link,
        or a mount inside the folder of a file or folder from elsewhere); else None."""
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(os.path.realpath(self.folder)):
            return (
                f"{path.name} resolves to {real}, outside the watch folder {self.folder} (a "
                "link) — not read; copy the file into the folder, or set watch.follow_links = true"
            )
        if self._mounts is None:  # read once per poll
            self._mounts = mounts_below(Path(os.path.realpath(self.folder)))
        for point, source in self._mounts:
            if real == point or real.is_relative_to(point):
                return (
                    f"{path.name} lies on a mount of {source} at {point}, inside the watch folder "
                    f"{self.folder} (a bind mount): its real path is outside the folder — not "
                    "read; copy the file into the folder, or set watch.follow_links = true"
                )
        return None

    def _decode(self, path: Path) -> tuple[bool, str]:
        try:
            return self._decode_check(path)
        except OSError as exc:
            return False, f"cannot read {path}: {exc}"

    def _scan(self, now: float | None = None) -> None:
        """Reconciliation scan: stat every file; add those new or changed since reported.

        The listing is rebuilt first, so that a file created during the scan is found by the
        scan or by the next listing. The new candidates are stamped by the next :meth:`poll`
        (so that every time comes from its ``now``); ``now=None`` (from :meth:`start`) leaves
        the scan time to it too.
        """
        self._hints.rebuild()
        present: set[Path] = set()
        for entry in iter_files(self.folder, self.recursive):
            if not name_wanted(entry.name, self.glob):
                continue
            path = Path(entry.path)
            present.add(path)
            if path in self._candidates:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if self._reported.get(path) != (st.st_size, st.st_mtime_ns):
                self._candidates[path] = _Candidate()
        for gone in self._reported.keys() - present:  # keep the memory of reported files flat
            del self._reported[gone]
        self._last_scan = now
        self._rescan_forced = False

    def _restart_hints(self, folder_stat: os.stat_result) -> None:
        self._hints.stop()
        self._hints.start()
        self._folder_id = (folder_stat.st_dev, folder_stat.st_ino)


MOUNTINFO = Path("/proc/self/mountinfo")


def mounts_below(folder: Path) -> list[tuple[Path, str]]:
    """The mounts whose mount point lies strictly inside ``folder`` (Linux; elsewhere none):
    ``(mount point, what is mounted there)``, the latter as ``device:path in it``.

    Such a mount (``mount --bind /elsewhere folder/sub``, even of a single file) puts files
    from outside the folder inside it without a link that :func:`os.path.realpath` would see.
    """
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if point != folder and point.is_relative_to(folder):
            source = fields[fields.index("-") + 2] if "-" in fields else "?"
            found.append((point, f"{source}:{root}"))
    return found


def _unescape(field: str) -> str:
    r"""A mountinfo path: spaces, tabs, newlines and backslashes are written as ``\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
