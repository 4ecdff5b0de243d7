"""The ``reprocess`` command: re-denoise a whole data set on Dask distributed (see
:mod:`nrrn_daemon.batch.reprocess`), with a progress bar over the run.

This process is the database's one writer for the run, so the command refuses while a daemon is
alive on the same database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nrrn_daemon.cli.common import (
    TILE_HELP,
    TILE_MAX,
    TILE_MIN,
    DbOpt,
    DeviceChoice,
    configure_logging,
    console,
    daemon_alive,
    database_path,
    edge,
    err_console,
    progress_bar,
)
from nrrn_daemon.errors import NRRNError


@edge
def reprocess(
    target: Annotated[
        str,
        typer.Argument(
            metavar="DATASET_OR_STACK",
            help="A data set of the database (name or folder), a folder of slices, or a stack.",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Model label or sha256 prefix in the database, or a checkpoint file "
            "(default: the data set's current model, else the base checkpoint)."
        ),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Address of a running Dask scheduler (tcp://HOST:8786).")
    ] = None,
    local_workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Start a local cluster of N worker processes (default: 1 per GPU)."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder for one TIFF per slice.")
    ] = None,
    zarr: Annotated[
        Path | None, typer.Option(help="OME-Zarr volume to write (or complete).")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="Profile for naming, databar, tile and device."),
    ] = None,
    db: DbOpt = None,
    device: Annotated[
        DeviceChoice | None, typer.Option(help="Worker device (default: the profile's, or auto).")
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option(min=TILE_MIN, max=TILE_MAX, help=f"{TILE_HELP} Default: the profile's."),
    ] = None,
    batch: Annotated[
        int, typer.Option(min=1, max=64, help="Consecutive slices per Dask task.")
    ] = 1,
    voxel_size: Annotated[
        str | None,
        typer.Option(help="Z,Y,X voxel size in nm for the volume (default: from the TIFFs)."),
    ] = None,
    zarr_levels: Annotated[
        int | None, typer.Option(min=1, max=10, help="Pyramid levels (default: automatic).")
    ] = None,
) -> None:
    """Re-denoise a whole data set on Dask workers: TIFFs and/or an OME-Zarr volume, resumable."""
    from nrrn_daemon.batch.reprocess import Summary, dask_cluster, plan_reprocess, run_plan
    from nrrn_daemon.batch.tasks import SliceResult
    from nrrn_daemon.config.loading import load_profile
    from nrrn_daemon.imaging.voxels import parse_voxel_size
    from nrrn_daemon.store.store import Store

    if scheduler and local_workers:
        raise NRRNError("give --scheduler ADDRESS or --local-workers N, not both")
    configure_logging(False)
    voxel = parse_voxel_size(voxel_size) if voxel_size else None
    prof = load_profile(profile) if profile else None
    db_path = database_path(profile or "generic", db).expanduser().absolute()
    run = daemon_alive(db_path)
    if run is not None:
        raise NRRNError(
            f"a daemon is running on {db_path} (pid {run['pid']} on {run['host']}): it is the "
            "database's one writer — stop it, or reprocess into another --db"
        )
    with Store(db_path) as store:
        plan = plan_reprocess(
            target, store, model=model, output=output, zarr=zarr, profile=prof,
            device=device.value if device else None, tile=tile, voxel_size=voxel,
            zarr_levels=zarr_levels,
        )  # fmt: skip
        where = " and ".join(str(p) for p in (plan.output, plan.zarr) if p is not None)
        if not plan.todo:
            console.print(
                f"nothing to do: all {len(plan.tasks)} slices of {plan.dataset_name} are done "
                f"with model {plan.job.model_label} ({where})"
            )
            return
        console.print(
            f"{plan.dataset_name}: {len(plan.todo)} of {len(plan.tasks)} slices to denoise with "
            f"model {plan.job.model_label} → {where}"
        )
        with progress_bar() as bar:
            task = bar.add_task("reprocess", total=len(plan.todo), info="")

            def tick(result: SliceResult, summary: Summary) -> None:
                bar.update(
                    task, completed=summary.recorded + len(summary.failed),
                    info=f"z={result.z} {result.device} {summary.workers} workers",
                )  # fmt: skip

            summary = run_plan(
                plan, store, lambda: dask_cluster(scheduler, local_workers), batch=batch,
                on_result=tick,
            )  # fmt: skip
    rate = summary.recorded / summary.seconds if summary.seconds else 0.0
    console.print(
        f"done: {summary.recorded} slices denoised ({rate:.2f}/s on {summary.workers} workers, "
        f"{', '.join(sorted(summary.devices)) or 'no device'}), {summary.skipped} already done"
    )
    if summary.failed:
        for name, why in summary.failed[:10]:
            err_console.print(f"[red]{name}[/]: {why}", highlight=False)
        err_console.print(
            f"[bold red]error:[/] {len(summary.failed)} slices failed — fix them and run the "
            "same command again (done slices are skipped)"
        )
        raise typer.Exit(1)
