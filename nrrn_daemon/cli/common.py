"""What every command shares: the consoles, :func:`edge` (errors to one line), option types.

Library code raises :class:`~nrrn_daemon.errors.NRRNError`; :func:`edge` turns it into one red
line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nrrn_daemon.config.profiles import ModelSettings
from nrrn_daemon.errors import NRRNError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def edge(func: F) -> F:
    """Translate expected failures into one clear line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NRRNError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class DatabarChoice(StrEnum):
    auto = "auto"
    none = "none"
    fei = "fei"
    rows = "rows"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionChoice(StrEnum):
    auto = "auto"
    float32 = "float32"
    bf16 = "bf16"


class CompileChoice(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class LossChoice(StrEnum):
    auto = "auto"
    plain = "plain"
    eq3 = "eq3"
    centre = "centre"


_TILE = ModelSettings.model_fields["tile"]
TILE_DEFAULT: int = _TILE.default
"""``model.tile``'s default for the commands that take ``--tile`` (defined once: the profile)."""
TILE_MAX: int = next(m.le for m in _TILE.metadata if hasattr(m, "le"))
TILE_MIN = 32
"""Offline commands also take tiles below a profile's minimum (64), for small test images."""
TILE_HELP = f"Tile core size in pixels ({TILE_MIN}–{TILE_MAX})."

PRECISION_HELP = "auto: bf16 where native (CUDA, CPUs with AVX512-BF16/AMX); float32 forces it."
COMPILE_HELP = "torch.compile: auto (CUDA; CPU models ≥ 32 channels), on or off."


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile", "-p", help="Profile name (see `nrrn-daemon profiles`) or path to a .toml file."
    ),
]
DbOpt = Annotated[
    Path | None,
    typer.Option("--db", help="SQLite database (default: the profile's store.database)."),
]


def database_path(profile: str, db: Path | None) -> Path:
    """The database a command reads: ``--db`` if given, else the profile's ``store.database``."""
    if db is not None:
        return db
    from nrrn_daemon.config.loading import load_profile

    return Path(load_profile(profile).store.database).expanduser()


def configure_logging(verbose: bool = False) -> None:
    """Rich log lines above the live view on a terminal; plain lines otherwise (journald adds
    its own timestamps)."""
    level = logging.DEBUG if verbose else logging.INFO
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    else:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # APScheduler narrates every job-store step at INFO; our own lines say what matters.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbose else logging.WARNING)


def daemon_alive(db: Path) -> dict[str, Any] | None:
    """The daemon run that is alive on ``db`` (its status row), or None."""
    from nrrn_daemon.store.store import Store

    if not db.is_file():
        return None
    with Store(db, readonly=True) as store:
        run = store.status()["run"]
    return run if run is not None and run["state"] == "alive" else None
