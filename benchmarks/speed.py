"""Throughput and memory of the Denoiser's tiled inference, against the paper's tiling.

The paper (section 2.2.3) denoises 256-px patches one at a time and cuts 20 px from each side:
216-px cores, 256-px windows, in float32. The Denoiser uses balanced cores of up to ``--tile`` px
with a halo of exactly the receptive radius (11 px for 4 BUs), ``--tile-batch`` windows per
forward pass, and (see ``nrrn_daemon/acceleration.py``) bf16 autocast where the CPU or GPU has
it, channels-last layout, torch.compile and the fused gate convolution. Each ``--settings`` row
switches these on one by one, so their contributions show side by side. All rows run the same
model (``--checkpoint``: the paper's 4 BUs × 64 channels with random weights by default; speed
does not depend on the weights) on the same synthetic uint8 triplet, alternately, ``--repeats``
times each after a warm-up (``Denoiser.warm_up``: compiles the compiled rows, whose compile time
is reported separately).

Peak memory: each ``--rss-sizes`` slice is denoised once in a fresh subprocess, which reports
its peak resident set (VmHWM) before and after denoising.

Example::

    python benchmarks/speed.py --size 1024x1024 --repeats 2 --rss-sizes "" --json runs/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nrrn_daemon.model.checkpoints import (
    BASE_CHECKPOINT,
    Checkpoint,
    Normalisation,
    load_checkpoint,
)
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.devices import cpu_bf16_features, cpu_model
from nrrn_daemon.model.nrrn import NRRN
from nrrn_daemon.model.tiling import Tile, plan_tiles

PAPER_PATCH, PAPER_CUT = 256, 20
FLAGS = ("bf16", "cl", "compile", "fused")
DEFAULT_SETTINGS = (
    "512:1,512:1:cl,512:1:bf16+cl,512:1:bf16+cl+fused,512:1:bf16+cl+compile,"
    "512:1:bf16+cl+compile+fused,512:1:cl+compile+fused,1024:1:bf16+cl+compile+fused"
)


@dataclass(frozen=True)
class Setting:
    """One row: a tiling (``tile`` = 0: the paper's 256-px patches) and the speed-ups used."""

    tile: int
    batch: int
    bf16: bool = False
    cl: bool = False
    compile: bool = False
    fused: bool = False

    @property
    def label(self) -> str:
        if self.tile == 0:
            tiling = f"paper: {PAPER_PATCH}-px patches, {PAPER_CUT} px cut, 1 per pass"
        else:
            tiling = f"tile {self.tile}, batch {self.batch}"
        return tiling

    def denoiser(self, ckpt: Checkpoint, device: str) -> Denoiser:
        den = Denoiser(
            ckpt,
            device=device,
            tile=self.tile or None,
            tile_batch=self.batch,
            precision="bf16" if self.bf16 else "float32",
            compile="on" if self.compile else "off",
            channels_last=self.cl,
        )
        den.model.fuse_gates = self.fused  # type: ignore[union-attr]
        return den


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` → ``(H, W)``."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def parse_setting(text: str) -> Setting:
    """``"TILE:BATCH[:FLAG+FLAG...]"`` → :class:`Setting`; flags from :data:`FLAGS`."""
    tile, _, rest = text.partition(":")
    batch, _, flags = rest.partition(":")
    chosen = set(filter(None, flags.split("+")))
    unknown = chosen - set(FLAGS)
    if unknown:
        raise SystemExit(f"unknown flags {sorted(unknown)} in {text!r}; use {'+'.join(FLAGS)}")
    return Setting(int(tile), int(batch or 1), **{f: f in chosen for f in FLAGS})


def checkpoint(source: str) -> tuple[Checkpoint, str]:
    """The base checkpoint when present (``auto``), a file, or random weights (``random``).

    Returns the checkpoint and a description for the report.
    """
    if source == "auto":
        source = str(BASE_CHECKPOINT) if BASE_CHECKPOINT.exists() else "random"
    if source == "random":
        torch.manual_seed(0)
        model = NRRN(blocks=4, features=64)  # the paper's size
        return Checkpoint.from_model(model, Normalisation(mode="slice")), "random weights"
    ckpt = load_checkpoint(source)
    return ckpt, f"checkpoint {Path(source).name} ({ckpt.short_sha})"


def triplet(shape: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """A synthetic uint8 triplet, made in row strips (no full-size float temporaries)."""
    rng = np.random.default_rng(seed)
    x = np.arange(shape[1])
    slices = [np.empty(shape, np.uint8) for _ in range(3)]
    for y0 in range(0, shape[0], 256):
        y = np.arange(y0, min(y0 + 256, shape[0]))[:, None]
        clean = 128 + 60 * np.sin(x / 9.0) * np.cos(y / 13.0)
        for s in slices:
            noisy = clean + rng.normal(0, 25, clean.shape)
            s[y0 : y0 + 256] = np.clip(noisy, 0, 255).astype(np.uint8)
    return slices


def plan(den: Denoiser, shape: tuple[int, int], setting: Setting) -> list[Tile]:
    """The tiles ``setting`` uses on a slice of ``shape``."""
    if setting.tile == 0:
        return plan_tiles(*shape, PAPER_PATCH - 2 * PAPER_CUT, PAPER_CUT, balanced=False)
    return plan_tiles(*shape, setting.tile, den.halo)


def work(tiles: list[Tile], shape: tuple[int, int]) -> float:
    """Pixels the network computes per output pixel (1 = no halo overhead)."""
    return sum(h * w for h, w in (t.window_shape for t in tiles)) / (shape[0] * shape[1])


def run_once(den: Denoiser, stack: list[np.ndarray], tiles: list[Tile]) -> float:
    """Seconds for one tiled denoise of ``stack`` (centre first) with ``tiles``."""
    start = time.perf_counter()
    den.denoise(stack[0], stack[1:], tiles=tiles)
    return time.perf_counter() - start


def speed(args: argparse.Namespace, ckpt: Checkpoint) -> list[dict[str, object]]:
    """Time every setting alternately; returns one row per setting."""
    shape = parse_size(args.size)
    stack = triplet(shape)
    settings = [Setting(0, 1), *map(parse_setting, args.settings.split(","))]
    dens = {s: s.denoiser(ckpt, args.device) for s in settings}
    plans = {s: plan(dens[s], shape, s) for s in settings}
    warm_up_s = {}
    for s in settings:  # warm-up: compilation (compiled rows), allocator, oneDNN kernels
        warm_up_s[s] = dens[s].warm_up()
    times: dict[Setting, list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            times[s].append(run_once(dens[s], stack, plans[s]))
    mpix = shape[0] * shape[1] / 1e6
    base = statistics.median(times[settings[0]])
    rows = []
    for s in settings:
        med = statistics.median(times[s])
        timing = dens[s].last_timing
        rows.append(
            {
                "setting": s.label,
                "tile": s.tile,
                "batch": s.batch,
                "precision": dens[s].precision,
                "channels_last": s.cl,
                "compiled": dens[s].compiled,
                "fused": s.fused,
                "warm_up_s": round(warm_up_s[s], 1),
                "tiles": int(timing["tiles"]),
                "work": round(work(plans[s], shape), 3),
                "seconds": [round(t, 3) for t in times[s]],
                "median_s": round(med, 3),
                "mpix_per_s": round(mpix / med, 4),
                "speedup_vs_paper": round(base / med, 3),
            }
        )
    return rows


def peak_memory(args: argparse.Namespace) -> list[dict[str, object]]:
    """Run each ``--rss-sizes`` slice in a fresh subprocess; returns what they report."""
    rows = []
    for size in filter(None, args.rss_sizes.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--rss-child",
            size,
            "--device",
            args.device,
            "--checkpoint",
            args.checkpoint,
            "--tile",
            str(args.tile),
            "--tile-batch",
            str(args.tile_batch),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args: argparse.Namespace) -> None:
    """Denoise one slice of ``--rss-child`` size once; print a JSON line with peak memory."""
    shape = parse_size(args.rss_child)
    ckpt, _ = checkpoint(args.checkpoint)
    den = Denoiser(ckpt, device=args.device, tile=args.tile, tile_batch=args.tile_batch)
    stack = triplet(shape)
    before = _vm_hwm_mib()
    start = time.perf_counter()
    den.denoise(stack[0], stack[1:])
    seconds = time.perf_counter() - start
    row = {
        "size": f"{shape[0]}x{shape[1]}",
        "tile": args.tile,
        "batch": args.tile_batch,
        "seconds": round(seconds, 2),
        "mpix_per_s": round(shape[0] * shape[1] / 1e6 / seconds, 4),
        "model_s": round(den.last_timing["model_s"], 2),
        "tiles": int(den.last_timing["tiles"]),
        "work": round(work(plan_tiles(*shape, args.tile, den.halo), shape), 3),
        "paper_work": round(work(plan(den, shape, Setting(0, 1)), shape), 3),
        "peak_rss_before_mib": round(before),
        "peak_rss_mib": round(_vm_hwm_mib()),
    }
    print(json.dumps(row))


def machine(device: str) -> dict[str, object]:
    """What ran the benchmark."""
    return {
        "cpu": cpu_model(),
        "cpu_bf16": list(cpu_bf16_features()),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown(report: dict[str, object]) -> str:
    """The report as a markdown page."""
    m = report["machine"]
    assert isinstance(m, dict)
    lines = [
        f"`{report['command']}`",
        "",
        f"Machine: {m['cpu']} (native bf16: {', '.join(m['cpu_bf16']) or 'none'}), "
        f"{m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, device {m['device']}" + (f" ({m['gpu']})" if m["gpu"] else ""),
        f"Model: {report['model']}; triplet {report['size']}, uint8, "
        f"{report['repeats']} alternating repeats after a warm-up",
        "work = pixels the network computes per output pixel (halo overhead).",
        "",
        "| tiling | precision | layout | compiled | fused | tiles | work | warm-up s "
        "| median s | MPix/s | × paper |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["speed"]:  # type: ignore[attr-defined]
        layout = "channels-last" if r["channels_last"] else "contiguous"
        lines.append(
            f"| {r['setting']} | {r['precision']} | {layout} | "
            f"{'yes' if r['compiled'] else 'no'} | {'yes' if r['fused'] else 'no'} | "
            f"{r['tiles']} | {r['work']} | {r['warm_up_s']} | {r['median_s']} | "
            f"{r['mpix_per_s']} | {r['speedup_vs_paper']} |"
        )
    if report["memory"]:
        lines += [
            "",
            "| slice | tiling | tiles | work (paper) | s | MPix/s | peak RSS before (MiB) "
            "| peak RSS (MiB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["memory"]:  # type: ignore[attr-defined]
            lines.append(
                f"| {r['size']} | tile {r['tile']}, batch {r['batch']} | {r['tiles']} | "
                f"{r['work']} ({r['paper_work']}) | "
                f"{r['seconds']} | {r['mpix_per_s']} | {r['peak_rss_before_mib']} | "
                f"{r['peak_rss_mib']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1024x1024", help="triplet size HxW for the speed table")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    parser.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="rows to time, TILE:BATCH[:FLAGS] comma-separated, FLAGS '+'-joined from "
        f"{', '.join(FLAGS)} (the paper's float32 tiling is always the first row)",
    )
    parser.add_argument("--tile", type=int, default=512, help="tile for the memory runs")
    parser.add_argument("--tile-batch", type=int, default=1, help="batch for the memory runs")
    parser.add_argument(
        "--rss-sizes",
        default="2048x2048",
        help="slices for peak memory, one fresh process each (add 6144x4096: minutes on 2 cores)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--checkpoint",
        default="random",
        help="'random' (4 BUs × 64 channels, the paper's size), 'auto' (the base checkpoint, "
        "4 × 32) or a path",
    )
    parser.add_argument("--json", type=Path, help="also save the report as JSON here")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return
    ckpt, description = checkpoint(args.checkpoint)
    report: dict[str, object] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(Denoiser(ckpt, device=args.device).device),
        "model": f"{ckpt.config.blocks} BUs, {ckpt.config.features} channels, {description}",
        "size": args.size,
        "repeats": args.repeats,
        "speed": speed(args, ckpt) if args.repeats > 0 else [],
        "memory": peak_memory(args),
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
