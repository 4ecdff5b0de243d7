"""The daemon's commands: ``start``, ``status``, ``provenance``, ``profiles``, ``demo``.

Every command that reads or writes a data set's state takes the same ``--profile`` and ``--db``
options; ``status`` and ``provenance`` open the database read-only, so they work while the
daemon runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nrrn_daemon.cli.common import (
    DbOpt,
    ProfileOpt,
    configure_logging,
    console,
    database_path,
    edge,
    err_console,
)


# -- start -----------------------------------------------------------------------------------
@edge
def start(
    profile: ProfileOpt,
    watch: Annotated[Path | None, typer.Option(help="Override the profile's watch.folder.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Override the profile's output.folder.")
    ] = None,
    db: DbOpt = None,
    burst: Annotated[
        bool, typer.Option("--burst", help="Process what is in the folder, then exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug log lines.")] = False,
) -> None:
    """Run the daemon in the foreground: watch, denoise, record (Ctrl-C / SIGTERM stops it)."""
    from nrrn_daemon.config.loading import load_profile
    from nrrn_daemon.daemon.channels import make_daemon
    from nrrn_daemon.store.store import Store

    overrides: dict[str, Any] = {}
    if watch is not None:
        overrides["watch.folder"] = str(watch)
    if output is not None:
        overrides["output.folder"] = str(output)
    if db is not None:
        overrides["store.database"] = str(db)
    prof = load_profile(profile, overrides=overrides)
    configure_logging(verbose)
    with Store(Path(prof.store.database).expanduser()) as store:
        daemon = make_daemon(prof, store)
        daemon.install_signal_handlers()
        if console.is_terminal and not burst:
            from nrrn_daemon.cli.views import live_view

            with live_view(daemon, console):
                reason = daemon.work(burst=burst)
        else:
            reason = daemon.work(burst=burst)
    console.print(f"nrrn-daemon stopped: {reason}")


# -- status ----------------------------------------------------------------------------------
@edge
def status(
    profile: ProfileOpt = "generic",
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """What the daemon is doing, read from its database (read-only; works while it runs)."""
    from nrrn_daemon.store.store import Store

    with Store(database_path(profile, db), readonly=True) as store:
        report = store.status()
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    from nrrn_daemon.cli.views import render_status

    render_status(report, console)


# -- provenance ------------------------------------------------------------------------------
@edge
def provenance(
    target: Annotated[str, typer.Argument(help="An output file, an input slice, or a file name.")],
    profile: ProfileOpt = "generic",
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """How an output was made (inputs, model, settings, device, timings); how to re-run it."""
    from nrrn_daemon.store.store import Store

    with Store(database_path(profile, db), readonly=True) as store:
        report = store.provenance(target)
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    from nrrn_daemon.cli.views import render_provenance

    render_provenance(report, console)


# -- profiles --------------------------------------------------------------------------------
@edge
def profiles(
    validate: Annotated[
        str | None, typer.Option(help="Validate one profile (name or path) and show it.")
    ] = None,
) -> None:
    """List the profiles found on the search path and whether each is valid."""
    from nrrn_daemon.config.loading import list_profiles, load_profile, profile_search_path

    if validate:
        prof = load_profile(validate)
        console.print(f"[green]valid[/]: {validate}")
        console.print_json(prof.model_dump_json())
        return
    table = Table(title="profiles")
    table.add_column("name")
    table.add_column("status")
    table.add_column("file")
    bad = 0
    for entry in list_profiles():
        if entry.error:
            bad += 1
            table.add_row(entry.name, f"[red]invalid[/]: {entry.error}", str(entry.path))
        else:
            table.add_row(entry.name, "[green]valid", str(entry.path))
    console.print(table)
    console.print("search path: " + ", ".join(str(p) for p in profile_search_path()))
    if bad:
        raise typer.Exit(1)


# -- demo ------------------------------------------------------------------------------------
@edge
def demo(
    slices: Annotated[int, typer.Option(min=3, help="Slices the microscope writes.")] = 16,
    size: Annotated[int, typer.Option(min=64, help="Slice size in pixels (square).")] = 256,
    interval: Annotated[float, typer.Option(min=0.0, help="Seconds between slices.")] = 1.0,
    noise: Annotated[
        str, typer.Option(help="Noise protocol: poisson:PEAK or gaussian:SIGMA.")
    ] = "poisson:4",
    volume: Annotated[
        Path | None,
        typer.Option(help="Use this clean volume (multi-page TIFF) instead of the phantom."),
    ] = None,
    keep: Annotated[
        Path | None,
        typer.Option(help="Keep watch/output/database in this folder (default: a temporary one)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the phantom and the noise.")] = 0,
    with_dashboard: Annotated[
        bool,
        typer.Option("--dashboard", help="Also run the web dashboard and print its URL."),
    ] = False,
    dashboard_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of --dashboard (on 127.0.0.1).")
    ] = 8765,
) -> None:
    """Play a microscope into a temporary folder and run the daemon on it, live, with a summary."""
    from nrrn_daemon.cli.demo import run_demo

    configure_logging(False)
    started = time.time()
    summary = run_demo(
        slices=slices,
        size=size,
        interval=interval,
        noise=noise,
        volume=volume,
        keep=keep,
        seed=seed,
        console=console,
        dashboard_port=dashboard_port if with_dashboard else None,
    )
    from nrrn_daemon.cli.views import render_demo_summary

    render_demo_summary(summary, console, time.time() - started)
    if summary["denoised"] < summary["slices"]:
        err_console.print("[red]not every slice was denoised[/]")
        raise typer.Exit(1)
