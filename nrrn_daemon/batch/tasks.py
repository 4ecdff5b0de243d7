"""The worker side of ``nrrn-daemon reprocess``: one Dask task denoises a few slices.

A task gets plain, picklable descriptions (:class:`SliceTask`, :class:`JobSpec`), reads its
inputs from the shared file system, denoises, writes each slice's TIFF and/or its z-slice of the
OME-Zarr volume, and returns one :class:`SliceResult` per slice: what provenance needs, never
pixels. It writes nothing else; the client records the results in SQLite (the one writer).

Idempotent: the TIFF is written atomically (temporary file + rename) and its bytes depend only
on the inputs, the model and the device, and a z-slice of the volume is one shard file per level
written the same way. When Dask re-runs a task because its worker died, the second run writes
the same files; nothing is appended.

Each worker process loads the model once: :class:`ModelCache` is a Dask ``WorkerPlugin`` that
keeps the :class:`~nrrn_daemon.model.denoise.Denoiser` per checkpoint sha256, picks the worker's
own GPU
(``auto`` on a machine with several: worker ``n`` takes ``cuda:n % count``), and sets the number
of torch threads of CPU workers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import WorkerPlugin, get_worker

from nrrn_daemon.errors import CheckpointError, NRRNError
from nrrn_daemon.files import sha256_file
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.imaging.provenance import description
from nrrn_daemon.imaging.tiff import SliceImage, open_tiff, page_image, read_slice
from nrrn_daemon.imaging.tiffwrite import write_slice_atomic as write_tiff
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser

PLUGIN_NAME = "nrrn-model-cache"
KEEP_MODELS = 2
"""Denoisers a worker keeps loaded (a run uses one; a second run may bring another)."""


@dataclass(frozen=True)
class SliceSource:
    """One input slice: a file, or a page of a multi-page stack.

    ``key`` is how the store records it (the file's absolute path, ``STACK#PAGE`` for a page);
    ``size``/``mtime`` are the file's when the run was planned.
    """

    index: int
    name: str
    path: str
    page: int | None
    key: str
    size: int
    mtime: float


@dataclass(frozen=True)
class SliceTask:
    """Denoise ``centre`` with ``neighbours`` (roles in ``roles``), write it to ``tiff``/``z``."""

    z: int
    centre: SliceSource
    neighbours: tuple[SliceSource, ...]
    roles: tuple[str, ...]
    mode: str
    tiff: str | None
    unusable: str | None = None
    """Why the centre is no neighbour (:mod:`nrrn_daemon.frames`); mode ``copy``: not denoised."""


@dataclass(frozen=True)
class JobSpec:
    """What every task of a run shares: the model, the device, the settings, the volume."""

    checkpoint: str
    checkpoint_sha256: str
    model_label: str
    device: str = "auto"
    tile: int = 512
    tile_batch: int | None = None
    databar: str = "none"
    databar_rows: int = 0
    zarr: str | None = None
    precision: str = "auto"
    compile: str = "auto"


@dataclass
class SliceResult:
    """What one denoised slice returns to the client (for its provenance record)."""

    z: int
    centre_key: str
    input_sha256: dict[str, str]
    output_sha256: str | None
    pixels_sha256: str
    settings: dict[str, Any]
    device: str
    started_at: float
    finished_at: float
    read_s: float
    model_s: float
    write_s: float
    worker: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelCache(WorkerPlugin):
    """Per-worker cache of loaded models (a Dask ``WorkerPlugin``).

    Parameters
    ----------
    torch_threads
        Intra-op threads for torch on CPU; ``None``: the CPUs this process may use divided by
        the worker's task threads.
    """

    name = PLUGIN_NAME

    def __init__(self, torch_threads: int | None = None) -> None:
        self.torch_threads = torch_threads
        self.worker_name: Any = None
        self._denoisers: OrderedDict[tuple[Any, ...], Denoiser] = OrderedDict()
        self._volumes: dict[str, OmeZarrVolume] = {}

    def setup(self, worker: Any) -> None:
        import torch

        self.worker_name = worker.name
        threads = self.torch_threads
        if threads is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            threads = max(1, (cpus or os.cpu_count() or 1) // max(1, worker.state.nthreads))
        torch.set_num_threads(threads)

    def device_for(self, request: str) -> str:
        """``auto`` on a worker of a machine with several GPUs: this worker's own one."""
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if request == "auto" and count > 1 and isinstance(self.worker_name, int):
            return f"cuda:{self.worker_name % count}"
        return request

    def denoiser(self, job: JobSpec) -> Denoiser:
        """The job's Denoiser, loaded once per worker (verified against the job's sha256)."""
        key = (job.checkpoint_sha256, job.device, job.tile, job.tile_batch, job.precision,
               job.compile)  # fmt: skip
        if key in self._denoisers:
            self._denoisers.move_to_end(key)
            return self._denoisers[key]
        ckpt = load_checkpoint(Path(job.checkpoint))
        if ckpt.content_sha256 != job.checkpoint_sha256:
            raise CheckpointError(
                f"checkpoint {job.checkpoint} on worker {self.worker_name} has sha256 "
                f"{ckpt.short_sha}, the run uses {job.checkpoint_sha256[:12]} — the workers must "
                "see the same file as the client (a shared file system)"
            )
        denoiser = Denoiser(
            ckpt, device=self.device_for(job.device), tile=job.tile, tile_batch=job.tile_batch,
            precision=job.precision, compile=job.compile,
        )  # fmt: skip
        self._denoisers[key] = denoiser
        while len(self._denoisers) > KEEP_MODELS:
            self._denoisers.popitem(last=False)
        return denoiser

    def volume(self, path: str, z: int) -> OmeZarrVolume:
        """The OME-Zarr volume at ``path``, opened once per worker (again once it has grown)."""
        if path not in self._volumes or z >= self._volumes[path].shape[0]:
            self._volumes[path] = OmeZarrVolume.open(Path(path))
        return self._volumes[path]


def run_batch(tasks: list[SliceTask], job: JobSpec) -> list[SliceResult]:
    """The Dask task: denoise consecutive slices with the worker's cached model.

    Each input is read (and hashed) once per batch. An expected failure of one slice (an
    unreadable file, a full disk) becomes that slice's ``error``; the other slices go on.
    """
    worker = get_worker()
    cache: ModelCache = worker.plugins[PLUGIN_NAME]
    denoiser = cache.denoiser(job)
    volume = cache.volume(job.zarr, max(t.z for t in tasks)) if job.zarr else None
    images: dict[str, tuple[SliceImage, str]] = {}
    results = []
    for task in tasks:
        needed = {task.centre.key, *(n.key for n in task.neighbours)}
        for stale in [k for k in images if k not in needed]:
            del images[stale]
        try:
            result = process_slice(task, job, denoiser, volume, images)
        except NRRNError as exc:
            result = _failed(task, denoiser, str(exc))
        result.worker = worker.address
        results.append(result)
    return results


def process_slice(
    task: SliceTask,
    job: JobSpec,
    denoiser: Denoiser,
    volume: OmeZarrVolume | None,
    images: dict[str, tuple[SliceImage, str]] | None = None,
) -> SliceResult:
    """Read, denoise and write one slice; ``images`` caches decoded inputs between slices."""
    images = {} if images is None else images
    started = time.time()
    t0 = time.perf_counter()
    for source in (task.centre, *task.neighbours):
        if source.key not in images:
            images[source.key] = _read(source, job)
    centre = images[task.centre.key][0]
    pixels = centre.pixels
    neighbour_pixels = [images[n.key][0].pixels for n in task.neighbours]
    t1 = time.perf_counter()
    if task.mode == "copy":  # an unusable slice without signal: kept as it came
        denoised = np.array(pixels, copy=True)
    else:
        denoised = denoiser.denoise(pixels, neighbour_pixels)
    t2 = time.perf_counter()
    settings: dict[str, Any] = {
        "tile": denoiser.tile, "tile_batch": denoiser.tile_batch,
        "precision": denoiser.precision,
        "normalisation": denoiser.checkpoint.normalisation.to_dict(),
        "databar": job.databar, "databar_rows": job.databar_rows,
        "inputs": len(neighbour_pixels) + 1, "reprocess": True,
        **denoiser.provenance(),
    }  # fmt: skip
    pixels_sha = hashlib.sha256(np.ascontiguousarray(denoised).tobytes()).hexdigest()
    output_sha = None
    if task.tiff is not None:
        output_sha = write_tiff(Path(task.tiff), centre, denoised, describe(task, job, denoiser))
    if volume is not None:
        volume.write_slice(task.z, denoised)
        settings["zarr"] = {"path": job.zarr, "z": task.z, "pixels_sha256": pixels_sha}
    t3 = time.perf_counter()
    return SliceResult(
        z=task.z, centre_key=task.centre.key,
        input_sha256={s.key: images[s.key][1] for s in (task.centre, *task.neighbours)},
        output_sha256=output_sha, pixels_sha256=pixels_sha, settings=settings,
        device=denoiser.device, started_at=started, finished_at=time.time(),
        read_s=t1 - t0, model_s=t2 - t1, write_s=t3 - t2,
    )  # fmt: skip


def describe(task: SliceTask, job: JobSpec, denoiser: Denoiser) -> str:
    """The output TIFF's ImageDescription (no time stamps: the same run writes the same bytes)."""
    return description(
        mode=task.mode, centre=task.centre.name, neighbours=[n.name for n in task.neighbours],
        model_label=job.model_label, model_sha256=job.checkpoint_sha256, device=denoiser.device,
        settings={"tile": denoiser.tile, "databar": job.databar}, via="; reprocess",
        unusable=task.unusable,
    )  # fmt: skip


def _read(source: SliceSource, job: JobSpec) -> tuple[SliceImage, str]:
    """A slice file (databar split off) with the file's sha256, or a page of a stack (its
    palette and photometric kept for its output) with its pixels' sha256."""
    path = Path(source.path)
    if source.page is None:
        return read_slice(path, job.databar, job.databar_rows), sha256_file(path)  # type: ignore[arg-type]
    with open_tiff(path) as tif:
        page = page_image(tif, source.page, path)
    return page, hashlib.sha256(np.ascontiguousarray(page.pixels).tobytes()).hexdigest()


def _failed(task: SliceTask, denoiser: Denoiser, why: str) -> SliceResult:
    now = time.time()
    return SliceResult(
        z=task.z, centre_key=task.centre.key, input_sha256={}, output_sha256=None,
        pixels_sha256="", settings={}, device=denoiser.device, started_at=now, finished_at=now,
        read_s=0.0, model_s=0.0, write_s=0.0, error=why,
    )  # fmt: skip
