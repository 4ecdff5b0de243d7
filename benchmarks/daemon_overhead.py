"""Daemon overhead: time per slice of the whole daemon against the model alone.

The model alone is ``Denoiser.denoise`` on the same triplets in a loop (edges as pairs, as the
daemon does them). The daemon is the real loop: a real watch folder with the native observer, the
slice files arriving a few ahead of the outputs (hard links from a staging folder, so the
"microscope" costs this process nothing), the real SQLite store, outputs written to a real folder.
Each is run with the overlapped pipeline (``Daemon(overlap=True)``, the default) and with the
synchronous design kept for comparison (``overlap=False``), side by side in one run.

overhead = (daemon time per slice − model time per slice) / model time per slice

Time per slice is measured in the steady state (from the 10 % to the 90 % output, so that
start-up, the first triplet's wait and the last edge's ``neighbour_wait_s`` are left out); the
end-to-end time (first file to last output) is printed too.

Models (``--model``):

``nrrn:BxF``
    A real NRRN with random weights (B building units × F channels) on this machine's CPU. On a
    CPU the network is so much slower than the host's I/O that any design's overhead is small.
``gpu:MS``
    A GPU stand-in for the case the pipeline exists for (issue 6: on a GPU the host's work per
    slice is about the model's): the host-side part of a CUDA denoise done for real (the
    normalisation statistics, a copy of each input to pinned staging memory, the result copied
    back), the GPU's share as MS milliseconds per slice during which the host thread waits
    with the GIL released, as it does in ``torch.cuda.synchronize``. The output is the input.
    It measures the daemon's host overhead in the GPU regime; it is not a GPU measurement.

Example::

    OMP_NUM_THREADS=2 python benchmarks/daemon_overhead.py --slices 100 --size 6144x4096 \\
        --model gpu:150
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.errors import Abandoned
from nrrn_daemon.model.checkpoints import (
    Checkpoint,
    Normalisation,
    load_checkpoint,
    save_checkpoint,
)
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.devices import cpu_model
from nrrn_daemon.model.nrrn import NRRN
from nrrn_daemon.sim.microscope import encode_tiff
from nrrn_daemon.store.store import Store

NAME = "slice_{:05d}.tif"


class GpuStandIn(Denoiser):
    """The host's side of a CUDA denoise done for real; the GPU's share waited out (see above)."""

    def __init__(self, checkpoint: Checkpoint, gpu_s: float, passes: int = 4) -> None:
        super().__init__(checkpoint, device="cpu", tile=None, compile="off")
        self.gpu_s = gpu_s
        self.passes = passes
        self.precision = "bf16 (stand-in)"

    def warm_up(self, dtype: type = np.uint8) -> float:
        return 0.0

    def denoise(
        self,
        centre: np.ndarray,
        neighbours: Sequence[np.ndarray] = (),
        *,
        tiles: object = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        start = time.perf_counter()
        self.checkpoint.normalisation.stats_for(centre)
        staged = [np.array(image, copy=True) for image in (centre, *neighbours)]  # to the GPU
        gpu_start = time.perf_counter()
        for p in range(1, self.passes + 1):  # one wait per forward pass; no drift across them
            if should_stop is not None and should_stop():
                raise Abandoned("denoising given up: the daemon is stopping")
            # The GPU computes; the host thread waits with the GIL released.
            time.sleep(max(0.0, gpu_start + p * self.gpu_s / self.passes - time.perf_counter()))
        out = np.empty_like(centre)
        out[...] = staged[0]  # back from the GPU, pasted into the output
        total = time.perf_counter() - start
        self.last_timing = {"normalise_s": 0.0, "model_s": total, "total_s": total}
        return out


def make_checkpoint(spec: str, folder: Path) -> Path:
    blocks, features = (int(x) for x in spec.split("x"))
    torch.manual_seed(0)
    model = NRRN(blocks=blocks, features=features)
    ckpt = Checkpoint.from_model(model, Normalisation("slice", 0.0, 1.0))
    return save_checkpoint(ckpt, folder / f"nrrn-{spec}.pt")


def build_denoiser(
    model: str, ckpt: Path, tile: int, device: str = "cpu", compile: str = "off"
) -> Denoiser:
    """The model of a run; a real NRRN on ``device`` is warmed up (compiled) before timing."""
    kind, _, arg = model.partition(":")
    if kind == "gpu":
        return GpuStandIn(load_checkpoint(ckpt), float(arg) / 1000)
    denoiser = Denoiser(load_checkpoint(ckpt), device=device, tile=tile, compile=compile)
    denoiser.warm_up()
    return denoiser


def make_slices(n: int, shape: tuple[int, int], staging: Path) -> Callable[[int], np.ndarray]:
    """Write n distinct noisy slices into ``staging``; return slice k's pixels (regenerated)."""
    rng = np.random.default_rng(0)
    bases = [rng.integers(30, 220, shape, dtype=np.uint8) for _ in range(8)]

    def pixels(k: int) -> np.ndarray:
        image = bases[k % len(bases)].copy()
        image[0, :8] = np.frombuffer(f"{k:08d}".encode(), np.uint8)  # distinct content per slice
        return image

    for k in range(n):
        (staging / NAME.format(k)).write_bytes(encode_tiff(pixels(k)))
    return pixels


def in_thread(target: Callable[[], object]) -> object:
    """Run ``target`` in a fresh thread and return its result.

    Every run calls the model from a thread that is not the main one, as the overlapped daemon
    does: on this loaded 2-core machine torch's OpenMP team of the main thread was measured 2-4×
    slower than one started from another thread, which would otherwise favour one side.
    """
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(target()), name="bench-run")
    thread.start()
    thread.join()
    return result[0]


def model_alone(denoiser: Denoiser, pixels: Callable[[int], np.ndarray], n: int) -> dict:
    """Denoise the same units the daemon does, inputs already in memory; time the calls only."""
    times = []
    for k in range(n):
        centre = pixels(k)
        neighbours = [pixels(j) for j in (k - 1, k + 1) if 0 <= j < n]
        t0 = time.perf_counter()
        denoiser.denoise(centre, neighbours)
        times.append(time.perf_counter() - t0)
    return {"per_slice_s": sum(times) / n, "steady_s": _steady(np.cumsum(times), n)}


def _steady(done_at: Sequence[float], n: int) -> float:
    lo, hi = n // 10, n - 1 - n // 10
    return (done_at[hi] - done_at[lo]) / (hi - lo)


def run_daemon(
    overlap: bool,
    model: str,
    ckpt: Path,
    staging: Path,
    root: Path,
    n: int,
    args: argparse.Namespace,
) -> dict:
    """The daemon's loop on ``n`` slices arriving ``args.ahead`` ahead of its outputs."""
    raw = root / "raw"
    raw.mkdir(parents=True)
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(raw),
            "watch.glob": "slice_*.tif",
            "watch.index_regex": r"slice_(?P<index>\d+)\.tif$",
            "watch.observer": "native",
            "watch.settle_s": 0.0,
            "watch.rescan_interval_s": 600.0,
            "grouping.neighbour_wait_s": 0.5,
            "output.folder": str(root / "out"),
            "store.database": str(root / "db.sqlite"),
            "model.checkpoint": str(ckpt),
            "model.device": args.device,
            "model.tile": args.tile,
            "model.compile": args.compile,
        },
    )
    done_at: list[float] = []
    finished = threading.Event()
    with Store(profile.store.database) as store:
        daemon: Daemon

        rss: dict[int, float] = {}

        def on_event(kind: str, data: dict) -> None:
            if kind == "output":
                done_at.append(time.perf_counter())
                if len(done_at) in (n // 10, n // 2, n):
                    rss[len(done_at)] = rss_mib()
                if len(done_at) >= n:
                    finished.set()
                    daemon.request_stop("benchmark complete")

        daemon = Daemon(profile, store, on_event=on_event, overlap=overlap)
        daemon.serving.denoiser = build_denoiser(model, ckpt, args.tile, args.device, args.compile)
        started: list[float] = []

        def microscope() -> None:
            for k in range(n):
                while k - len(done_at) >= args.ahead and not finished.is_set():
                    time.sleep(0.002)
                if not started:
                    started.append(time.perf_counter())
                os.link(staging / NAME.format(k), raw / NAME.format(k))

        feeder = threading.Thread(target=microscope, name="bench-microscope", daemon=True)
        feeder.start()
        reason = in_thread(daemon.work)
        feeder.join(10)
    con = sqlite3.connect(f"file:{profile.store.database}?mode=ro", uri=True)
    rows = con.execute("SELECT read_s, model_s, write_s FROM outputs").fetchall()
    con.close()
    read_s, model_s, write_s = (statistics.mean(col) for col in zip(*rows, strict=True))
    return {
        "overlap": overlap,
        "stop": reason,
        "outputs": len(done_at),
        "steady_s": _steady(done_at, n),
        "end_to_end_s": (done_at[-1] - started[0]) / n,
        "model_s": model_s,
        "read_s": read_s,
        "write_s": write_s,
        "slice_reads": daemon.cache.reads if overlap else None,
        "peak_outputs": daemon.pipeline.peak_outputs,
        "rss_mib": rss,
    }


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", default="2048x2048", help="HxW of each uint8 slice")
    ap.add_argument("--model", default="gpu:150", help='"gpu:MS" (stand-in) or "nrrn:BxF"')
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="device of an nrrn:BxF model (cpu, cuda...)")
    ap.add_argument("--compile", default="off", choices=("auto", "on", "off"))
    ap.add_argument("--ahead", type=int, default=4, help="files ahead of the outputs")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    n = args.slices
    root = Path(tempfile.mkdtemp(prefix="nrrn-overhead-"))
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        staging = root / "staging"
        staging.mkdir()
        spec = args.model.split(":", 1)[1] if args.model.startswith("nrrn:") else "1x4"
        ckpt = make_checkpoint(spec, root)
        pixels = make_slices(n, (h, w), staging)
        # alone, synchronous, alone, overlapped, alone, ...: each daemon run is compared with the
        # mean of the model-alone runs just before and just after it (the machine drifts).
        alone_denoiser = build_denoiser(args.model, ckpt, args.tile, args.device, args.compile)
        alone = partial(model_alone, alone_denoiser, pixels, n)
        results: dict[str, list[dict]] = {"synchronous": [], "overlapped": []}
        before = in_thread(alone)["steady_s"]
        for r in range(args.rounds):
            for overlap in (False, True):
                key = "overlapped" if overlap else "synchronous"
                out = run_daemon(overlap, args.model, ckpt, staging, root / f"{key}{r}", n, args)
                shutil.rmtree(root / f"{key}{r}")
                after = in_thread(alone)["steady_s"]
                out["alone_s"] = (before + after) / 2
                out["alone_around_s"] = (before, after)
                results[key].append(out)
                before = after
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {n} slices of {h}×{w} uint8, model {args.model}, "
        f"{args.rounds} round(s); load average before: {load_before}"
    )
    print(
        "\n| round | daemon | model alone s/slice (before / after) | daemon s/slice | overhead |"
        " model slower | model idle | s/slice end to end | read_s | write_s | slice reads |"
        " outputs held | RSS MiB (10 % → 100 %) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, object] = {}
    for r in range(args.rounds):
        for key in ("synchronous", "overlapped"):
            x = results[key][r]
            alone_s = x["alone_s"]
            x["overhead"] = (x["steady_s"] - alone_s) / alone_s
            rss = x["rss_mib"]
            around = " / ".join(f"{a:.3f}" for a in x["alone_around_s"])
            print(
                f"| {r + 1} | {key} | {around} | {x['steady_s']:.3f} | "
                f"**{100 * x['overhead']:+.1f} %** | "
                f"{100 * (x['model_s'] - alone_s) / alone_s:+.1f} % | "
                f"{100 * (x['steady_s'] - x['model_s']) / alone_s:+.1f} % | "
                f"{x['end_to_end_s']:.3f} | {x['read_s']:.3f} | {x['write_s']:.3f} | "
                f"{x['slice_reads'] if x['slice_reads'] is not None else '—'} | "
                f"{x['peak_outputs']} | {rss.get(n // 10, 0):.0f} → {rss.get(n, 0):.0f} |"
            )
    for key in ("synchronous", "overlapped"):
        summary[key] = statistics.median(x["overhead"] for x in results[key])
        print(f"\nmedian overhead, {key}: {100 * summary[key]:+.1f} %", end="")
    print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": vars(args) | {"json": str(args.json)}, "results": results}
        args.json.write_text(json.dumps(payload | {"summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
