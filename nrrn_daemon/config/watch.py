"""The ``[watch]`` table of a profile: where the microscope writes, which files are slices, and
the detector channels of one folder (``channels`` globs, or Auto Slice & View ``detectors``).

Part of the profile schema (:mod:`nrrn_daemon.config.profiles`), with the path and glob checks the
other tables share.
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["CHANNEL_NAME", "STRICT", "WatchSettings", "check_glob", "detector_glob", "expand_path"]

CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
"""What a detector channel's name may look like (it names a data set and a volume)."""

STRICT = ConfigDict(
    extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True
)
"""Every profile table: unknown fields refused, frozen, documented by the docstring under each
field, defaults validated."""


def expand_path(value: Any) -> Any:
    """Expand ``~`` and ``$VARS`` in a path-like value; relative paths stay relative."""
    if isinstance(value, (str, os.PathLike)):
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(value))))
    return value


def check_glob(value: str) -> str:
    """Return ``value`` if it is a file name pattern, else raise ValueError saying why."""
    if not value.strip():
        raise ValueError("the glob is empty; give a file name pattern such as '*.tif'")
    if "/" in value or "\\" in value:
        raise ValueError(
            "the glob is matched against file names only and must not contain '/' or '\\'; "
            "use watch.folder and watch.recursive for folders"
        )
    return value


def detector_glob(detector: str) -> str:
    """The file name glob of an Auto Slice & View detector: ``"<detector> - ….tif"``, or with
    '_' for its spaces ``"<detector>-S….tif"`` (``SEM_Image-SliceImage-001.tif``).

    ``"SEM Image"`` gives ``"SEM[ _]Image[ -][-S]*.tif"``: the character after the name is " "
    then "-", or "-" then the "S" of "SliceImage", so "SEM Image 2 - …" is not matched.
    """
    return detector.replace(" ", "[ _]") + "[ -][-S]*.tif"


def _detector_samples(detector: str) -> tuple[str, str]:
    """The two Auto Slice & View spellings of a detector's slice file name."""
    return f"{detector} - SliceImage - 001.tif", f"{detector.replace(' ', '_')}-SliceImage-001.tif"


class WatchSettings(BaseModel):
    """Where the microscope writes its slices and how to recognise them."""

    model_config = STRICT

    folder: Path = Path("/data/fibsem/incoming")
    """The microscope's output folder. Read-only to the daemon: nothing is ever written there."""

    glob: str = "*.tif"
    """Shell pattern matched (case-sensitively) against file names only, never against folders."""

    index_regex: str = r"(?P<index>\d+)\D*$"
    """Regular expression searched in the file name; its named group `index` holds the slice
    number (parsed as an integer). An optional group `scan` numbers repeated scans of one slice
    and is required when `grouping.mode` is "repeat-scans"."""

    recursive: bool = False
    """Also watch the sub-folders of `folder`."""

    observer: Literal["native", "polling", "listing"] = "native"
    """"native" uses the OS notifications (inotify...); on network shares (CIFS/NFS), where
    remote writes raise no notification, use "listing" (every `poll_interval_s`, read the
    folder's file names and stat only new files: cheap on folders of many thousand slices; a
    file rewritten in place under a known name is seen by the next reconciliation scan) or
    "polling" (watchdog's polling observer, which stats every file every `poll_interval_s`)."""

    poll_interval_s: float = Field(default=2.0, ge=0.1, le=600)
    """Seconds between two looks at the folder by the "listing" or "polling" observer."""

    settle_s: float = Field(default=2.0, ge=0, le=3600)
    """A file counts as complete once its size and modification time stayed unchanged this many
    seconds (and it decodes)."""

    channels: dict[str, str] = {}
    """Several detectors writing into one folder (Auto Slice & View's "SEM Image" and "SEM
    Image 2"): channel name = file name glob, e.g. {"SEM Image" = "SEM Image - *.tif", "SEM
    Image 2" = "SEM Image 2 - *.tif"}. Each channel is its own data set ("<folder> [<name>]")
    with its own triplets, model and fine-tune, all in one daemon; the globs must not match the
    same files. Empty (the default): the folder is one data set, matched by `glob`."""

    detectors: list[str] = []
    """The short form of `channels` for Auto Slice & View, e.g. ["SEM Image", "SEM Image 2"]: each
    detector is a channel of that name whose files are "<detector> - SliceImage - NNN.tif" (also
    spelt with '_' for spaces, "SEM_Image-SliceImage-NNN.tif"), glob "<detector>[ -][-S]*.tif"
    with "[ _]" for each space. Give `detectors` or `channels`, not both; two detectors whose
    file names the globs cannot tell apart are refused."""

    rescan_interval_s: float = Field(default=60.0, ge=1, le=86400)
    """Seconds between two reconciliation scans of the whole folder, which stat every file and
    catch any file the observer missed (and, with "listing", files rewritten in place)."""

    answer_timeout_s: float = Field(default=10.0, ge=0.1, le=3600)
    """Seconds a look at the folder (listing, stat, reconciliation scan: run beside the daemon
    loop, never in it) may take before the folder is reported "not answering" in the log and in
    `status` (a hung network share). Denoising, the heartbeat and stopping go on meanwhile, and
    watching resumes by itself when the folder answers."""

    follow_links: bool = False
    """Read a slice whose real path lies outside `folder` (a symbolic link out of it, or a
    `..` through a mount). By default such a file is never opened: it is recorded as failed
    with the link's target, so a link to someone else's data is not denoised into the output."""

    @field_validator("folder", mode="before")
    @classmethod
    def _expand_folder(cls, value: Any) -> Any:
        return expand_path(value)

    @field_validator("glob")
    @classmethod
    def _glob_is_a_name_pattern(cls, value: str) -> str:
        return check_glob(value)

    @field_validator("channels")
    @classmethod
    def _channels_are_names_and_globs(cls, value: dict[str, str]) -> dict[str, str]:
        for name, glob in value.items():
            if not CHANNEL_NAME.fullmatch(name):
                raise ValueError(
                    f"channel name {name!r} must be letters, digits, spaces, '.', '_' or '-'"
                )
            try:
                check_glob(glob)
            except ValueError as exc:
                raise ValueError(f"channel {name!r}: {exc}") from None
        return value

    @field_validator("detectors")
    @classmethod
    def _detectors_are_distinct_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not CHANNEL_NAME.fullmatch(name):
                raise ValueError(
                    f"detector name {name!r} must be letters, digits, spaces, '.', '_' or '-'"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"a detector is named twice in {value}")
        for a in value:
            for b in value:
                clash = [
                    n for n in _detector_samples(b) if a != b and fnmatchcase(n, detector_glob(a))
                ]
                if clash:
                    raise ValueError(
                        f"detectors {a!r} and {b!r} cannot be told apart by file name ({clash[0]!r}"
                        f" matches {a!r}'s glob {detector_glob(a)!r}); give watch.channels globs"
                        " instead"
                    )
        return value

    @model_validator(mode="after")
    def _one_form_of_channels(self) -> WatchSettings:
        if self.detectors and self.channels:
            raise ValueError(
                "watch.detectors and watch.channels both name the channels; give one of them"
                f" (detectors = {self.detectors}, channels = {self.channels})"
            )
        return self

    @property
    def channel_globs(self) -> dict[str, str]:
        """Channel name → file name glob, from `channels` or `detectors`; empty: no channels."""
        if self.detectors:
            return {name: detector_glob(name) for name in self.detectors}
        return dict(self.channels)

    @field_validator("index_regex")
    @classmethod
    def _regex_has_index_group(cls, value: str) -> str:
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if "index" not in pattern.groupindex:
            raise ValueError(
                "the regular expression has no named group `index`; "
                r"write it as (?P<index>\d+) around the slice number"
            )
        return value
