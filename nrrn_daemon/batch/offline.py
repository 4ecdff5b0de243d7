"""Offline denoising of whole stacks (``nrrn-daemon denoise``).

A multi-page TIFF in gives ``OUTPUT/<stem>.tif`` with the same shape and dtype; a folder or list
of slice files, or one single-page slice file, gives one file per slice in ``OUTPUT`` with the same
name and metadata (a lone slice is denoised on its own, single mode). The databar of slice files
is cropped where their metadata says the image ends (``databar="auto"``, the default). Interior
slices use their triplet, the stack's edges the pair mode (``inputs=3``); ``inputs=2`` always
uses one neighbour (the previous, the next for the first slice), ``inputs=1`` none.

Every slice is judged first (:func:`nrrn_daemon.frames.judge_stack`): an unusable one (blank,
saturated, cut short, unrelated to its neighbours) is never a neighbour, so the slices beside it
use the pair mode (single between two bad frames), and it is written itself as a copy of the
input (no signal) or denoised alone, with a description that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nrrn_daemon.config.profiles import FrameSettings
from nrrn_daemon.errors import InputError, OutputError
from nrrn_daemon.files import safe_join
from nrrn_daemon.frames import Verdict, judge_stack
from nrrn_daemon.imaging.provenance import provenance_text
from nrrn_daemon.imaging.stacks import Stack, read_stack
from nrrn_daemon.imaging.tiff import read_slice
from nrrn_daemon.imaging.tiffwrite import write_slice_atomic, write_stack
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.triplets import neighbour_indices

DEFAULT_FRAMES = FrameSettings()
"""The frame judgement offline ``denoise`` applies unless told otherwise (the profile defaults)."""


def denoise_stack(
    inputs: Sequence[Path],
    output: Path,
    denoiser: Denoiser,
    *,
    inputs_per_estimate: int = 3,
    databar: str = "auto",
    databar_rows: int = 0,
    on_slice: Callable[[int, int, str], None] | None = None,
    frames: FrameSettings | None = DEFAULT_FRAMES,
    on_unusable: Callable[[str, str], None] | None = None,
    intermediate: Path | None = None,
) -> list[Path]:
    """Denoise one stack into ``output``; returns the written files.

    ``intermediate``: also write the estimate after every building unit (paper 2.2.4, Fig. 5)
    of each slice there, as ``<name>_bu<k>.tif`` (k = 1 … blocks; the output is the last one
    after the tail and the posterior step); files of the outputs' dtype.

    ``databar``/``databar_rows`` crop the microscope's info strip off per-slice files before
    denoising and copy it through, as the daemon does (see
    :func:`~nrrn_daemon.imaging.tiff.read_slice`).
    ``frames`` judges every slice first (None: every slice is a neighbour); ``on_unusable(name,
    reason)`` is told of each unusable one.

    Raises
    ------
    InputError
        Unreadable or inconsistent inputs (from :func:`read_stack`).
    OutputError
        ``output`` is an input folder, or cannot be written.
    """
    stack = read_stack(list(inputs))
    if databar not in ("none", "auto") and stack.source_kind != "files":
        raise InputError(
            f"--databar applies to per-slice files; {stack.paths[0]} is a multi-page stack — "
            "omit --databar or give the slice files"
        )
    if stack.source_kind != "files":
        databar = "none"  # the pages of a stack have no databar
    output = Path(output)
    _refuse_input_folder(stack, output)
    output.mkdir(parents=True, exist_ok=True)
    n = len(stack)
    cache: dict[int, np.ndarray] = {}

    def read(j: int) -> np.ndarray:
        if stack.source_kind == "files":
            return read_slice(stack.paths[j], databar, databar_rows).pixels
        return stack[j]

    def pixels(j: int) -> np.ndarray:
        if j not in cache:
            cache[j] = read(j)
        return cache[j]

    def name(j: int) -> str:
        return stack.names[j] if stack.source_kind == "files" else f"slice {j}"

    verdicts = judge_stack(range(n), read, frames) if frames is not None else {}
    bad = {i: v for i, v in verdicts.items() if not v.usable}
    for i, verdict in bad.items():
        if on_unusable:
            on_unusable(name(i), verdict.reason or "")

    def estimate(i: int, centre: np.ndarray, neighbours: list[int]) -> np.ndarray:
        if i in bad and not bad[i].has_signal:
            return centre.copy()  # nothing to denoise: kept as it came
        return denoiser.denoise(centre, [pixels(j) for j in neighbours])

    results: list[np.ndarray] = []
    written: list[Path] = []
    for i in range(n):
        for old in [k for k in cache if k < i - 1]:
            del cache[old]
        neighbours = neighbour_indices(i, range(n), inputs_per_estimate, bad)
        if intermediate is not None:
            _write_unit_estimates(denoiser, intermediate, stack, i, pixels, neighbours)
        if stack.source_kind == "files":
            centre = read_slice(stack.paths[i], databar, databar_rows)
            out = estimate(i, centre.pixels, neighbours)
            path = safe_join(output, stack.names[i])
            described = _describe(denoiser, [stack.names[j] for j in neighbours])
            if i in bad:
                described = _describe(denoiser, [], unusable=bad[i])
            write_slice_atomic(path, centre, out, described)
            written.append(path)
        else:
            results.append(estimate(i, pixels(i), neighbours))
        if on_slice:
            on_slice(i + 1, n, stack.names[i] if stack.source_kind == "files" else f"slice {i}")
    if stack.source_kind != "files":
        path = safe_join(output, f"{stack.stem}.tif")
        write_stack(
            path,
            np.stack(results),
            colormap=stack.colormap,
            description=_describe(
                denoiser,
                ["triplets" if inputs_per_estimate == 3 else f"{inputs_per_estimate} inputs"],
                pages={i: v.reason or "" for i, v in bad.items()},
            ),
        )
        written.append(path)
    return written


def _write_unit_estimates(
    denoiser: Denoiser,
    folder: Path,
    stack: Stack,
    i: int,
    pixels: Callable[[int], np.ndarray],
    neighbours: Sequence[int],
) -> None:
    folder = Path(folder)
    _refuse_input_folder(stack, folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(stack.names[i]).stem if stack.source_kind == "files" else f"{stack.stem}_z{i:04d}"
    steps = denoiser.unit_estimates(pixels(i), [pixels(j) for j in neighbours])
    for k, image in enumerate(steps[:-1], start=1):
        write_stack(safe_join(folder, f"{stem}_bu{k}.tif"), image[None], _describe(
            denoiser, [stack.names[j] for j in neighbours], what=f"estimate after building unit {k}"
        ))  # fmt: skip


def _describe(
    denoiser: Denoiser,
    neighbours: list[str],
    *,
    unusable: Verdict | None = None,
    pages: dict[int, str] | None = None,
    what: str = "NRRN denoised (offline)",
) -> str:
    extra: dict[str, object] = {}
    if unusable is not None:
        done = "denoised alone" if unusable.has_signal else "copy of the input, not denoised"
        what = f"{done}: unusable: {unusable.reason}"
        extra["unusable"] = unusable.reason
    if pages:  # a stack: which pages were not used as neighbours, and why
        extra["unusable_pages"] = {str(i): why for i, why in sorted(pages.items())}
    return provenance_text(
        what,
        {
            **extra,
            "model_sha256": denoiser.checkpoint.content_sha256,
            "neighbours": neighbours,
            "device": denoiser.device,
            "precision": denoiser.precision,
            "tile": denoiser.tile,
        },
    )


def _refuse_input_folder(stack: Stack, output: Path) -> None:
    out = output.resolve()
    for p in stack.paths:
        if p.resolve().parent == out:
            raise OutputError(
                f"output folder {output} holds the input {p.name}: outputs would overwrite raw "
                "slices — choose another --output folder"
            )
