"""The GPU path in one command: every CUDA number of BENCHMARKS §2, §3, §5 and §8, in < 8 minutes.

What it measures, in this order (the rest of the grid runs while ``--budget-s`` lasts, and rows
left out are listed as such, never guessed):

1. the device (name, driver, CUDA, memory), printed first, and the ceilings: the datasheet's
   dense bf16 peak (a table of known GPUs, or ``--peak-tflops``) and an 8192³ bf16 matrix
   product measured here;
2. the 6144×4096 triplet with the paper's 4 BU × 64 channels (random weights: speed does not
   depend on them) and with the shipped base checkpoint (4 × 32): seconds per slice split into
   host read (one slice TIFF; the daemon reads each slice once), transfer (host staging and the
   copy to the GPU, then the copy back and the paste: ``Denoiser.last_timing``), model (forward
   passes, synchronised) and write (the TIFF, atomically); in fp32 (TF32 convolutions, torch's
   default), bf16 and fp16 (the path of a GPU without bf16), eager and compiled, at several
   tile sizes and tile batches; peak GPU memory; the FLOPs of the network's convolutions
   (counted with ``torch.utils.flop_counter`` on a small window, times the pixels of the
   plan's windows) and the fraction of the dense bf16 peak they reach;
3. the daemon's overhead over the model alone on 50 slices of 6144×4096 (``daemon_overhead.py``:
   the real loop, a real watch folder, SQLite, outputs written);
4. fine-tune steps per second (the daemon's fine-tune settings: crops of 96 px, batch 8, from
   the base checkpoint);
5. live latency while a fine-tune shares the GPU (``finetune_latency.py``'s protocol: a
   microscope writing slices, a fine-tune requested after the idle ones).

Targets (issue 16): the triplet (4 BU × 64) in < 0.5 s on an H100-class GPU at ≥ 40 % of the
dense bf16 peak, daemon overhead < 5 %, live latency during a fine-tune ≤ 1.5× idle.

``--dry-run`` runs every part on the CPU with small sizes in well under a minute (a test in the
default suite does, so the script cannot rot); its numbers mean nothing.

Example::

    python benchmarks/gpu.py --out runs/gpu            # on a GPU machine (scripts/gpu_check.sh)
    python benchmarks/gpu.py --dry-run --out /tmp/gpu  # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks, as modules

import daemon_overhead  # noqa: E402
from speed import triplet, work  # noqa: E402

from nrrn_daemon.config.loading import load_profile  # noqa: E402
from nrrn_daemon.daemon.loop import Daemon  # noqa: E402
from nrrn_daemon.finetune.training import TrainSettings, train  # noqa: E402
from nrrn_daemon.imaging.tiff import read_slice  # noqa: E402
from nrrn_daemon.imaging.tiffwrite import write_slice_atomic  # noqa: E402
from nrrn_daemon.model.checkpoints import (  # noqa: E402
    BASE_CHECKPOINT,
    Checkpoint,
    Normalisation,
    load_checkpoint,
    save_checkpoint,
)
from nrrn_daemon.model.denoise import Denoiser  # noqa: E402
from nrrn_daemon.model.devices import cpu_model  # noqa: E402
from nrrn_daemon.model.nrrn import NRRN, NRRNConfig  # noqa: E402
from nrrn_daemon.model.tiling import plan_tiles  # noqa: E402
from nrrn_daemon.sim.microscope import Microscope, encode_tiff  # noqa: E402
from nrrn_daemon.store.store import Store  # noqa: E402

DENSE_BF16_TFLOPS = (
    # (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s from the vendor's datasheet)
    # Leads, not readings: the script also measures a bf16 matrix product on the card.
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
H100_CLASS_TFLOPS = 700.0
"""A card with at least this dense bf16 peak is judged against the H100 targets."""

TARGET_S, TARGET_PEAK, TARGET_OVERHEAD, TARGET_LATENCY = 0.5, 0.40, 0.05, 1.5


@dataclass(frozen=True)
class Row:
    """One setting of the full-size slice table."""

    model: str  # "paper" (4 × 64, random weights) or "base" (the shipped checkpoint)
    precision: str  # "float32", "bf16" or "fp16"
    compiled: bool
    tile: int
    batch: int

    @property
    def label(self) -> str:
        how = "compiled" if self.compiled else "eager"
        return f"{self.model} {self.precision} {how} tile {self.tile}×{self.batch}"


@dataclass(frozen=True)
class Sizes:
    """What a run measures: the full GPU sizes, or the dry run's small ones."""

    device: str
    slice: tuple[int, int]
    repeats: int
    headline: tuple[Row, ...]
    grid: tuple[Row, ...]
    overhead_slices: int
    overhead_size: tuple[int, int]
    finetune_steps: int
    latency_size: int
    latency_idle: int
    latency_busy: int
    latency_interval_s: float
    finetune_minutes: float
    tiny_models: bool = False
    """Dry run: 1-BU stand-ins for the paper's and the base's shapes (same code, tiny cost)."""


def gpu_sizes(device: str) -> Sizes:
    headline = tuple(Row(m, "bf16", True, 512, 4) for m in ("paper", "base"))
    grid = [
        Row(m, p, c, 512, 4)
        for m in ("paper", "base")
        for p, c in (
            ("fp16", True),
            ("float32", True),
            ("bf16", False),
            ("fp16", False),
            ("float32", False),
        )
    ]
    grid += [
        Row("paper", "bf16", True, t, b)
        for t, b in ((1024, 4), (2048, 1), (1024, 1), (256, 16), (2048, 2))
    ]
    grid += [Row("base", "bf16", True, t, b) for t, b in ((1024, 4), (2048, 1))]
    return Sizes(
        device, (6144, 4096), 3, headline, tuple(grid), 50, (6144, 4096), 60, 2048, 8, 8, 1.5, 1.0
    )


def dry_sizes() -> Sizes:
    headline = tuple(Row(m, "float32", False, 32, 2) for m in ("paper", "base"))
    return Sizes(
        "cpu",
        (48, 40),
        1,
        headline,
        (Row("base", "float32", False, 48, 1),),
        10,
        (48, 40),
        3,
        48,
        2,
        2,
        0.3,
        0.5,
        tiny_models=True,
    )


# -- the device ----------------------------------------------------------------------------------
def machine(device: str) -> dict[str, Any]:
    """What ran the benchmark: the GPU's name, driver, memory; CPU, torch, CUDA, cuDNN."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            visible_gpus=torch.cuda.device_count(),
            driver=_nvidia_smi("driver_version"),
        )
    else:
        info.update(gpu=None, driver=None)
    return info


def _nvidia_smi(field: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def datasheet_peak(name: str | None, override: float | None) -> float | None:
    """Dense bf16 TFLOP/s: ``--peak-tflops``, else the datasheet table, else None (unknown)."""
    if override:
        return override
    for key, tflops in DENSE_BF16_TFLOPS:
        if name and key in name:
            return tflops
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_tflops(device: str, n: int) -> float:
    """A measured ceiling: an n³ bf16 matrix product (float32 on the CPU), mean of 10 after 3."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def conv_flops_per_pixel(config: NRRNConfig, neighbours: int = 2) -> float:
    """FLOPs of the network's convolutions per window pixel (a multiply-add is 2), counted.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on a 64×64 window (meta tensors): every
    convolution is 3×3 with padding 1, so its cost is proportional to the window's pixels.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = NRRN.from_config(config).eval().to("meta")  # shapes only: nothing is computed
    x = torch.zeros(1, 1, 64, 64, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, *([x] * neighbours))
    counts = counter.get_flop_counts().get("Global", {})
    conv = sum(v for op, v in counts.items() if "convolution" in str(op))
    return conv / (64 * 64)


# -- the full-size slice table --------------------------------------------------------------------
@contextlib.contextmanager
def precision_for(precision: str, device: str) -> Iterator[str]:
    """The Denoiser ``precision`` that gives ``precision``; fp16 is the path of a GPU without
    bf16, taken by answering "no bf16" while the Denoiser resolves its device."""
    if precision != "fp16":
        yield precision
        return
    if not device.startswith("cuda"):
        raise ValueError("fp16 autocast is a CUDA path")
    real = torch.cuda.is_bf16_supported
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: False  # type: ignore[assignment]
    try:
        yield "auto"
    finally:
        torch.cuda.is_bf16_supported = real  # type: ignore[assignment]


def paper_checkpoint() -> Checkpoint:
    """The paper's 4 BU × 64 channels, random weights (speed does not depend on them)."""
    return tiny_checkpoint(4, 64)


def tiny_checkpoint(blocks: int, features: int) -> Checkpoint:
    torch.manual_seed(0)
    return Checkpoint.from_model(NRRN(blocks, features), Normalisation(mode="slice"))


def measure_row(
    row: Row, ckpt: Checkpoint, paths: list[Path], out: Path, sizes: Sizes, peak: float | None
) -> dict[str, Any]:
    """Time one setting on the staged triplet: read, transfer, model, write; memory; FLOPs."""
    device = sizes.device
    with precision_for(row.precision, device) as asked:
        den = Denoiser(
            ckpt,
            device=device,
            tile=row.tile,
            tile_batch=row.batch,
            precision=asked,
            compile="on" if row.compiled else "off",
        )
    warm_up_s = den.warm_up()
    images = [read_slice(p) for p in paths]
    stack = [images[1].pixels, images[0].pixels, images[2].pixels]  # centre first
    den.denoise(stack[0], stack[1:])  # untimed: the allocator, cuDNN's algorithm choice
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(sizes.repeats):
        t0 = time.perf_counter()
        read = [read_slice(p) for p in paths]
        t1 = time.perf_counter()
        result = den.denoise(read[1].pixels, [read[0].pixels, read[2].pixels])
        t2 = time.perf_counter()
        write_slice_atomic(out / "out.tif", read[1], result, "nrrn-daemon benchmarks/gpu.py")
        t3 = time.perf_counter()
        timing = den.last_timing
        runs.append(
            {
                "read_s": (t1 - t0) / 3,
                "transfer_s": timing["total_s"] - timing["model_s"],
                "model_s": timing["model_s"],
                "write_s": t3 - t2,
                "denoise_s": t2 - t1,
            }
        )
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    plan = plan_tiles(*sizes.slice, den.tile or max(sizes.slice), den.halo)
    flops = conv_flops_per_pixel(ckpt.config) * work(plan, sizes.slice) * np.prod(sizes.slice)
    tflops = flops / med["model_s"] / 1e12
    row_out: dict[str, Any] = {
        **asdict(row),
        "label": row.label,
        "precision_used": den.precision,
        "compiled_used": den.compiled,
        "warm_up_s": round(warm_up_s, 1),
        "tiles": int(den.last_timing["tiles"]),
        "tile_used": int(den.last_timing["tile"]),
        "batch_used": int(den.last_timing["tile_batch"]),
        "oom_retries": int(den.last_timing["oom_retries"]),
        "work": round(work(plan, sizes.slice), 3),
        "tflop_per_slice": round(flops / 1e12, 2),
        **{k: round(v, 4) for k, v in med.items()},
        "slice_s": round(med["read_s"] + med["denoise_s"] + med["write_s"], 4),
        "model_tflops": round(tflops, 1),
        "fraction_of_peak": round(tflops / peak, 3) if peak else None,
        "peak_gpu_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.startswith("cuda")
            else None
        ),
        "runs": runs,
    }
    del den
    release(device)
    return row_out


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def stage_triplet(folder: Path, shape: tuple[int, int]) -> list[Path]:
    """The synthetic triplet of ``speed.py`` as three slice TIFFs (z−1, z, z+1)."""
    folder.mkdir(parents=True, exist_ok=True)
    centre, prev, nxt = triplet(shape)
    paths = []
    for k, image in enumerate((prev, centre, nxt)):
        path = folder / f"slice_{k}.tif"
        path.write_bytes(encode_tiff(image))
        paths.append(path)
    return paths


# -- the daemon, fine-tuning, live latency -----------------------------------------------------
def daemon_overhead_row(sizes: Sizes, root: Path) -> dict[str, Any]:
    """``daemon_overhead.py`` on this device: the overlapped daemon against the model alone
    (the mean of one run just before and one just after), base shape (4 × 32), compiled."""
    n, shape = sizes.overhead_slices, sizes.overhead_size
    compile_ = "auto" if sizes.device.startswith("cuda") else "off"
    args = SimpleNamespace(tile=512, ahead=4, device=sizes.device, compile=compile_)
    staging = root / "staging"
    staging.mkdir(parents=True)
    spec = "1x4" if sizes.tiny_models else "4x32"
    ckpt = daemon_overhead.make_checkpoint(spec, root)
    pixels = daemon_overhead.make_slices(n, shape, staging)
    model = f"nrrn:{spec}"
    alone_den = daemon_overhead.build_denoiser(model, ckpt, args.tile, sizes.device, compile_)
    alone_run = partial(daemon_overhead.model_alone, alone_den, pixels, n)
    alone = [daemon_overhead.in_thread(alone_run)["steady_s"]]
    run = daemon_overhead.run_daemon(True, model, ckpt, staging, root / "run", n, args)  # type: ignore[arg-type]
    alone.append(daemon_overhead.in_thread(alone_run)["steady_s"])
    alone_den = alone_run = None
    release(sizes.device)
    alone_s = statistics.mean(alone)
    return {
        "slices": n,
        "size": f"{shape[0]}x{shape[1]}",
        "alone_s": round(alone_s, 4),
        "alone_around_s": [round(float(a), 4) for a in alone],
        "daemon_s": round(run["steady_s"], 4),
        "overhead": round((run["steady_s"] - alone_s) / alone_s, 4),
        "outputs": run["outputs"],
        "read_s": round(run["read_s"], 4),
        "write_s": round(run["write_s"], 4),
        "model_s": round(run["model_s"], 4),
        "stop": run["stop"],
    }


def synthetic_stack(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` noisy slices (σ 25) of the smooth pattern of ``speed.triplet``."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:size, :size]
    clean = 128 + 60 * np.sin(x / 9.0) * np.cos(y / 13.0)
    return np.stack(
        [np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8) for _ in range(n)]
    )


def finetune_rows(
    sizes: Sizes, base: Checkpoint, compiles: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Steps per second of the daemon's fine-tune (crops 96 px, batch 8) from the base."""
    stack = synthetic_stack(16, 48 if sizes.tiny_models else 256)
    rows = []
    for compile_ in compiles:
        at: list[float] = []
        settings = TrainSettings(
            steps=sizes.finetune_steps,
            patch=32 if sizes.tiny_models else 96,
            batch=2 if sizes.tiny_models else 8,
            device=sizes.device,
            compile=compile_,
            normalisation="slice",
            validation_fraction=0.2,
        )
        t0 = time.perf_counter()
        _, report = train(
            [stack],
            settings,
            init=base,
            on_progress=lambda step, total, loss, s, at=at: at.append(s),
        )
        first = min(5, len(at) - 2)  # the first steps pay compilation and allocation
        rows.append(
            {
                "compile": compile_,
                "compiled": report.compiled,
                "precision": report.precision,
                "steps": report.steps,
                "wall_s": round(time.perf_counter() - t0, 1),
                "steps_per_s": round((len(at) - 1 - first) / (at[-1] - at[first]), 2),
            }
        )
        release(sizes.device)
    return rows


def live_latency(sizes: Sizes, root: Path, checkpoint: str) -> dict[str, Any]:
    """``finetune_latency.py`` on this device: idle latency, then with a fine-tune running."""
    n = sizes.latency_idle + sizes.latency_busy + 2
    noisy = synthetic_stack(n, sizes.latency_size, seed=100)
    (root / "raw").mkdir(parents=True)
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(root / "raw"),
            "output.folder": str(root / "out"),
            "store.database": str(root / "db.sqlite"),
            "model.checkpoint": checkpoint,
            "model.device": sizes.device,
            "watch.observer": "native",
            "finetune.enabled": True,
            "finetune.cron": "0 3 1 1 *",
            "finetune.minutes": sizes.finetune_minutes,
            "finetune.early_after_slices": 0,
        },
    )
    idle: list[float] = []
    busy: list[float] = []
    state = {"requested": False, "ended": ""}
    with Store(profile.store.database) as store:
        daemon: Daemon

        def on_event(kind: str, data: dict) -> None:
            if kind == "output":
                (busy if daemon.finetuning.running else idle).append(data["latency_s"])
                if len(idle) >= sizes.latency_idle and not state["requested"]:
                    state["requested"] = True
                    daemon.finetuning.request("benchmark")
                if len(busy) >= sizes.latency_busy:
                    daemon.request_stop("benchmark complete")
            if kind == "finetune" and data["state"] != "started":
                state["ended"] = data["state"]
                daemon.request_stop(f"fine-tune ended ({data['state']})")

        daemon = Daemon(profile, store, on_event=on_event)
        scope = Microscope(
            root / "raw",
            noisy,
            "SEM Image - SliceImage - {:03d}.tif",
            interval_s=sizes.latency_interval_s,
            chunks=1,
        )
        scope.start()
        # Never wait forever (a fine-tune that does not start, a slice lost): stop and say so.
        limit_s = 3 * n * sizes.latency_interval_s + 120
        watchdog = threading.Timer(limit_s, daemon.request_stop, (f"no result in {limit_s} s",))
        watchdog.daemon = True
        watchdog.start()
        try:
            reason = daemon.work()
        finally:
            watchdog.cancel()
            scope.stop()
    ratio = statistics.median(busy) / statistics.median(idle) if busy and idle else None
    return {
        "size": sizes.latency_size,
        "interval_s": sizes.latency_interval_s,
        "stop": reason,
        "finetune_ended": state["ended"] or None,
        "idle_median_s": round(statistics.median(idle), 3) if idle else None,
        "busy_median_s": round(statistics.median(busy), 3) if busy else None,
        "idle": [round(x, 3) for x in idle],
        "busy": [round(x, 3) for x in busy],
        "ratio": round(ratio, 3) if ratio is not None else None,
    }


# -- the run -------------------------------------------------------------------------------------
class Budget:
    """Seconds left of ``--budget-s``; a part is started only if its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def attempt(report: dict[str, Any], key: str, what: str, fn: Any) -> Any:
    """Run one part; a failure is recorded with its reason and the run goes on."""
    print(f"[gpu.py] {what} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
        line = (str(exc).strip().splitlines() or [""])[0][:300]
        report["failures"].append(
            {"part": key, "what": what, "error": f"{type(exc).__name__}: {line}"}
        )
        print(f"[gpu.py]   FAILED: {type(exc).__name__}: {line}", flush=True)
        result = None
    else:
        print(f"[gpu.py]   done in {time.perf_counter() - t0:.1f} s", flush=True)
    save(report, partial=True)
    return result


def save(report: dict[str, Any], partial: bool = False) -> str:
    """Write gpu.json and gpu.md into ``report["out"]`` (after every part: a run stopped by a
    time limit keeps what it measured); returns the markdown."""
    report["wall_s"] = round(time.perf_counter() - report["started"], 1)
    report["complete"] = not partial
    report["targets"] = judge(report)
    out = Path(report["out"])
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu.md").write_text(text)
    return text


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    if args.dry_run:
        sizes = dry_sizes()
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                f"no CUDA device: torch {torch.__version__} "
                f"({'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}) "
                "— run on a GPU machine (scripts/gpu_check.sh), or pass --dry-run"
            )
        sizes = gpu_sizes(args.device)
    budget = Budget(args.budget_s)
    info = machine(sizes.device)
    print(
        f"[gpu.py] device: {info.get('gpu') or info['cpu']}; driver {info['driver']}; "
        f"torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']})",
        flush=True,
    )
    peak = datasheet_peak(info.get("gpu"), args.peak_tflops)
    report: dict[str, Any] = {
        "out": str(args.out),
        "started": start,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "machine": info,
        "datasheet_bf16_tflops": peak,
        "budget_s": args.budget_s,
        "slice": f"{sizes.slice[0]}x{sizes.slice[1]}",
        "rows": [],
        "not_run": [],
        "failures": [],
    }
    report["matmul_tflops"] = attempt(
        report,
        "peak",
        "measured ceiling: bf16 matrix product",
        lambda: round(matmul_tflops(sizes.device, 256 if args.dry_run else 8192), 1),
    )
    if sizes.tiny_models:
        checkpoints = {"paper": tiny_checkpoint(1, 8), "base": tiny_checkpoint(1, 4)}
    else:
        checkpoints = {"paper": paper_checkpoint(), "base": load_checkpoint(BASE_CHECKPOINT)}
    report["models"] = {
        k: {
            "blocks": c.config.blocks,
            "features": c.config.features,
            "conv_flop_per_pixel": round(conv_flops_per_pixel(c.config)),
        }
        for k, c in checkpoints.items()
    }
    with tempfile.TemporaryDirectory(prefix="nrrn-gpu-bench-") as tmp:
        root = Path(tmp)
        paths = stage_triplet(root / "triplet", sizes.slice)
        served = "dataset"  # the base checkpoint, then what the fine-tune promotes
        if sizes.tiny_models:
            served = str(save_checkpoint(checkpoints["base"], root / "tiny-base.pt"))

        def slice_row(row: Row) -> None:
            result = attempt(
                report,
                "rows",
                row.label,
                lambda: measure_row(row, checkpoints[row.model], paths, root, sizes, peak),
            )
            if result is not None:
                report["rows"].append(result)

        for row in sizes.headline:
            slice_row(row)
        report["daemon_overhead"] = attempt(
            report,
            "daemon_overhead",
            "daemon overhead",
            lambda: daemon_overhead_row(sizes, root / "overhead"),
        )
        report["finetune"] = attempt(
            report,
            "finetune",
            "fine-tune steps/s",
            lambda: finetune_rows(sizes, checkpoints["base"], ("off",)),
        )
        report["live_latency"] = attempt(
            report,
            "live_latency",
            "live latency during a fine-tune",
            lambda: live_latency(sizes, root / "latency", served),
        )
        for row in sizes.grid:
            last = report["rows"][-1] if report["rows"] else None
            estimate = 20.0 if last is None else 4 * (last["slice_s"] + 1)
            estimate += 60.0 if row.compiled else 0.0
            if budget.fits(estimate):
                slice_row(row)
            else:
                report["not_run"].append(f"{row.label} (time budget)")
        if not args.dry_run and budget.fits(150):
            compiled = attempt(
                report,
                "finetune",
                "fine-tune steps/s, compiled",
                lambda: finetune_rows(sizes, checkpoints["base"], ("on",)),
            )
            report["finetune"] = (report["finetune"] or []) + (compiled or [])
        elif not args.dry_run:
            report["not_run"].append("fine-tune steps/s, compiled (time budget)")
    return report


def judge(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and verdict (``None``: not judged, and why)."""
    peak = report["datasheet_bf16_tflops"]
    h100_class = bool(peak and peak >= H100_CLASS_TFLOPS) and not report["dry_run"]
    rows = [r for r in report["rows"] if r["model"] == "paper"]
    best = min(rows, key=lambda r: r["denoise_s"], default=None)
    reduced = [r for r in rows if r["precision_used"] in ("bf16", "fp16")]
    densest = max(reduced, key=lambda r: r["fraction_of_peak"] or 0.0, default=None)
    targets = []
    why = None if h100_class else "not an H100-class GPU: reported, not judged"
    if report["dry_run"]:
        why = "dry run on the CPU: nothing is judged"
    if best is not None:
        targets.append(
            {
                "target": "4 BU × 64 triplet < 0.5 s (denoise, H100 class)",
                "value": best["denoise_s"],
                "setting": best["label"],
                "met": best["denoise_s"] < TARGET_S if why is None else None,
                "why": why,
            }
        )
    if densest is not None:
        frac = densest["fraction_of_peak"]
        targets.append(
            {
                "target": "≥ 40 % of dense bf16 peak (model)",
                "value": frac,
                "setting": densest["label"],
                "met": (frac >= TARGET_PEAK if frac is not None else None) if why is None else None,
                "why": why or (None if frac is not None else "peak unknown: pass --peak-tflops"),
            }
        )
    overhead = report.get("daemon_overhead")
    if overhead:
        targets.append(
            {
                "target": "daemon overhead < 5 %",
                "value": overhead["overhead"],
                "met": overhead["overhead"] < TARGET_OVERHEAD if not report["dry_run"] else None,
                "why": "dry run on the CPU: nothing is judged" if report["dry_run"] else None,
            }
        )
    latency = report.get("live_latency")
    if latency and latency["ratio"] is not None:
        targets.append(
            {
                "target": "live latency during a fine-tune ≤ 1.5× idle",
                "value": latency["ratio"],
                "met": latency["ratio"] <= TARGET_LATENCY if not report["dry_run"] else None,
                "why": "dry run on the CPU: nothing is judged" if report["dry_run"] else None,
            }
        )
    return targets


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = (
        (
            f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB, capability {m.get('capability')}, "
            f"{m.get('visible_gpus')} visible), driver {m['driver']}"
        )
        if m["gpu"]
        else "no GPU"
    )
    lines = [
        f"`{report['command']}`"
        + (" — **dry run on the CPU: the numbers mean nothing**" if report["dry_run"] else ""),
        "",
        f"Machine: {gpu}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}, CUDA {m['cuda']}, "
        f"cuDNN {m['cudnn']} (TF32 convolutions: {m['tf32_convolutions']}); wall "
        f"{report['wall_s']} s.",
        f"Ceilings: datasheet dense bf16 {report['datasheet_bf16_tflops'] or 'unknown'} TFLOP/s; "
        f"measured matrix product {report.get('matmul_tflops')} TFLOP/s.",
        "Models: "
        + "; ".join(
            f"{k} = {v['blocks']} BU × {v['features']} ch, "
            f"{v['conv_flop_per_pixel'] / 1e6:.2f} MFLOP/px (convolutions, "
            "triplet)"
            for k, v in report.get("models", {}).items()
        ),
        "",
        f"Triplet {report['slice']} uint8, median of the timed runs; s per slice = read + "
        "denoise (transfer + model) + write, one after the other (the daemon overlaps them).",
        "",
        "| setting | tiles | work | warm-up s | read s | transfer s | model s | write s "
        "| s/slice | TFLOP | TFLOP/s | of peak | GPU GiB | OOM retries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        label = r["label"] + (
            "" if r["compiled_used"] == r["compiled"] else " (fell back to eager)"
        )
        frac = f"{100 * r['fraction_of_peak']:.0f} %" if r["fraction_of_peak"] else "—"
        lines.append(
            f"| {label} | {r['tiles']} | {r['work']} | {r['warm_up_s']} | {r['read_s']:.3f} | "
            f"{r['transfer_s']:.3f} | {r['model_s']:.3f} | {r['write_s']:.3f} | "
            f"{r['slice_s']:.3f} | {r['tflop_per_slice']} | {r['model_tflops']} | {frac} | "
            f"{r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '—'} | "
            f"{r['oom_retries']} |"
        )
    o = report.get("daemon_overhead")
    if o:
        lines += [
            "",
            f"Daemon overhead ({o['slices']} slices of {o['size']}, base shape, overlapped "
            f"daemon): model alone {o['alone_s']} s/slice (before/after "
            f"{o['alone_around_s']}), daemon {o['daemon_s']} s/slice: "
            f"**{100 * o['overhead']:+.1f} %** (read {o['read_s']} s, write "
            f"{o['write_s']} s per slice).",
        ]
    for f in report.get("finetune") or []:
        lines.append(
            f"\nFine-tune (base, crops 96, batch 8, {f['precision']}, "
            f"{'compiled' if f['compiled'] else 'eager'}): **{f['steps_per_s']} "
            f"steps/s** ({f['steps']} steps, {f['wall_s']} s with set-up)."
        )
    la = report.get("live_latency")
    if la:
        lines.append(
            f"\nLive latency ({la['size']}² slices every {la['interval_s']} s): idle "
            f"median {la['idle_median_s']} s, during the fine-tune "
            f"{la['busy_median_s']} s: ratio **{la['ratio']}** (stop: {la['stop']})."
        )
    lines += ["", "| target | value | setting | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: f"not judged ({t.get('why')})"}[t["met"]]
        lines.append(f"| {t['target']} | {t['value']} | {t.get('setting', '')} | {met} |")
    if not report.get("complete"):
        lines += ["", "**Partial: written after each part; the run had not ended yet.**"]
    if report["not_run"]:
        lines += ["", "Not run: " + "; ".join(report["not_run"]) + "."]
    if report["failures"]:
        lines += [
            "",
            "Failures: "
            + "; ".join(f"{f['what']}: {f['error']}" for f in report["failures"])
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/gpu"),
        help="folder for gpu.json and gpu.md (default runs/gpu)",
    )
    parser.add_argument("--device", default="cuda:0", help="the GPU to measure (cuda:N)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for the whole run; the grid stops starting rows after",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="this card's dense bf16 peak, if the built-in table lacks it",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="everything on the CPU at small sizes (checks the script, < 1 min)",
    )
    args = parser.parse_args(argv)
    report = run(args)
    text = save(report)
    print(text)
    print(f"[gpu.py] wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}", flush=True)
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        print(f"[gpu.py] threads still running at exit: {alive}", flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
