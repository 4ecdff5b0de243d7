"""Profile files: find a profile by name in the search path, read its TOML, apply overrides.

The schema (what a profile may contain) is in :mod:`nrrn_daemon.config.profiles`; this module is
the file
side: :func:`profile_search_path` (first occurrence of a name wins), :func:`load_profile` (a name or
a path, plus dotted overrides), :func:`list_profiles` and :func:`profile_field_docs` (the field
docstrings the README is checked against). Every failure raises
:class:`~nrrn_daemon.errors.ProfileError` with one line that names the file, the dotted field, what
is wrong and the value given.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from nrrn_daemon.config.profiles import PROFILE_NAME, Profile
from nrrn_daemon.errors import ProfileError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with the tomli backport
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "BUNDLED_PROFILES",
    "SYSTEM_PROFILES",
    "ProfileEntry",
    "list_profiles",
    "load_profile",
    "profile_field_docs",
    "profile_search_path",
]

BUNDLED_PROFILES = Path(__file__).resolve().parents[2] / "profiles"
"""The profiles shipped in the repository, searched last."""

SYSTEM_PROFILES = Path("/etc/nrrn-daemon/profiles")
"""Site-wide profiles, searched after the user's own."""


@dataclass(frozen=True)
class ProfileEntry:
    """One profile found in the search path: either loaded, or the reason it failed to load."""

    name: str
    """The name it is looked up by (file name without .toml)."""
    path: Path
    """The TOML file."""
    profile: Profile | None
    """The validated profile, or None when it failed to load."""
    error: str | None
    """Why it failed to load, or None."""


def profile_search_path() -> list[Path]:
    """The folders searched for a profile by name, in order (the first occurrence wins).

    ``$NRRN_PROFILES`` (``os.pathsep``-separated), ``$XDG_CONFIG_HOME/nrrn-daemon/profiles``
    (default ``~/.config``), ``/etc/nrrn-daemon/profiles``, then the shipped ones: the
    repository's ``profiles/`` (a source checkout or editable install) and
    ``<prefix>/share/nrrn-daemon/profiles`` (a wheel install).
    """
    env = [Path(p).expanduser() for p in os.environ.get("NRRN_PROFILES", "").split(os.pathsep)]
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [
        *(p for p in env if str(p) not in ("", ".")),
        config / "nrrn-daemon" / "profiles",
        SYSTEM_PROFILES,
        BUNDLED_PROFILES,
        Path(sys.prefix) / "share" / "nrrn-daemon" / "profiles",
    ]


def _looks_like_path(value: str | Path) -> bool:
    if isinstance(value, Path):
        return True
    seps = {os.sep, os.altsep, "/"} - {None}
    return any(s in value for s in seps) or value.endswith(".toml") or Path(value).is_file()


def _find(name: str, search_path: list[Path]) -> Path:
    if not PROFILE_NAME.match(name):
        raise ProfileError(
            f"invalid profile name {name!r}: use lower-case letters, digits, '_' and '-' "
            "(or give a path to a .toml file)"
        )
    for folder in search_path:
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for folder in search_path for p in _tomls(folder)})
    raise ProfileError(
        f"unknown profile {name!r}; available: {', '.join(available) or 'none'}; "
        f"searched: {', '.join(str(p) for p in search_path)}"
    )


def _tomls(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.glob("*.toml") if p.is_file())
    except OSError:
        return []


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], path: Path) -> None:
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ProfileError(
                    f"{path}: cannot override {key!r}: {'.'.join(parents[: i + 1])} is not a table"
                )
            node = child
        node[leaf] = os.fspath(value) if isinstance(value, os.PathLike) else value


def _allowed_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names allowed in the table that holds ``loc`` (for 'unknown field' messages)."""
    model: type[BaseModel] = Profile
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(exc: ValidationError) -> str:
    messages = []
    for err in exc.errors():
        loc = err["loc"]
        field = ".".join(str(p) for p in loc) or "profile"
        if err["type"] == "extra_forbidden":
            table = ".".join(str(p) for p in loc[:-1])
            where = f"[{table}]" if table else "the top level"
            messages.append(
                f"unknown field {field!r} (value {err['input']!r}); allowed in {where}: "
                + ", ".join(_allowed_fields(loc))
            )
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            messages.append(f"{field}: required field is missing")
        elif loc and not isinstance(err["input"], dict):
            messages.append(f"{field}: {msg}; given {err['input']!r}")
        else:  # table-level checks name their fields and values themselves
            messages.append(msg)
    return "; ".join(messages)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None


def load_profile(
    name_or_path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    search_path: list[Path] | None = None,
) -> Profile:
    """Load and validate a profile.

    Parameters
    ----------
    name_or_path
        A profile name, looked up in ``search_path``, or a path to a TOML file (a value with a
        path separator, ending in ``.toml``, or naming an existing file).
    overrides
        Dotted keys applied before validation, e.g. ``{"watch.folder": "/mnt/acq"}``.
    search_path
        Folders to look names up in; default :func:`profile_search_path`.

    Returns
    -------
    Profile
        The validated profile; ``profile.source`` is the file it came from.

    Raises
    ------
    ProfileError
        Unknown name (listing the available ones), unreadable file, bad TOML (with its line), or
        invalid fields (naming each dotted field, what is wrong and the value given).
    """
    folders = profile_search_path() if search_path is None else list(search_path)
    if _looks_like_path(name_or_path):
        path = Path(os.path.expanduser(os.fspath(name_or_path)))
    else:
        path = _find(str(name_or_path), folders)
    data = _read(path)
    if overrides:
        _apply_overrides(data, overrides, path)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"invalid profile {path}: {_describe(exc)}") from None
    profile._source = path
    return profile


def list_profiles(search_path: list[Path] | None = None) -> list[ProfileEntry]:
    """Every profile in the search path (the first occurrence of a name wins), sorted by name.

    Profiles that fail to load are listed with their error instead of raising.
    """
    folders = profile_search_path() if search_path is None else list(search_path)
    found: dict[str, Path] = {}
    for folder in folders:
        for path in _tomls(folder):
            found.setdefault(path.stem, path)
    entries = []
    for name, path in sorted(found.items()):
        try:
            entries.append(ProfileEntry(name, path, load_profile(path), None))
        except ProfileError as exc:
            entries.append(ProfileEntry(name, path, None, str(exc)))
    return entries


def profile_field_docs() -> list[tuple[str, str]]:
    """Every profile field as (dotted name, docstring), tables first then their fields."""
    docs: list[tuple[str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            docs.append((prefix + name, " ".join((info.description or "").split())))
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")

    walk(Profile, "")
    return docs
