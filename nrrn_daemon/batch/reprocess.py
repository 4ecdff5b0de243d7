"""``nrrn-daemon reprocess``: re-denoise a whole data set on Dask distributed.

The client plans (:mod:`nrrn_daemon.batch.plan`), submits and records; the workers
(:mod:`nrrn_daemon.batch.tasks`) read, denoise and write.

:func:`run_plan` starts a ``LocalCluster`` or connects to a scheduler (:func:`dask_cluster`) —
only when there is work —, registers the per-worker model cache, submits one task per batch of
consecutive slices, and records every result in SQLite as it arrives, one transaction per slice,
from this process only (the store's one writer). A worker that dies takes its running task with
it; Dask runs the task again on another worker and the client still receives one result per
task, so each slice is recorded once and its files are written whole (atomic, idempotent).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nrrn_daemon.batch.plan import REASON, Plan, plan_reprocess
from nrrn_daemon.batch.tasks import PLUGIN_NAME, ModelCache, SliceResult, SliceTask, run_batch
from nrrn_daemon.errors import NRRNError, OutputError
from nrrn_daemon.frames import unusable_label
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.imaging.voxels import UNKNOWN_VOXEL
from nrrn_daemon.states import InputRole, SliceState
from nrrn_daemon.store.store import Store

log = logging.getLogger("nrrn_daemon")

__all__ = ["Cluster", "Plan", "Summary", "dask_cluster", "plan_reprocess", "run_plan"]


@dataclass
class Summary:
    """How a run went: slices in the data set, already done, submitted, recorded, failed."""

    total: int
    skipped: int
    submitted: int = 0
    recorded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    """Wall time from the first submission to the last result (not the cluster's start)."""
    record_s: float = 0.0
    """Time the client spent writing provenance (the one writer's share of the run)."""
    workers: int = 0
    devices: set[str] = field(default_factory=set)


@dataclass
class Cluster:
    """A connected Dask client, and the torch threads per worker when we started the workers."""

    client: Any
    torch_threads: int | None


@contextmanager
def dask_cluster(
    scheduler: str | None = None, local_workers: int | None = None
) -> Iterator[Cluster]:
    """Connect to ``scheduler``, or start a ``LocalCluster`` of ``local_workers`` processes.

    Local workers run one task at a time (one thread) and torch uses the machine's cores divided
    among them. Default: one worker per CUDA GPU, or one on a CPU-only machine.

    Raises
    ------
    NRRNError
        Both given, or the scheduler cannot be reached.
    """
    from distributed import Client, LocalCluster

    if scheduler and local_workers:
        raise NRRNError("give --scheduler ADDRESS or --local-workers N, not both")
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise NRRNError(
                f"cannot connect to the Dask scheduler at {scheduler}: {exc} — check the address "
                "(tcp://HOST:8786) and that the scheduler runs"
            ) from None
        with client:
            yield Cluster(client, None)
        return
    import torch

    n = local_workers or max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)
    threads = max(1, (os.cpu_count() or 1) // n)
    with (
        LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        yield Cluster(client, threads)


def run_plan(
    plan: Plan,
    store: Store,
    connect: Callable[[], Any],
    *,
    batch: int = 1,
    on_result: Callable[[SliceResult, Summary], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Summary:
    """Run the plan's ``todo`` on the cluster ``connect()`` gives; record each result.

    ``connect`` is called only when there is work (see :func:`dask_cluster`). ``should_stop``
    is checked after each result: when it returns True the remaining tasks are cancelled and the
    summary says ``interrupted`` (a later run does the rest).

    Raises
    ------
    NRRNError
        The cluster lost a task's workers too often, or cannot be reached.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    summary = Summary(total=len(plan.tasks), skipped=len(plan.tasks) - len(plan.todo))
    if not plan.todo:
        return summary
    _prepare_outputs(plan)
    batches = _batches(plan.todo, batch)
    token = uuid.uuid4().hex[:8]
    with connect() as cluster:
        client = cluster.client
        client.register_plugin(ModelCache(cluster.torch_threads), name=PLUGIN_NAME)
        summary.workers = len(client.scheduler_info()["workers"])
        started = time.perf_counter()  # the run itself, not the cluster's start
        futures = {
            client.submit(run_batch, b, plan.job, key=f"nrrn-reprocess-{token}-z{b[0].z}"): b
            for b in batches
        }
        summary.submitted = len(plan.todo)
        pending = as_completed(list(futures))
        for future in pending:
            try:
                results = future.result()
            except KilledWorker as exc:
                raise NRRNError(
                    f"Dask gave up on slices from z={futures[future][0].z}: {exc} — the workers "
                    "running them kept dying (out of memory?); run the same command again to "
                    "resume"
                ) from None
            for task, result in zip(futures[future], results, strict=True):
                t0 = time.perf_counter()
                _record(store, plan, task, result, summary)
                summary.record_s += time.perf_counter() - t0
                if on_result:
                    on_result(result, summary)
            if should_stop and should_stop():
                rest = [f for f in futures if not f.done()]
                client.cancel(rest)
                summary.interrupted = bool(rest)
                break
    if not summary.interrupted:
        _clean_leftovers(plan)
    summary.seconds = time.perf_counter() - started
    return summary


def _batches(tasks: list[SliceTask], size: int) -> list[list[SliceTask]]:
    """Runs of at most ``size`` consecutive slices (they share neighbours, read once)."""
    batches: list[list[SliceTask]] = []
    for task in sorted(tasks, key=lambda t: t.z):
        last = batches[-1] if batches else None
        if last is not None and len(last) < size and task.z == last[-1].z + 1:
            last.append(task)
        else:
            batches.append([task])
    return batches


def _prepare_outputs(plan: Plan) -> None:
    """Create the output folder and the volume (or grow it) before any task writes."""
    if plan.output is not None:
        try:
            plan.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create output folder {plan.output}: {exc.strerror}"
            ) from None
        _clean_leftovers(plan)
    if plan.zarr is not None:
        if plan.zarr.exists():
            volume = OmeZarrVolume.open(plan.zarr)
            if volume.shape[0] < plan.depth:
                volume.resize_depth(plan.depth)
        else:
            OmeZarrVolume.create(
                plan.zarr, depth=plan.depth, slice_shape=plan.slice_shape, dtype=plan.dtype,
                voxel_size=plan.voxel_size or UNKNOWN_VOXEL,
                levels=plan.zarr_levels, name=Path(plan.dataset_name).name,
                extra={"dataset": plan.dataset_name, "model": plan.job.model_label},
            )  # fmt: skip


def _clean_leftovers(plan: Plan) -> None:
    """Remove temporary files of writers killed mid-write (TIFF ``.*.part``, Zarr ``*.partial``)."""
    leftovers = list(plan.output.glob(".*.part")) if plan.output is not None else []
    if plan.zarr is not None and plan.zarr.exists():
        leftovers += plan.zarr.rglob("*.partial")
    for path in leftovers:
        path.unlink(missing_ok=True)


def _record(
    store: Store, plan: Plan, task: SliceTask, result: SliceResult, summary: Summary
) -> None:
    """One slice's provenance: its input rows (with the sha256 the worker read), its output."""
    if result.error is not None:
        summary.failed.append((task.centre.name, result.error))
        log.error("%s failed: %s", task.centre.name, result.error)
        return
    inputs = []
    roles = (InputRole.CENTRE.value, *task.roles)
    for source, role in zip((task.centre, *task.neighbours), roles, strict=True):
        sha = result.input_sha256[source.key]
        row = plan.rows.get(source.key)
        if row is None or row.sha256 != sha or not row.unchanged(source.size, source.mtime):
            keep = row is not None and row.state != SliceState.FAILED
            store.upsert_slice(
                plan.dataset_id, path=source.key, name=source.name, index=source.index,
                scan=None, size=source.size, mtime=source.mtime, sha256=sha,
                state=row.state if keep and row is not None else SliceState.READY,
            )  # fmt: skip
            row = store.get_slice(plan.dataset_id, source.key)
            assert row is not None
            plan.rows[source.key] = row
        inputs.append((row.id, role, sha))
    store.record_output(
        dataset_id=plan.dataset_id, centre_slice_id=inputs[0][0], inputs=inputs,
        path=task.tiff or f"{plan.job.zarr}#z={task.z}",
        sha256=result.output_sha256 or result.pixels_sha256, mode=task.mode,
        model_id=plan.model_id, settings=result.settings, device=result.device, ready_at=None,
        started_at=result.started_at, finished_at=result.finished_at, read_s=result.read_s,
        model_s=result.model_s, write_s=result.write_s, reason=REASON,
    )  # fmt: skip
    if task.unusable is not None:  # written, but no neighbour nor fine-tune target
        store.set_slice_state(inputs[0][0], SliceState.UNUSABLE, unusable_label(task.unusable))
    summary.recorded += 1
    summary.devices.add(result.device)
