"""One unit of the daemon's work: read a group of slices, denoise the centre, write its output.

The thin I/O shell around :class:`~nrrn_daemon.model.denoise.Denoiser`, in three steps that
:mod:`nrrn_daemon.daemon.pipeline` runs in three threads (so reading the next unit and writing the
previous one overlap with the model), or in turn for the synchronous design:

1. :func:`gather`: the inputs, through a loader (the slice cache: each file read once), the
   databar cropped off and kept aside, all of one size and bit depth;
2. :func:`run_model`: denoise the centre with its neighbours;
3. :func:`write_output`: the output TIFF, atomically, with the input's shape, dtype and metadata
   plus a description of what was done, and the no-reference quality of input and output
   (:func:`~nrrn_daemon.evaluation.quality.measure`); returns what provenance needs.

It never writes anywhere but the output folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nrrn_daemon.daemon.slicecache import LoadedSlice
from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.quality import Quality, measure
from nrrn_daemon.files import safe_join
from nrrn_daemon.imaging.provenance import description
from nrrn_daemon.imaging.tiff import SliceImage
from nrrn_daemon.imaging.tiffwrite import write_slice_atomic
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.registry import ModelInfo
from nrrn_daemon.triplets import Work, WorkMode

log = logging.getLogger("nrrn_daemon")

Loader = Callable[[Path], LoadedSlice]
"""``load(path)`` → the slice at ``path`` (a :meth:`SliceCache.load`, or :func:`read_unhashed`)."""


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
    input_sha256: list[str | None] = field(default_factory=list)
    """sha256 of each input's bytes as read (centre first); None where the reader did not hash."""
    model: ModelInfo | None = None
    """The model that made it (the daemon may have switched models since)."""
    quality: Quality | None = None
    """No-reference noise and flat-region IQR of input and output (None: too small to measure)."""


def describe(work: Work, model: ModelInfo, denoiser: Denoiser, settings: dict[str, Any]) -> str:
    """The ImageDescription of a daemon output (see :func:`~nrrn_daemon.imaging.provenance`)."""
    return description(
        mode=work.mode, centre=work.centre.name, neighbours=[n.name for n in work.neighbours],
        model_label=model.label, model_sha256=model.sha256, device=denoiser.device,
        settings=settings, unusable=work.unusable,
    )  # fmt: skip


@dataclass
class Inputs:
    """A unit's slices as read, centre first, all of one shape and dtype."""

    work: Work
    centre: SliceImage
    neighbours: list[SliceImage]
    sha256: list[str | None]
    started_at: float
    read_s: float


@dataclass
class Denoised:
    """A unit's denoised centre, with what the output file and provenance say about it.

    It keeps the centre slice (its databar and metadata go into the output) but not the
    neighbours, so an output waiting for the writer holds no more pixels than it needs.
    """

    work: Work
    centre: SliceImage
    sha256: list[str | None]
    started_at: float
    read_s: float
    pixels: np.ndarray
    model: ModelInfo
    device: str
    settings: dict[str, Any]
    description: str
    model_s: float


def gather(work: Work, load: Loader) -> Inputs:
    """Step 1: load the unit's slices (centre first) and check they can be denoised together.

    Raises
    ------
    InputError
        An input cannot be read, or its shape or dtype differs from the centre's.
    """
    started = time.time()
    t0 = time.perf_counter()
    centre = load(work.centre.path)
    shas = [centre.sha256]
    neighbours: list[SliceImage] = []
    for ref in work.neighbours:
        loaded = load(ref.path)
        image, first = loaded.image, centre.image
        if image.pixels.shape != first.pixels.shape or image.pixels.dtype != first.pixels.dtype:
            raise InputError(
                f"{ref.path} is {image.pixels.shape} {image.pixels.dtype} but the slice it should "
                f"help denoise, {work.centre.path}, is {first.pixels.shape} "
                f"{first.pixels.dtype} — slices of one data set must share size and bit depth"
            )
        neighbours.append(image)
        shas.append(loaded.sha256)
    return Inputs(work, centre.image, neighbours, shas, started, time.perf_counter() - t0)


def run_model(
    inputs: Inputs,
    denoiser: Denoiser,
    model: ModelInfo,
    *,
    databar: str = "none",
    databar_rows: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Denoised:
    """Step 2: denoise the centre with its neighbours.

    Raises
    ------
    Abandoned
        ``should_stop`` returned True during denoising (nothing written).
    """
    t0 = time.perf_counter()
    if inputs.work.mode == WorkMode.COPY:  # an unusable slice without signal: kept as it came
        pixels = inputs.centre.pixels.copy()
    else:
        pixels = denoiser.denoise(
            inputs.centre.pixels, [n.pixels for n in inputs.neighbours], should_stop=should_stop
        )
    model_s = time.perf_counter() - t0
    settings = {  # after denoising: an out-of-memory retry may have shrunk the tiles
        "tile": denoiser.tile,
        "tile_batch": denoiser.tile_batch,
        "precision": denoiser.precision,
        "compiled": denoiser.compiled,
        "normalisation": denoiser.checkpoint.normalisation.to_dict(),
        "databar": databar,
        "databar_rows": databar_rows,
        "inputs": len(inputs.neighbours) + 1,
        **denoiser.provenance(),  # neighbour shifts, posterior noise model
    }
    description = describe(inputs.work, model, denoiser, settings)
    return Denoised(
        inputs.work, inputs.centre, inputs.sha256, inputs.started_at, inputs.read_s, pixels,
        model, denoiser.device, settings, description, model_s,
    )  # fmt: skip


def write_output(denoised: Denoised, output_folder: Path, output_name: str) -> OutputRecord:
    """Step 3: write the output file atomically; return what provenance records.

    Raises
    ------
    OutputError
        The output cannot be written (the slice stays ready and is retried).
    """
    t0 = time.perf_counter()
    path = safe_join(output_folder, output_name)
    sha = write_slice_atomic(path, denoised.centre, denoised.pixels, denoised.description)
    write_s = time.perf_counter() - t0
    try:  # here, in the writer's thread: the model never waits for it
        quality: Quality | None = measure(denoised.centre.pixels, denoised.pixels)
    except InputError as exc:  # a slice too small to measure still gets its output
        log.debug("no quality measures for %s: %s", path.name, exc)
        quality = None
    return OutputRecord(
        path=path,
        sha256=sha,
        mode=denoised.work.mode,
        settings=denoised.settings,
        device=denoised.device,
        started_at=denoised.started_at,
        finished_at=time.time(),
        read_s=denoised.read_s,
        model_s=denoised.model_s,
        write_s=write_s,
        input_shapes=[denoised.centre.full_shape] * len(denoised.sha256),
        input_sha256=list(denoised.sha256),
        model=denoised.model,
        quality=quality,
    )
