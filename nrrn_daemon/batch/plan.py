"""Planning a reprocess: which slices, with which neighbours and model, and which are done.

:func:`plan_reprocess` lists the slices (a data set of the store, a folder of slice TIFFs, or a
multi-page stack), gives each its neighbours by slice index (triplet; pair at an edge or a gap,
as the daemon does), resolves the model (a label or sha256 prefix in the store, or a checkpoint
file) and keeps only the slices not done yet. Done means: the slice's current output was made by
this model from the same inputs (same sha256, files unchanged in size and mtime since), its TIFF
is present and complete, and its z-slice is in the volume. So re-running a finished run plans
nothing (and starts no cluster), and an interrupted one plans the rest.

Output names: a profile's ``output.naming`` where a profile applies (the data set's own, or
``--profile``); else the input's file name, and ``<stem>_<page>.tif`` for a stack's pages.
Slice positions in the volume: ``z = index − first index`` (a missing slice leaves a plane of
zeros), a stack's page number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nrrn_daemon.batch.tasks import JobSpec, SliceSource, SliceTask
from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.config.profiles import FrameSettings, ModelSettings, Profile
from nrrn_daemon.errors import InputError, NRRNError, OutputError
from nrrn_daemon.files import safe_join
from nrrn_daemon.frames import Verdict, judge_stack
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.imaging.stacks import folder_slices, read_stack
from nrrn_daemon.imaging.tiff import check_grey, open_tiff, read_slice
from nrrn_daemon.imaging.voxels import VoxelSize, voxel_size_from_tiff
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.registry import find_checkpoint, record_checkpoint
from nrrn_daemon.slices import last_number
from nrrn_daemon.states import InputRole, SliceState
from nrrn_daemon.store.store import SliceInfo, Store
from nrrn_daemon.triplets import input_role, mode_for, neighbour_indices

log = logging.getLogger("nrrn_daemon")

REASON = "reprocess"
"""The ``reason`` recorded on every output a reprocess writes (and the profile name of a data
set first seen by a reprocess without a profile)."""


@dataclass
class Plan:
    """What a reprocess run will do; ``todo`` are the tasks of the slices not done yet."""

    dataset_id: int
    dataset_name: str
    model_id: int
    job: JobSpec
    tasks: list[SliceTask]
    todo: list[SliceTask]
    slice_shape: tuple[int, int]
    dtype: np.dtype
    output: Path | None
    zarr: Path | None
    voxel_size: VoxelSize | None
    zarr_levels: int | None
    rows: dict[str, SliceInfo] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return max(t.z for t in self.tasks) + 1


# -- planning -----------------------------------------------------------------------------------


def plan_reprocess(
    target: str,
    store: Store,
    *,
    model: str | None = None,
    output: Path | None = None,
    zarr: Path | None = None,
    profile: Profile | None = None,
    device: str | None = None,
    tile: int | None = None,
    voxel_size: VoxelSize | None = None,
    zarr_levels: int | None = None,
) -> Plan:
    """Decide what a reprocess of ``target`` writes, and which slices are already done.

    Raises
    ------
    InputError
        ``target`` is no folder, stack or data set; unreadable or inconsistent slices.
    OutputError
        Neither ``output`` nor ``zarr``; ``output`` is the input folder; ``zarr`` exists and is
        not a volume these slices fit.
    CheckpointError, StoreError
        The model cannot be found or loaded.
    """
    if output is None and zarr is None:
        raise OutputError("nothing to write: pass --output DIR (TIFFs) and/or --zarr PATH")
    # Everything is checked before the first write to the store.
    source, known = _resolve_target(target, store)
    known_id = store.dataset_ids()[known["name"]] if known else None
    if profile is None and known is not None and known["profile_name"] != REASON:
        try:
            profile = load_profile(known["profile_name"])
        except NRRNError:
            log.warning("profile %r not found: naming outputs like the inputs; pass --profile",
                        known["profile_name"])  # fmt: skip
    # without a profile, vendor files whose metadata says where the image ends are cropped there
    databar = profile.image.databar if profile else "auto"
    databar_rows = profile.image.databar_rows if profile else 0
    if source.is_file() and databar != "none":
        if databar != "auto":
            log.warning("%s is a multi-page stack: its pages have no databar to crop", source)
        databar, databar_rows = "none", 0
    failed = set()
    if known_id is not None:
        failed = {r.path for r in store.slices_in_state(known_id, [SliceState.FAILED])}
    sources = _list_sources(source, failed)
    shape, dtype = _slice_shape(sources[0], databar, databar_rows)
    if output is not None and source.is_dir() and Path(output).resolve() == source:
        raise OutputError(
            f"output folder {output} is the input folder: outputs would overwrite raw slices — "
            "choose another --output folder"
        )
    naming = profile.output_name if profile else (lambda name, index: name)
    frames = profile.frames if profile else FrameSettings()
    tasks = _tasks(sources, output, naming, _judge(sources, frames, databar, databar_rows))
    volume = None
    if zarr is not None and Path(zarr).exists():
        volume = OmeZarrVolume.open(Path(zarr))
        volume.check_compatible(shape, dtype)
    elif zarr is not None and voxel_size is None:
        voxel_size = voxel_size_from_tiff(Path(sources[0].path))
    ckpt_path = find_checkpoint(store, known_id, model)
    ckpt = load_checkpoint(ckpt_path)

    name = known["name"] if known else str(source)
    dataset_id = store.ensure_dataset(
        name=name, watch_folder=str(source),
        profile_name=known["profile_name"] if known else (profile.name if profile else REASON),
    )  # fmt: skip
    model_id = record_checkpoint(store, ckpt_path, ckpt, dataset_id)
    settings = profile.model if profile else ModelSettings()  # the defaults live there, once
    job = JobSpec(
        checkpoint=str(ckpt_path), checkpoint_sha256=ckpt.content_sha256,
        model_label=store.model_label(model_id),
        device=device or settings.device, tile=tile or settings.tile,
        tile_batch=settings.tile_batch,
        databar=databar, databar_rows=databar_rows,
        zarr=str(Path(zarr).absolute()) if zarr is not None else None,
        precision=settings.precision, compile=settings.compile,
    )  # fmt: skip
    rows = {r.path: r for r in store.slices_in_state(dataset_id, list(SliceState))}
    done = store.current_outputs(dataset_id)
    todo = [t for t in tasks if not _is_done(t, rows, done, model_id, job, volume)]
    return Plan(
        dataset_id=dataset_id, dataset_name=name, model_id=model_id, job=job, tasks=tasks,
        todo=todo, slice_shape=shape, dtype=dtype,
        output=Path(output).absolute() if output is not None else None,
        zarr=Path(zarr).absolute() if zarr is not None else None, voxel_size=voxel_size,
        zarr_levels=zarr_levels, rows=rows,
    )  # fmt: skip


def _slice_shape(first: SliceSource, databar: str, rows: int) -> tuple[tuple[int, int], np.dtype]:
    """Shape (the databar cropped off) and dtype of the slices, from the first one."""
    if first.page is None:
        pixels = read_slice(Path(first.path), databar, rows).pixels  # type: ignore[arg-type]
        return (int(pixels.shape[0]), int(pixels.shape[1])), np.dtype(pixels.dtype)
    with open_tiff(Path(first.path)) as tif:
        page = tif.pages[0]
        dtype = check_grey(page, Path(first.path))
        return (int(page.shape[0]), int(page.shape[1])), np.dtype(dtype)


def _resolve_target(target: str, store: Store) -> tuple[Path, dict[str, Any] | None]:
    """The folder or stack file to read, and the store's data set for it (or ``None``)."""
    datasets = store.status()["datasets"]
    path = Path(target).expanduser()
    if path.exists():
        resolved = path.resolve()
        for ds in datasets:
            if str(resolved) in (ds["watch_folder"], ds["name"]):
                return resolved, ds
        return resolved, None
    for ds in datasets:
        if target == ds["name"]:
            folder = Path(ds["watch_folder"])
            if not folder.exists():
                raise InputError(
                    f"data set {target!r} was acquired in {folder}, which no longer exists — "
                    "pass the folder where its slices are now"
                )
            return folder.resolve(), ds
    known = ", ".join(ds["name"] for ds in datasets) or "none"
    raise InputError(
        f"{target} is not a folder, a TIFF stack or a data set in {store.path} (known: {known}) "
        "— check the path"
    )


def _list_sources(source: Path, failed: set[str]) -> list[SliceSource]:
    """The slices of a folder (by the last number in their names) or of a multi-page stack."""
    st = source.stat()
    if source.is_file():
        pages = _check_pages(source)
        width = max(4, len(str(pages - 1)))
        return [
            SliceSource(i, f"{source.stem}_{i:0{width}d}.tif", str(source), i, f"{source}#{i}",
                        st.st_size, st.st_mtime)
            for i in range(pages)
        ]  # fmt: skip
    paths = [p for p in folder_slices(source) if str(p) not in failed]
    if not paths:
        raise InputError(f"no slice of {source} can be reprocessed: every one failed")
    read_stack(paths if len(paths) > 1 else [source])  # checks every header: shape, dtype, size
    sources = []
    for p in paths:
        index = last_number(p.stem) or 0
        ps = p.stat()
        sources.append(SliceSource(index, p.name, str(p), None, str(p), ps.st_size, ps.st_mtime))
    return sources


def _check_pages(path: Path) -> int:
    """Page count of a multi-page stack whose pages all share shape and dtype (headers only)."""
    with open_tiff(path) as tif:
        pages = tif.pages
        if len(pages) < 2:
            raise InputError(
                f"{path} is a single slice: reprocess a folder of slices or a multi-page stack"
            )
        first = pages[0]
        dtype = check_grey(first, path)
        for index, page in enumerate(pages):
            if tuple(page.shape) != tuple(first.shape) or np.dtype(page.dtype) != dtype:
                raise InputError(
                    f"cannot use {path}: page {index} is {tuple(page.shape)} {page.dtype}, page 0"
                    f" is {tuple(first.shape)} {dtype} — every slice of a stack must have the"
                    " same shape and type"
                )
        return len(pages)


def _judge(
    sources: list[SliceSource], frames: FrameSettings, databar: str, rows: int
) -> dict[int, Verdict]:
    """The unusable slices by index (:func:`~nrrn_daemon.frames.judge_stack`; reads each once)."""
    if not frames.enabled:
        return {}
    by_index = {s.index: s for s in sources}

    def load(index: int) -> np.ndarray:
        source = by_index[index]
        if source.page is None:
            return read_slice(Path(source.path), databar, rows).pixels  # type: ignore[arg-type]
        with open_tiff(Path(source.path)) as tif:
            return tif.pages[source.page].asarray()

    verdicts = judge_stack(by_index, load, frames)
    return {i: v for i, v in verdicts.items() if not v.usable}


def _tasks(
    sources: list[SliceSource],
    output: Path | None,
    naming: Callable[[str, int], str],
    unusable: dict[int, Verdict] | None = None,
) -> list[SliceTask]:
    """Neighbours by index (a missing or unusable index is a gap: pair mode), z = index − first
    index. An unusable slice has no neighbours: ``copy`` without signal, else ``single``."""
    unusable = unusable or {}
    by_index = {s.index: s for s in sources if s.index not in unusable}
    base = min(s.index for s in sources)
    tasks = []
    for s in sources:
        near = [by_index[j] for j in neighbour_indices(s.index, by_index, 3, unusable)]
        mode = mode_for(len(near)).value
        bad = unusable.get(s.index)
        if bad is not None and not bad.has_signal:
            mode = "copy"
        tiff = str(safe_join(Path(output).absolute(), naming(s.name, s.index))) if output else None
        tasks.append(SliceTask(
            z=s.index - base, centre=s, neighbours=tuple(near),
            roles=tuple(input_role(s.index, n.index).value for n in near), mode=mode, tiff=tiff,
            unusable=bad.reason if bad is not None else None,
        ))  # fmt: skip
    return tasks


def _is_done(
    task: SliceTask,
    rows: dict[str, SliceInfo],
    done: dict[int, dict[str, Any]],
    model_id: int,
    job: JobSpec,
    volume: OmeZarrVolume | None,
) -> bool:
    """True when the slice's current output is this model's, from these unchanged inputs, and
    every requested output is there and complete."""
    inputs = set()
    roles = (InputRole.CENTRE.value, *task.roles)
    for source, role in zip((task.centre, *task.neighbours), roles, strict=True):
        row = rows.get(source.key)
        if row is None or row.sha256 is None or not row.unchanged(source.size, source.mtime):
            return False
        inputs.add((row.id, role, row.sha256))
    out = done.get(rows[task.centre.key].id)
    if out is None or out["model_id"] != model_id or out["mode"] != task.mode:
        return False
    if out["inputs"] != inputs:
        return False
    if task.tiff is not None and (out["path"] != task.tiff or not _complete_tiff(task.tiff)):
        return False
    if job.zarr is not None:
        recorded = out["settings"].get("zarr") or {}
        if recorded.get("path") != job.zarr or recorded.get("z") != task.z:
            return False
        return volume is not None and volume.has_slice(task.z)
    return True


def _complete_tiff(path: str) -> bool:
    try:
        with open_tiff(Path(path)):  # reads the headers only: a truncated file fails here
            return True
    except InputError:
        return False
