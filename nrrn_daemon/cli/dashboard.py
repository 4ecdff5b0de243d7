"""``nrrn-daemon dashboard``: the read-only web dashboard, a process of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nrrn_daemon.cli.common import DbOpt, ProfileOpt, console, edge


@edge
def dashboard(
    profile: ProfileOpt = "generic",
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: the profile's, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port (default: the profile's, 8765).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="Token browsers must present; needed for a non-loopback --host."),
    ] = None,
    db: DbOpt = None,
    output: Annotated[
        Path | None, typer.Option(help="Override the profile's output.folder.")
    ] = None,
) -> None:
    """Serve a read-only web dashboard of the run: slices, before/after, pace, quality, models."""
    from nrrn_daemon.config.loading import load_profile
    from nrrn_daemon.dashboard.app import Settings
    from nrrn_daemon.dashboard.server import check_bind, serve, url

    prof = load_profile(profile)
    settings = Settings(
        database=Path(db if db is not None else prof.store.database).expanduser(),
        output_folder=Path(output if output is not None else prof.output.folder).expanduser(),
        preview_px=prof.dashboard.preview_px,
        databar=prof.image.databar,
        databar_rows=prof.image.databar_rows,
        token=token if token is not None else prof.dashboard.token,
    )
    bind_host = host if host is not None else prof.dashboard.host
    bind_port = port if port is not None else prof.dashboard.port
    check_bind(bind_host, bind_port, settings.token)
    console.print(
        f"nrrn-daemon dashboard (read-only) on {url(bind_host, bind_port)}", highlight=False
    )
    serve(settings, bind_host, bind_port)
    console.print("dashboard stopped")
