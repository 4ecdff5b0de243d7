"""One unit of the daemon's work: read a group of slices, denoise the centre, write its output.

The thin I/O shell around :class:`~nrrn_daemon.denoise.Denoiser`: it reads the inputs (the
databar cropped off and kept aside), denoises, writes the output TIFF atomically with the input's
shape, dtype and metadata plus a description of what was done, and returns what provenance needs.
It never writes anywhere but the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .denoise import Denoiser
from .errors import InputError
from .imageio import SliceImage, read_slice, safe_join, write_slice_atomic
from .triplets import Work


@dataclass(frozen=True)
class ModelInfo:
    """The model in service, as provenance names it."""

    label: str
    sha256: str
    path: str
    store_id: int


@dataclass
class OutputRecord:
    """What one processed unit produced (everything provenance records about it)."""

    path: Path
    sha256: str
    mode: str
    settings: dict[str, Any]
    device: str
    started_at: float
    finished_at: float
    read_s: float
    model_s: float
    write_s: float
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)


def describe(work: Work, model: ModelInfo, denoiser: Denoiser, settings: dict[str, Any]) -> str:
    """The ImageDescription written into an output: what was done, by what, from which files."""
    return json.dumps(
        {
            "software": f"nrrn-daemon {__version__}",
            "what": "NRRN denoised slice (unsupervised, adjacent-slice Noise2Noise)",
            "mode": work.mode,
            "centre": work.centre.name,
            "neighbours": [n.name for n in work.neighbours],
            "model": {"label": model.label, "sha256": model.sha256},
            "device": denoiser.device,
            "settings": settings,
        },
        sort_keys=True,
    )


def process(
    work: Work,
    *,
    denoiser: Denoiser,
    model: ModelInfo,
    output_folder: Path,
    output_name: str,
    databar: str = "none",
    databar_rows: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> OutputRecord:
    """Denoise ``work.centre`` with its neighbours and write ``output_folder / output_name``.

    Raises
    ------
    InputError
        An input cannot be read or its shape differs from the centre's (the centre's slice is
        then failed by the daemon; nothing is written).
    OutputError
        The output cannot be written (the slice stays ready and is retried).
    Abandoned
        ``should_stop`` returned True during denoising (nothing written).
    """
    started = time.time()
    t0 = time.perf_counter()
    centre = read_slice(work.centre.path, databar, databar_rows)
    neighbours: list[SliceImage] = []
    for ref in work.neighbours:
        image = read_slice(ref.path, databar, databar_rows)
        if image.pixels.shape != centre.pixels.shape or image.pixels.dtype != centre.pixels.dtype:
            raise InputError(
                f"{ref.path} is {image.pixels.shape} {image.pixels.dtype} but the slice it should "
                f"help denoise, {work.centre.path}, is {centre.pixels.shape} "
                f"{centre.pixels.dtype} — slices of one data set must share size and bit depth"
            )
        neighbours.append(image)
    t1 = time.perf_counter()
    denoised = denoiser.denoise(
        centre.pixels, [n.pixels for n in neighbours], should_stop=should_stop
    )
    t2 = time.perf_counter()
    settings = {
        "tile": denoiser.tile,
        "tile_batch": denoiser.tile_batch,
        "precision": denoiser.precision,
        "normalisation": denoiser.checkpoint.normalisation.to_dict(),
        "databar": databar,
        "databar_rows": databar_rows,
        "inputs": len(neighbours) + 1,
    }
    path = safe_join(output_folder, output_name)
    sha = write_slice_atomic(path, centre, denoised, describe(work, model, denoiser, settings))
    t3 = time.perf_counter()
    return OutputRecord(
        path=path,
        sha256=sha,
        mode=work.mode,
        settings=settings,
        device=denoiser.device,
        started_at=started,
        finished_at=time.time(),
        read_s=t1 - t0,
        model_s=t2 - t1,
        write_s=t3 - t2,
    )
