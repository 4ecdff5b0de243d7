"""The offline commands: ``train``, ``denoise``, ``evaluate``, ``metrics``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from nrrn_daemon.cli.common import (
    COMPILE_HELP,
    PRECISION_HELP,
    TILE_DEFAULT,
    TILE_HELP,
    TILE_MAX,
    TILE_MIN,
    CompileChoice,
    DatabarChoice,
    DeviceChoice,
    LossChoice,
    PrecisionChoice,
    console,
    edge,
    err_console,
    progress_bar,
)


# -- train -----------------------------------------------------------------------------------
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
            help="eq3: the paper's; plain: eq. 3 without its last term; centre: the "
            "blind-spot network scored against the centre slice itself. "
            "auto: centre for a blind-spot --init, else plain for adjacent slices, eq3 for "
            "--repeat-scans."
        ),
    ] = LossChoice.auto,
) -> None:
    """Train (or fine-tune with --init) an NRRN on noisy stacks, unsupervised."""
    from nrrn_daemon.finetune.training import TrainSettings
    from nrrn_daemon.finetune.training import train as run_training
    from nrrn_daemon.imaging.stacks import read_stack
    from nrrn_daemon.model.checkpoints import load_checkpoint, save_checkpoint
    from nrrn_daemon.model.nrrn import NRRNConfig

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
    tile: Annotated[int, typer.Option(min=TILE_MIN, max=TILE_MAX, help=TILE_HELP)] = TILE_DEFAULT,
    tile_batch: Annotated[
        int | None,
        typer.Option(min=1, help="Tiles per forward pass (default: 4 on CUDA, 1 on CPU)."),
    ] = None,
    device: Annotated[DeviceChoice, typer.Option(help="auto prefers CUDA.")] = DeviceChoice.auto,
    databar: Annotated[
        DatabarChoice,
        typer.Option(
            help="Info strip below slice files, kept out of the model and copied through. auto:"
            " where the file's metadata says the image ends (FEI ResolutionY); none: denoise"
            " every row."
        ),
    ] = DatabarChoice.auto,
    databar_rows: Annotated[int, typer.Option(min=0, help="With --databar rows: its height.")] = 0,
    precision: Annotated[PrecisionChoice, typer.Option(help=PRECISION_HELP)] = PrecisionChoice.auto,
    compile: Annotated[CompileChoice, typer.Option(help=COMPILE_HELP)] = CompileChoice.auto,
    judge_frames: Annotated[
        bool,
        typer.Option(
            "--judge-frames/--no-judge-frames",
            help="Never use a blank, saturated, cut-short or unrelated slice as a neighbour.",
        ),
    ] = True,
    intermediate: Annotated[
        Path | None,
        typer.Option(help="Also write each slice's estimate after every building unit here."),
    ] = None,
) -> None:
    """Denoise stacks offline: same shape and dtype out, one file per input file."""
    from nrrn_daemon.batch.offline import DEFAULT_FRAMES, denoise_stack
    from nrrn_daemon.model.checkpoints import load_checkpoint
    from nrrn_daemon.model.denoise import Denoiser

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
                frames=DEFAULT_FRAMES if judge_frames else None,
                on_unusable=lambda name, why: err_console.print(
                    f"[yellow]{name}: unusable: {why} — not used as a neighbour[/]"
                ),
                intermediate=intermediate,
            )
            bar.update(task, info=f"→ {written[0].parent if written else output}")
    console.print(f"done: model {ckpt.short_sha} on {denoiser.device} ({denoiser.precision})")


# -- evaluate / metrics ----------------------------------------------------------------------
@edge
def evaluate(
    denoised: Annotated[Path, typer.Argument(help="Denoised stack (or slice).")],
    clean: Annotated[Path, typer.Argument(help="Reference stack (or slice) of the same shape.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """PSNR and SSIM of a denoised stack against a clean reference, per slice and mean."""
    from nrrn_daemon.evaluation.metrics import evaluate_stacks
    from nrrn_daemon.imaging.stacks import read_stack

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
    from nrrn_daemon.evaluation.metrics import (
        estimate_noise,
        find_flat_region,
        iqr_line,
        iqr_region,
    )
    from nrrn_daemon.imaging.stacks import read_stack

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
