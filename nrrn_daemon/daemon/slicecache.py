"""Read each slice once: one read gives its sha256 and its pixels; a few decoded slices are kept.

Without it the daemon went over a slice file six times: the watcher's decode check, sha256 for
provenance, the TIFF header for its shape, and its pixels once per unit that uses it (as the
previous slice, the centre, the next slice). :func:`load_slice` reads the file's bytes in one go,
hashes them and decodes the slice from those same bytes, so the sha256 recorded is that of the very
pixels denoised; :class:`SliceCache` keeps the last few slices loaded so the units that share a
slice share its one read. The watcher's completeness check (:meth:`SliceCache.check`) reads only
the file's structure, so the pixels are read once, when the daemon takes the file in.

Never stale: an entry is served only while ``os.stat`` of the file gives the same
``(device, inode, size, mtime_ns, ctime_ns)`` as before it was read (any write, rename over or
``touch`` changes one of them), and it is stored only when the file did not change while it was
being read (the one change this cannot see is a rewrite with the same size within one timestamp
tick, a few ms, of the previous write: the watcher has the same blind spot). Bounded by a count
of slices, so memory stays flat over any acquisition (each entry is one decoded slice: 24–48 MB
for a 24-Mpx uint8/uint16 slice).

Thread-safe: the daemon's loop and its reader thread (:mod:`nrrn_daemon.daemon.pipeline`) both
load; a lock guards the table, never a read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from nrrn_daemon.errors import InputError
from nrrn_daemon.files import os_reason
from nrrn_daemon.imaging.tiff import (
    DatabarMode,
    SliceImage,
    check_databar_mode,
    open_tiff,
    read_slice,
    slice_from_tiff,
)


@dataclass(frozen=True, eq=False)
class LoadedSlice:
    """A slice read from disk: its pixels, and the sha256 of the bytes they were decoded from.

    Attributes
    ----------
    path : Path
    image : SliceImage
    sha256 : str or None
        Of the file's bytes as read; ``None`` when the reader did not hash them.
    size, mtime : int, float
        The file's size and modification time (seconds) before the read, as the store keeps them.
    key : tuple of int
        :func:`stat_key` before the read.
    stable : bool
        Whether the file was unchanged by the read's end (the bytes are not torn by a writer).
    """

    path: Path
    image: SliceImage
    sha256: str | None
    size: int
    mtime: float
    key: tuple[int, ...]
    stable: bool = True


def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What identifies a file's content without reading it: any write changes one of these."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: file not found — check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {os_reason(exc)} — check the file") from None


def read_bytes(path: Path) -> tuple[bytes, os.stat_result, bool]:
    """The file's bytes, its stat before the read, and whether it was unchanged after it."""
    before = _stat(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a folder, not a TIFF file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {os_reason(exc)} — check the file") from None
    stable = len(data) == before.st_size and stat_key(_stat(path)) == stat_key(before)
    return data, before, stable


def load_slice(path: Path, databar: DatabarMode = "none", databar_rows: int = 0) -> LoadedSlice:
    """Read a slice file once: hash its bytes and decode the slice from those same bytes.

    Holds the file's bytes and the decoded pixels at once, briefly (twice the slice's size).

    Raises
    ------
    InputError
        As :func:`~nrrn_daemon.imaging.tiff.read_slice`, or the file cannot be read.
    """
    path = Path(path)
    check_databar_mode(databar)
    data, st, stable = read_bytes(path)
    sha = hashlib.sha256(data).hexdigest()
    with open_tiff(path, data) as tif:
        image = slice_from_tiff(tif, path, databar, databar_rows)
    return LoadedSlice(path, image, sha, st.st_size, st.st_mtime, stat_key(st), stable)


def read_unhashed(path: Path, databar: DatabarMode = "none", databar_rows: int = 0) -> LoadedSlice:
    """:func:`~nrrn_daemon.imaging.tiff.read_slice` as a :class:`LoadedSlice` (``sha256`` None).

    The synchronous daemon's reader (no cache, no hash): kept to compare against.
    """
    path = Path(path)
    st = _stat(path)
    image = read_slice(path, databar, databar_rows)
    return LoadedSlice(path, image, None, st.st_size, st.st_mtime, stat_key(st))


class SliceCache:
    """The last ``capacity`` slices loaded, each served only while its file is unchanged.

    Parameters
    ----------
    capacity
        Slices kept (least recently used goes first); 0 keeps none (every load reads).
    databar, databar_rows
        How slices are split (see :func:`~nrrn_daemon.imaging.tiff.read_slice`).

    Attributes
    ----------
    reads, hits : int
        Slices read from disk (and decoded), and loads served from memory.
    """

    def __init__(self, capacity: int, databar: DatabarMode = "none", databar_rows: int = 0):
        if capacity < 0:
            raise ValueError(f"capacity must be ≥ 0, got {capacity}")
        check_databar_mode(databar)
        self.capacity = capacity
        self.databar: DatabarMode = databar
        self.databar_rows = databar_rows
        self.reads = 0
        self.hits = 0
        self._entries: OrderedDict[Path, LoadedSlice] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, path: Path) -> LoadedSlice | None:
        """The cached slice at ``path`` if the file is unchanged since it was read, else None."""
        path = Path(path)
        with self._lock:
            entry = self._entries.get(path)
        if entry is None:
            return None
        try:
            key = stat_key(os.stat(path))
        except OSError:
            key = None
        with self._lock:
            if key != entry.key:
                if self._entries.get(path) is entry:
                    del self._entries[path]  # changed or gone: never served again
                return None
            if path in self._entries:
                self._entries.move_to_end(path)
            self.hits += 1
        return entry

    def load(self, path: Path) -> LoadedSlice:
        """The slice at ``path``: from memory when unchanged, else read (and kept) now.

        Raises
        ------
        InputError
            The file cannot be read or is not a usable slice (see :func:`load_slice`).
        """
        path = Path(path)
        entry = self.get(path)
        if entry is not None:
            return entry
        entry = load_slice(path, self.databar, self.databar_rows)
        with self._lock:
            self.reads += 1
            if entry.stable and self.capacity:
                self._entries[path] = entry
                self._entries.move_to_end(path)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return entry

    @staticmethod
    def check(path: Path) -> tuple[bool, str]:
        """The watcher's completeness check for the overlapped daemon: structure only, no pixels.

        ``(True, "")`` once every strip or tile of every page lies inside the file and the chain
        of pages ends (:func:`~nrrn_daemon.imaging.tiff.check_structure`: a few small reads), which
        for the uncompressed slices microscopes write is exactly when the whole image decodes.
        The pixels are read once, later, when the daemon takes the file in (:meth:`load`); a
        file whose data still does not decode then (a corrupt compressed strip) fails with the
        reason. Not loading here keeps a burst of complete files (a restart, a share that comes
        back) from pushing out of the cache the slices that the next units need.
        """
        try:
            with open_tiff(Path(path)):
                pass
        except InputError as exc:
            return False, str(exc)
        return True, ""

    def forget(self, path: Path) -> None:
        """Drop ``path`` (a slice that failed, or left the folder)."""
        with self._lock:
            self._entries.pop(Path(path), None)
