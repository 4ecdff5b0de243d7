"""Offline denoising of whole stacks (``nrrn-daemon denoise``).

A multi-page TIFF in gives ``OUTPUT/<stem>.tif`` with the same shape and dtype; a folder or list
of slice files, or one single-page slice file, gives one file per slice in ``OUTPUT`` with the same
name and metadata (a lone slice is denoised on its own, single mode). The databar of slice files
is cropped where their metadata says the image ends (``databar="auto"``, the default). Interior
slices use their triplet, the stack's edges the pair mode (``inputs=3``); ``inputs=2`` always
uses one neighbour (the previous, the next for the first slice), ``inputs=1`` none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nrrn_daemon.errors import InputError, OutputError
from nrrn_daemon.imaging.provenance import provenance_text
from nrrn_daemon.imaging.stacks import Stack, read_stack
from nrrn_daemon.imaging.tiff import read_slice, safe_join, write_slice_atomic, write_stack
from nrrn_daemon.model.denoise import Denoiser


def neighbour_indices(i: int, n: int, inputs: int) -> list[int]:
    """Indices of the neighbours slice ``i`` of ``n`` is denoised with, for 1, 2 or 3 inputs."""
    if inputs == 1 or n == 1:
        return []
    if inputs == 2:
        return [i - 1] if i > 0 else [i + 1]
    return [j for j in (i - 1, i + 1) if 0 <= j < n]


def denoise_stack(
    inputs: Sequence[Path],
    output: Path,
    denoiser: Denoiser,
    *,
    inputs_per_estimate: int = 3,
    databar: str = "auto",
    databar_rows: int = 0,
    on_slice: Callable[[int, int, str], None] | None = None,
) -> list[Path]:
    """Denoise one stack into ``output``; returns the written files.

    ``databar``/``databar_rows`` crop the microscope's info strip off per-slice files before
    denoising and copy it through, as the daemon does (see :func:`imageio.read_slice`).

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

    def pixels(j: int) -> np.ndarray:
        if j not in cache:
            if stack.source_kind == "files":
                cache[j] = read_slice(stack.paths[j], databar, databar_rows).pixels
            else:
                cache[j] = stack[j]
        return cache[j]

    results: list[np.ndarray] = []
    written: list[Path] = []
    for i in range(n):
        for old in [k for k in cache if k < i - 1]:
            del cache[old]
        neighbours = neighbour_indices(i, n, inputs_per_estimate)
        if stack.source_kind == "files":
            centre = read_slice(stack.paths[i], databar, databar_rows)
            out = denoiser.denoise(centre.pixels, [pixels(j) for j in neighbours])
            path = safe_join(output, stack.names[i])
            write_slice_atomic(
                path, centre, out, _describe(denoiser, [stack.names[j] for j in neighbours])
            )
            written.append(path)
        else:
            results.append(denoiser.denoise(pixels(i), [pixels(j) for j in neighbours]))
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
            ),
        )
        written.append(path)
    return written


def _describe(denoiser: Denoiser, neighbours: list[str]) -> str:
    return provenance_text(
        "NRRN denoised (offline)",
        {
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
