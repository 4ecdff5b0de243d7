"""The ImageDescription of every TIFF the project writes: what was done, by what, from what.

One home for the text that the daemon, ``denoise`` and ``reprocess`` put into their outputs. Its
form (a line a viewer shows, then one JSON line, then the input's own description):

.. code-block:: text

    NRRN denoised slice (unsupervised, adjacent-slice Noise2Noise) - nrrn-daemon 0.1.0
    nrrn-provenance: {"centre": "slice_0007.tif", "model": {...}, ...}
    input Software: <the input's Software tag, when it had one>

    --- original ImageDescription ---
    <the input's ImageDescription, unchanged>

Why not plain JSON: tifffile takes a description that starts with ``{`` and holds ``"shape":``
(anywhere, so also in a kept original written by tifffile) for its own shaped-array metadata and
then refuses the file ("invalid image description") in ``tifffile.imread``, ``skimage.io.imread``
and ``imageio.v3.imread``. Starting with text keeps every reader working. :func:`read_provenance`
gives the JSON back; by hand: the line after ``nrrn-provenance: `` is JSON. No time stamps: the
same inputs and model give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from nrrn_daemon import __version__

SOFTWARE = f"nrrn-daemon {__version__}"
"""The Software tag (305) of every TIFF the project writes."""
PROVENANCE_PREFIX = "nrrn-provenance: "
"""Starts the JSON line of a description written here."""
INPUT_SOFTWARE_PREFIX = "input Software: "
"""Starts the line that keeps the input's Software tag."""
ORIGINAL_DESCRIPTION_MARKER = "\n\n--- original ImageDescription ---\n"
"""Separates our description from the input's original one, kept after it."""

__all__ = [
    "INPUT_SOFTWARE_PREFIX",
    "ORIGINAL_DESCRIPTION_MARKER",
    "PROVENANCE_PREFIX",
    "SOFTWARE",
    "compose",
    "description",
    "provenance_text",
    "read_provenance",
    "split_description",
]


def provenance_text(what: str, fields: dict[str, Any]) -> str:
    """``what`` on a first line (with the software), then ``fields`` as one JSON line (ASCII)."""
    body = json.dumps({"software": SOFTWARE, "what": what, **fields}, sort_keys=True)
    return f"{what} - {SOFTWARE}\n{PROVENANCE_PREFIX}{body}"


def description(
    *, mode: str, centre: str, neighbours: list[str], model_label: str, model_sha256: str,
    device: str, settings: dict[str, Any], via: str = "", unusable: str | None = None,
) -> str:  # fmt: skip
    """A denoised slice's description (daemon and ``reprocess``): see the module docstring.
    ``unusable``: why the slice was not used as a neighbour (mode ``copy``: nor denoised)."""
    what = f"NRRN denoised slice (unsupervised, adjacent-slice Noise2Noise{via})"
    if unusable is not None:
        what = (
            f"copy of the input, not denoised: unusable: {unusable}"
            if mode == "copy"
            else f"NRRN denoised alone, not used as a neighbour: unusable: {unusable}"
        )
    extra = {} if unusable is None else {"unusable": unusable}
    return provenance_text(
        what,
        {
            **extra,
            "mode": mode,
            "centre": centre,
            "neighbours": neighbours,
            "model": {"label": model_label, "sha256": model_sha256},
            "device": device,
            "settings": settings,
        },
    )


def compose(ours: str, original: str | None, software: str | None = None) -> bytes:
    """The bytes of the ImageDescription tag: ours, the input's Software tag (replaced by
    :data:`SOFTWARE`) on an ``input Software:`` line, then the input's original description."""
    text = ours.encode("ascii")
    if software:
        text += f"\n{INPUT_SOFTWARE_PREFIX}{software}".encode("ascii", "backslashreplace")
    if original:
        text += (ORIGINAL_DESCRIPTION_MARKER + original).encode("utf-8", "surrogateescape")
    return text


def split_description(text: str) -> tuple[str, str | None]:
    """Split an ImageDescription written here into (our description, the original or None)."""
    ours, marker, original = text.partition(ORIGINAL_DESCRIPTION_MARKER)
    return ours, (original if marker else None)


def read_provenance(text: str) -> dict[str, Any] | None:
    """The JSON provenance of a description written here, or None when it holds none."""
    ours, _ = split_description(text)
    for line in ours.splitlines():
        if line.startswith(PROVENANCE_PREFIX):
            try:
                value = json.loads(line[len(PROVENANCE_PREFIX) :])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None
