"""Output file names: the profile's ``output.naming`` template, checked once, filled per slice.

A template may use {name} (the input file name), {stem}, {suffix} and {index} (the slice number,
with format specs such as {index:05d}). :func:`check_template` runs when a profile is validated;
:func:`output_name` fills the template for one slice and checks that the result is a plain file
name, so an output can never be written outside ``output.folder``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from nrrn_daemon.errors import InputError

__all__ = [
    "NAMING_FIELDS",
    "check_file_name",
    "check_template",
    "naming_fields",
    "output_name",
    "render",
]

NAMING_FIELDS = ("name", "stem", "suffix", "index")
"""The placeholders an output naming template may use."""


def render(template: str, input_name: str, index: int | None) -> str:
    """Fill a naming template; an {index} placeholder with no index raises ValueError."""
    path = Path(input_name)
    fields: dict[str, Any] = {"name": input_name, "stem": path.stem, "suffix": path.suffix}
    if index is not None:
        fields["index"] = index
    elif "index" in {f for _, f, _, _ in string.Formatter().parse(template)}:
        raise ValueError("the template uses {index} but the slice has no index")
    return template.format_map(fields)


def naming_fields(template: str) -> set[str]:
    """The placeholders a (checked) naming template uses."""
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a plain file name, else raise InputError saying why."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InputError(f"{name!r} is not a plain file name (no '/', '\\', '..' or NUL)")
    return name


def check_template(template: str) -> str:
    """Return ``template`` if it is a safe naming template, else raise ValueError saying why.

    Safe: it parses, uses only :data:`NAMING_FIELDS`, names each slice differently ({name},
    {stem} or {index}), has no path separator, and gives a plain file name for a sample slice.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    fields = {f for _, f, _, _ in parts if f is not None}
    unknown = sorted(f or "{}" for f in fields if f not in NAMING_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown placeholder(s) {', '.join(unknown)}; allowed: "
            + ", ".join("{" + f + "}" for f in NAMING_FIELDS)
        )
    if not fields & {"name", "stem", "index"}:
        raise ValueError(
            "the template must contain {name}, {stem} or {index}, "
            "else every slice would be written to the same file"
        )
    for literal, *_ in parts:
        if "/" in literal or "\\" in literal:
            raise ValueError("the template must not contain '/' or '\\'")
    try:
        check_file_name(render(template, "SEM Image - SliceImage - 001.tif", 1))
    except (InputError, ValueError) as exc:
        raise ValueError(f"the template does not give a plain file name: {exc}") from None
    return template


def output_name(template: str, input_name: str, index: int | None) -> str:
    """The output file name of one input file; see
    :meth:`nrrn_daemon.config.profiles.Profile.output_name`.

    Raises
    ------
    InputError
        When the template needs {index} and none is given, or the result is not a plain name.
    """
    try:
        result = render(template, input_name, index)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(
            f"cannot name the output of {input_name!r} with output.naming "
            f"{template!r} (index {index!r}): {exc}"
        ) from None
    return check_file_name(result)
