"""File name -> slice reference, by the profile's glob and index regex. Pure: no file system access.

:meth:`SliceParser.parse` answers one of three things for a path the watcher reports:

* ``None``: not ours (the name does not match the glob): ignore it silently (temporary files,
  metadata, a second detector);
* a :class:`NameRejected`: the name matches the glob but cannot be used (no index, no scan in
  repeat-scans mode, a path that leaves the watch folder...): the daemon records why, once;
* a :class:`SliceRef`: a slice, with its integer index (so ``010`` sorts after ``9``).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from nrrn_daemon.config.profiles import Profile
    from nrrn_daemon.config.watch import WatchSettings

__all__ = ["NameRejected", "RejectReason", "SliceParser", "SliceRef", "last_number", "parse_slice"]

_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def last_number(stem: str) -> int | None:
    """The last integer in a file name's stem: how a folder of slices is ordered without a profile
    (``denoise`` and ``reprocess``); None when the name has no digit."""
    match = _LAST_INT.search(stem)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class SliceRef:
    """One slice file the daemon will use."""

    path: Path
    """The file, as reported (absolute when the watcher reports absolute paths)."""
    name: str
    """The file name (last path component)."""
    index: int
    """The slice number, parsed from the name as an integer."""
    scan: int | None = field(default=None)
    """The scan number in repeat-scans mode (group `scan` of the regex), else None."""


class RejectReason(str, Enum):
    """Why a file that matches the glob cannot be used as a slice. Stored as text."""

    NO_INDEX = "no-index"
    """The index regex does not match the name, or its `index` group took no part in the match."""
    BAD_INDEX = "bad-index"
    """The `index` (or `scan`) group matched text that is not an integer."""
    NO_SCAN = "no-scan"
    """Repeat-scans mode, but the `scan` group took no part in the match."""
    UNSAFE_PATH = "unsafe-path"
    """The path has a '..' component, leaves the watch folder, or the name has '\\' or NUL."""
    SUBFOLDER = "subfolder"
    """The file lies in a sub-folder of the watch folder but `watch.recursive` is false."""


@dataclass(frozen=True)
class NameRejected:
    """A file that matches the glob but cannot be used; ``message`` says why, for the record."""

    path: Path
    """The file, as reported."""
    name: str
    """The file name."""
    reason: RejectReason
    """The kind of problem."""
    message: str
    """One line for the log and the provenance store: what is wrong and what was expected."""

    def __str__(self) -> str:
        return self.message


class SliceParser:
    """Turn reported paths into :class:`SliceRef` by a glob and an index regex.

    Parameters
    ----------
    glob
        Shell pattern matched case-sensitively against the file name only.
    index_regex
        Regular expression searched in the file name, with a named group ``index`` and optionally
        ``scan``.
    mode
        Grouping mode; in ``"repeat-scans"`` the ``scan`` group must match.
    root
        The watch folder. When given, paths outside it are rejected and so are files in its
        sub-folders unless ``recursive``. Relative paths are taken as relative to it; a relative
        ``root`` is resolved against the current directory once, here.
    recursive
        Accept files in sub-folders of ``root``.
    """

    def __init__(
        self,
        glob: str,
        index_regex: str | re.Pattern[str],
        *,
        mode: Literal["adjacent", "repeat-scans"] = "adjacent",
        root: Path | None = None,
        recursive: bool = False,
    ) -> None:
        self.glob = glob
        self.pattern = re.compile(index_regex)
        if "index" not in self.pattern.groupindex:
            raise ValueError(f"index_regex {self.pattern.pattern!r} has no named group `index`")
        if mode == "repeat-scans" and "scan" not in self.pattern.groupindex:
            raise ValueError(
                f"repeat-scans mode needs a named group `scan` in {self.pattern.pattern!r}"
            )
        self.mode = mode
        self.root = Path(os.path.abspath(root)) if root is not None else None
        self.recursive = recursive

    @classmethod
    def from_profile(cls, profile: Profile) -> SliceParser:
        """The parser a profile describes (its ``[watch]`` and ``grouping.mode``)."""
        watch = profile.watch
        return cls(
            watch.glob,
            watch.index_regex,
            mode=profile.grouping.mode,
            root=watch.folder,
            recursive=watch.recursive,
        )

    def matches(self, name: str) -> bool:
        """Whether a file name matches the glob (i.e. the file is meant to be a slice)."""
        return fnmatch.fnmatchcase(name, self.glob)

    def parse(self, path: str | os.PathLike[str]) -> SliceRef | NameRejected | None:
        """Classify one reported path.

        Parameters
        ----------
        path
            The path the watcher or a rescan reported.

        Returns
        -------
        SliceRef | NameRejected | None
            None when the name does not match the glob; a :class:`NameRejected` when it does but
            cannot be used; else the :class:`SliceRef`.
        """
        raw = os.fspath(path)
        pure = PurePath(raw)
        name = pure.name
        if not self.matches(name):
            return None
        full = Path(raw)
        if ".." in pure.parts or "\\" in name or "\0" in raw:
            return self._reject(full, RejectReason.UNSAFE_PATH, "has '..', '\\' or NUL in it")
        if self.root is not None:
            if not full.is_absolute():
                full = self.root / full
            try:
                relative = Path(os.path.normpath(full)).relative_to(self.root)
            except ValueError:
                return self._reject(
                    full, RejectReason.UNSAFE_PATH, f"is outside the watch folder {self.root}"
                )
            if len(relative.parts) > 1 and not self.recursive:
                return self._reject(
                    full,
                    RejectReason.SUBFOLDER,
                    f"is in a sub-folder of {self.root} and watch.recursive is false",
                )
        match = self.pattern.search(name)
        if match is None or match.group("index") is None:
            return self._reject(
                full,
                RejectReason.NO_INDEX,
                f"matches the glob {self.glob!r} but index_regex {self.pattern.pattern!r} "
                "finds no index in it",
            )
        scan_text = match.group("scan") if "scan" in self.pattern.groupindex else None
        if self.mode == "repeat-scans" and scan_text is None:
            return self._reject(
                full,
                RejectReason.NO_SCAN,
                f"index_regex {self.pattern.pattern!r} finds no scan number in it "
                "(grouping.mode is repeat-scans)",
            )
        try:
            index = int(match.group("index"))
            scan = int(scan_text) if scan_text is not None else None
        except ValueError:
            return self._reject(
                full,
                RejectReason.BAD_INDEX,
                f"index_regex {self.pattern.pattern!r} matched a non-integer index or scan "
                f"({match.group('index')!r}, {scan_text!r})",
            )
        return SliceRef(path=full, name=name, index=index, scan=scan)

    @staticmethod
    def _reject(path: Path, reason: RejectReason, why: str) -> NameRejected:
        return NameRejected(path, path.name, reason, f"{path.name!r} {why}")


def parse_slice(
    path: str | os.PathLike[str],
    root: Path | None,
    watch: WatchSettings,
    mode: Literal["adjacent", "repeat-scans"] = "adjacent",
) -> SliceRef | NameRejected | None:
    """Classify one path by a profile's ``[watch]`` settings (see :meth:`SliceParser.parse`).

    ``root`` is the watch folder the paths are reported under (e.g. ``watch.folder`` resolved);
    None skips the containment checks. Parsers are cached, so calling this per file is cheap.
    """
    parser = _cached_parser(watch.glob, watch.index_regex, mode, root, watch.recursive)
    return parser.parse(path)


@functools.lru_cache(maxsize=16)
def _cached_parser(
    glob: str,
    index_regex: str,
    mode: Literal["adjacent", "repeat-scans"],
    root: Path | None,
    recursive: bool,
) -> SliceParser:
    return SliceParser(glob, index_regex, mode=mode, root=root, recursive=recursive)
