"""Cheap watching of big folders: list names, stat only what is new (the ``"listing"`` mode).

On a network share (CIFS/NFS) inotify sees nothing of the acquisition PC's writes, so the folder
must be polled. watchdog's polling observer stats every file of the folder at every interval:
on a 10,000-file folder that is about a tenth of a core at a 1 s interval, and each ``stat`` is a
network round trip on a share. Slices only ever *appear* in an acquisition folder, so most of
that work is wasted.

:class:`FolderListing` reads only the folder's *names* each interval (:func:`os.listdir`, a
``getdents`` call: no per-file ``stat``, whatever the file system reports as entry type) and
diffs them against the names it already knows, one set per folder. Only new names are matched
against the glob and handed to the watcher, which stats them (and its pending candidates) until
they settle. Names that disappear are forgotten. Memory is one entry per name in the folder.

What a listing cannot see is a file rewritten in place under a name it already knows: that is
left to the watcher's periodic reconciliation scan (``rescan_interval_s``), which stats every
file — once a minute by default instead of once an interval — and rebuilds the listing.

In recursive mode, a new name is ``lstat``-ed once to learn whether it is a folder to descend
into (symbolic links to folders are not followed, as with the other observers); known names are
never stat-ed again. Each known sub-folder is listed every interval.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".tmp")
"""Names a writer uses while a file is not finished; never slices."""


def name_wanted(name: str, glob: str) -> bool:
    """Whether a file *name* may be a slice: matches ``glob``, not hidden, not a ``.part``."""
    if name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES):
        return False
    return fnmatchcase(name, glob)


def iter_files(folder: Path, recursive: bool) -> Iterator[os.DirEntry[str]]:
    """Every file entry in ``folder`` (and its sub-folders if ``recursive``), hidden ones skipped.

    Symbolic links to files count as files; symbolic links to folders are not followed.
    """
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield from iter_files(Path(entry.path), recursive)
            elif entry.is_file():
                yield entry


class FolderListing:
    """The names in a folder (and its sub-folders), diffed against the last listing.

    Parameters
    ----------
    folder
        The folder to list (an absolute path).
    glob
        File name pattern; see :func:`name_wanted`.
    recursive
        Also list sub-folders (hidden ones, whose names start with ``.``, are skipped).
    poll_interval_s
        Seconds between two listings; :meth:`take` lists only when one is due.
    """

    def __init__(self, folder: Path, glob: str, *, recursive: bool, poll_interval_s: float) -> None:
        self.folder = folder
        self.glob = glob
        self.recursive = recursive
        self.poll_interval_s = poll_interval_s
        # folder path -> {name: is a sub-folder to descend into}, for every name in that folder
        self._names: dict[str, dict[str, bool]] = {}
        self._last: float | None = None  # time of the last listing on take()'s clock

    # -- the interface shared with EventHints ----------------------------------------------

    def start(self) -> None:
        """Forget every name: the watcher's initial scan calls :meth:`rebuild` right after."""
        self.stop()

    def stop(self) -> None:
        """Forget every name (memory goes back to nothing)."""
        self._names.clear()
        self._last = None

    @property
    def alive(self) -> bool:
        """Always true: listing needs no thread that could die."""
        return True

    @property
    def waiting(self) -> bool:
        """Always false: new names wait in the folder, not in this object."""
        return False

    def rebuild(self) -> None:
        """List everything afresh and take every name as known, offering none.

        The watcher calls this right *before* its reconciliation scan, so a file created in
        between is found by that scan, and one created after it by the next listing.
        """
        self._names.clear()
        self._last = None
        root = os.fsdecode(self.folder)
        self._list(root, os.listdir(root), new_paths=None, vanished=set())

    def take(self, now: float) -> tuple[set[Path], set[Path]]:
        """When a listing is due, return ``(new wanted files, vanished names)``; else nothing.

        Raises
        ------
        OSError
            If the watch folder itself cannot be listed (sub-folders that vanish are forgotten;
            other errors on a sub-folder keep its names until the next listing).
        """
        if self._last is None:
            self._last = now  # just listed by rebuild(); the clock starts here
            return set(), set()
        if 0.0 <= now - self._last < self.poll_interval_s:  # not due (a clock stepped back is)
            return set(), set()
        self._last = now
        new_paths: set[Path] = set()
        vanished: set[Path] = set()
        root = os.fsdecode(self.folder)
        subs = [f for f in self._names if f != root]  # new ones are listed as they are found
        self._list(root, os.listdir(root), new_paths, vanished)  # the root's errors propagate
        for sub in subs:
            if sub not in self._names:  # forgotten above with a vanished parent
                continue
            try:
                names = os.listdir(sub)
            except FileNotFoundError:
                self._forget(sub, vanished)
                continue
            except OSError as exc:  # permissions, a share hiccup: keep its names for now
                log.debug("cannot list %s: %s", sub, exc)
                continue
            self._list(sub, names, new_paths, vanished)
        return new_paths, vanished

    def __len__(self) -> int:
        """Number of names remembered, over all folders."""
        return sum(len(names) for names in self._names.values())

    # -- internals -------------------------------------------------------------------------

    def _list(
        self,
        folder: str,
        listed: list[str],
        new_paths: set[Path] | None,
        vanished: set[Path],
    ) -> None:
        """Diff ``listed`` against the names known in ``folder``; ``new_paths=None``: offer none."""
        known = self._names.setdefault(folder, {})
        current = set(listed)
        for name in known.keys() - current:
            path = os.path.join(folder, name)
            if known.pop(name):
                self._forget(path, vanished)
            vanished.add(Path(path))
        for name in current - known.keys():
            path = os.path.join(folder, name)
            wanted = name_wanted(name, self.glob)
            is_dir = False
            if self.recursive and not name.startswith("."):
                try:  # one lstat per *new* name: is it a folder to descend into?
                    is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
                except OSError:
                    continue  # gone already; a later listing sees it if it comes back
            known[name] = is_dir
            if is_dir:
                self._list_new_folder(path, new_paths, vanished)
            elif wanted and new_paths is not None:
                new_paths.add(Path(path))

    def _list_new_folder(self, path: str, new_paths: set[Path] | None, vanished: set[Path]) -> None:
        try:
            names = os.listdir(path)
        except OSError as exc:  # gone or unreadable: its names stay unknown, retried next time
            log.debug("cannot list %s: %s", path, exc)
            self._names[path] = {}
            return
        self._list(path, names, new_paths, vanished)

    def _forget(self, folder: str, vanished: set[Path]) -> None:
        """Drop a vanished sub-folder and everything known below it."""
        prefix = folder + os.sep
        for known in [f for f in self._names if f == folder or f.startswith(prefix)]:
            vanished.update(Path(known, name) for name in self._names.pop(known))
