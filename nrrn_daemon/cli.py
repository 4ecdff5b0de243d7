"""The ``nrrn-daemon`` command line: the only place that prints or exits.

Offline commands (``train``, ``denoise``, ``evaluate``, ``metrics``) live here; the daemon's
commands (``start``, ``status``, ``provenance``, ``profiles``, ``demo``) in :mod:`cli_daemon`.
Library code raises :class:`~nrrn_daemon.errors.NRRNError`; :func:`edge` turns it into one red
line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import NRRNError

app = typer.Typer(
    name="nrrn-daemon",
    help="Denoise FIB-SEM slices as they are acquired, with an unsupervised NRRN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
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


# -- train -----------------------------------------------------------------------------------
@app.command()
@edge
def train(
    stacks: Annotated[
        list[Path],
        typer.Argument(help="Noisy stacks: multi-page TIFFs, folders of slices, or slice files."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint file to write.")],
    blocks: Annotated[int, typer.Option(min=1, max=5, help="Building units (paper: 4).")] = 4,
    features: Annotated[
        int, typer.Option(min=2, max=512, help="Feature channels (paper: 64).")
    ] = 32,
    steps: Annotated[int | None, typer.Option(min=1, help="Budget in optimiser steps.")] = None,
    minutes: Annotated[float | None, typer.Option(min=0.01, help="Budget in minutes.")] = None,
    patch: Annotated[int, typer.Option(min=16, help="Crop size of training triplets.")] = 96,
    batch: Annotated[int, typer.Option(min=1, help="Triplets per step.")] = 8,
    lr: Annotated[float, typer.Option(min=1e-7, help="Adam learning rate.")] = 1e-3,
    init: Annotated[
        Path | None, typer.Option(help="Resume / fine-tune from this checkpoint.")
    ] = None,
    device: Annotated[DeviceChoice, typer.Option(help="auto prefers CUDA.")] = DeviceChoice.auto,
    repeat_scans: Annotated[
        bool,
        typer.Option("--repeat-scans", help="Consecutive pages are repeat scans of one slice."),
    ] = False,
    scans_per_slice: Annotated[
        int, typer.Option(min=3, help="With --repeat-scans: scans per slice.")
    ] = 3,
    validation: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Fraction of slices held out (index blocks).")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    precision: Annotated[PrecisionChoice, typer.Option(help=PRECISION_HELP)] = PrecisionChoice.auto,
    compile: Annotated[
        CompileChoice, typer.Option(help=COMPILE_HELP + " auto: only for ≥ 5 min / 500 steps.")
    ] = CompileChoice.auto,
    loss: Annotated[
        LossChoice,
        typer.Option(
            help="eq3: the paper's; plain: eq. 3 without its last term. "
            "auto: plain for adjacent slices, eq3 for --repeat-scans."
        ),
    ] = LossChoice.auto,
) -> None:
    """Train (or fine-tune with --init) an NRRN on noisy stacks, unsupervised."""
    from .checkpoints import load_checkpoint, save_checkpoint
    from .nrrn import NRRNConfig
    from .stacks import read_stack
    from .training import TrainSettings
    from .training import train as run_training

    if steps is None and minutes is None:
        steps = 500
    data = [read_stack([s]) for s in stacks] if _all_multipage(stacks) else [read_stack(stacks)]
    parent = load_checkpoint(init) if init else None
    settings = TrainSettings(
        steps=steps,
        minutes=minutes,
        patch=patch,
        batch=batch,
        lr=lr,
        seed=seed,
        device=device.value,
        repeat_scans=repeat_scans,
        scans_per_slice=scans_per_slice,
        validation_fraction=validation,
        precision=precision.value,
        compile=compile.value,
        loss=loss.value,
    )
    with progress_bar() as bar:
        task = bar.add_task("training", total=steps, info="")

        def on_progress(step: int, total: int | None, loss: float, elapsed: float) -> None:
            bar.update(task, completed=step, total=total, info=f"loss {loss:.4f}")

        ckpt, report = run_training(
            data,
            settings,
            config=None if parent else NRRNConfig(blocks, features),
            init=parent,
            on_progress=on_progress,
        )
    save_checkpoint(ckpt, out)
    val = (
        f"validation loss {report.val_loss_start:.4f} → {report.val_loss_end:.4f}"
        if report.val_loss_start is not None and report.val_loss_end is not None
        else "no validation slices held out"
    )
    console.print(
        f"wrote [bold]{out}[/] ({ckpt.short_sha}): {report.steps} steps in "
        f"{report.seconds:.0f} s ({report.stopped_by}, {report.loss} loss, {report.precision}"
        f"{', compiled' if report.compiled else ''}), {val}"
    )


def _all_multipage(paths: list[Path]) -> bool:
    """True when every input is a multi-page TIFF (each is then its own stack)."""
    import tifffile

    if not all(p.is_file() for p in paths):
        return False
    try:
        return all(len(tifffile.TiffFile(p).pages) > 1 for p in paths)
    except Exception:  # noqa: BLE001 - read_stack reports unreadable files properly
        return False


# -- denoise ---------------------------------------------------------------------------------
@app.command()
@edge
def denoise(
    stacks: Annotated[
        list[Path], typer.Argument(help="A multi-page TIFF, a folder of slices, or slice files.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the denoised files.")],
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint (default: the shipped base checkpoint).")
    ] = None,
    inputs: Annotated[
        int, typer.Option(min=1, max=3, help="Slices per estimate: 3 triplet, 2 pair, 1 single.")
    ] = 3,
    tile: Annotated[int, typer.Option(min=32, help="Tile core size in pixels.")] = 512,
    tile_batch: Annotated[
        int | None,
        typer.Option(min=1, help="Tiles per forward pass (default: 4 on CUDA, 1 on CPU)."),
    ] = None,
    device: Annotated[DeviceChoice, typer.Option(help="auto prefers CUDA.")] = DeviceChoice.auto,
    databar: Annotated[
        DatabarChoice, typer.Option(help="Info strip below slice files: kept out of the model.")
    ] = DatabarChoice.none,
    databar_rows: Annotated[int, typer.Option(min=0, help="With --databar rows: its height.")] = 0,
    precision: Annotated[PrecisionChoice, typer.Option(help=PRECISION_HELP)] = PrecisionChoice.auto,
    compile: Annotated[CompileChoice, typer.Option(help=COMPILE_HELP)] = CompileChoice.auto,
) -> None:
    """Denoise stacks offline: same shape and dtype out, one file per input file."""
    from .checkpoints import load_checkpoint
    from .denoise import Denoiser
    from .offline import denoise_stack

    ckpt = load_checkpoint(model)
    denoiser = Denoiser(
        ckpt, device=device.value, tile=tile, tile_batch=tile_batch,
        precision=precision.value, compile=compile.value,
    )  # fmt: skip
    if denoiser.cpu_fallback:
        err_console.print(f"[yellow]no CUDA GPU: denoising on the CPU ({denoiser.device_name})[/]")
    groups = [[s] for s in stacks] if _all_multipage(stacks) else [stacks]
    with progress_bar() as bar:
        for group in groups:
            task = bar.add_task(group[0].name, total=None, info="")

            def tick(done: int, total: int, name: str, task: Any = task) -> None:
                bar.update(task, completed=done, total=total, info=name)

            written = denoise_stack(
                group,
                output,
                denoiser,
                inputs_per_estimate=inputs,
                on_slice=tick,
                databar=databar.value,
                databar_rows=databar_rows,
            )
            bar.update(task, info=f"→ {written[0].parent if written else output}")
    console.print(f"done: model {ckpt.short_sha} on {denoiser.device} ({denoiser.precision})")


# -- evaluate / metrics ----------------------------------------------------------------------
@app.command()
@edge
def evaluate(
    denoised: Annotated[Path, typer.Argument(help="Denoised stack (or slice).")],
    clean: Annotated[Path, typer.Argument(help="Reference stack (or slice) of the same shape.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """PSNR and SSIM of a denoised stack against a clean reference, per slice and mean."""
    from .metrics import evaluate_stacks
    from .stacks import read_stack

    a = read_stack([denoised])
    b = read_stack([clean])
    result = evaluate_stacks(_as_volume(a), _as_volume(b))
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table(title=f"{denoised.name} vs {clean.name}")
    table.add_column("slice", justify="right")
    table.add_column("PSNR (dB)", justify="right")
    table.add_column("SSIM", justify="right")
    for i, (p, s) in enumerate(zip(result["psnr"], result["ssim"], strict=True)):
        table.add_row(str(i), f"{p:.2f}", f"{s:.4f}")
    table.add_row(
        "[bold]mean", f"[bold]{result['psnr_mean']:.2f}", f"[bold]{result['ssim_mean']:.4f}"
    )
    console.print(table)


@app.command()
@edge
def metrics(
    image: Annotated[
        Path, typer.Argument(help="A slice or stack (first slice used unless --slice).")
    ],
    slice_index: Annotated[int, typer.Option("--slice", help="Slice of a stack.")] = 0,
    line: Annotated[str | None, typer.Option(help="IQR along a line 'y0,x0,y1,x1'.")] = None,
    region: Annotated[str | None, typer.Option(help="IQR in a region 'y0,y1,x0,x1'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """No-reference measures: noise estimate, and IQR of a flat line or region (paper 2.2.1)."""
    from .metrics import estimate_noise, find_flat_region, iqr_line, iqr_region
    from .stacks import read_stack

    stack = read_stack([image])
    img = stack[slice_index]
    out: dict[str, Any] = {
        "file": str(image),
        "slice": slice_index,
        "noise_sigma": estimate_noise(img),
    }
    if line:
        y0, x0, y1, x1 = _ints(line, 4, "--line")
        out["iqr_line"] = iqr_line(img, (y0, x0), (y1, x1))
    if region:
        box = _ints(region, 4, "--region")
    else:
        box = find_flat_region(img, min(64, *img.shape))
        out["flat_region"] = list(box)
    out["iqr_region"] = iqr_region(img, tuple(box))
    if as_json:
        console.print_json(json.dumps(out))
    else:
        for k, v in out.items():
            console.print(f"{k:>12}: {v:.3f}" if isinstance(v, float) else f"{k:>12}: {v}")


def _ints(text: str, n: int, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise typer.BadParameter(f"{option} takes {n} comma-separated integers, got {text!r}")
    return values


def _as_volume(stack: Any) -> np.ndarray:
    return np.stack([stack[i] for i in range(len(stack))])


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


def main() -> None:
    """Console-script entry point."""
    app()


# Registers the daemon's commands, then `finetune`, `models` and `reprocess`, on `app`.
from . import cli_daemon, cli_models, cli_reprocess  # noqa: E402,F401
