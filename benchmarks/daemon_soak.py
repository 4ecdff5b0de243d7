"""Soak the daemon: many slices through the real loop; host memory must stay flat.

Plays a microscope: slice files appear in a temporary watch folder a few ahead of the daemon's
outputs (hard links to a few distinct slices written once into a staging folder, so that a long
run of big slices costs no disk and this process no encoding). Runs the daemon (native watchdog
observer, real SQLite, the overlapped pipeline) until every slice has its output, deletes each
output once it is recorded (``--keep-outputs`` keeps them), and samples the process's resident
memory (VmRSS) every ``--every`` outputs. Prints a markdown table: slices, throughput, latency,
RSS at each sample, the growth over the second half of the run (start-up allocations excluded),
and what the pipeline held at most (decoded slices kept, units holding inputs, outputs waiting
for the writer) and how often it read a slice file.

Data: up to 1 Mpx per slice, a phantom of 32 slices with Poisson noise (peak 4); larger, random
uint8 slices. Models: ``base`` (the shipped checkpoint), a ``.pt`` path, ``nrrn:BxF`` (random
weights), or ``gpu:MS`` (the GPU stand-in of ``benchmarks/daemon_overhead.py``).

Examples::

    python benchmarks/daemon_soak.py --slices 1000 --size 128 --every 100
    python benchmarks/daemon_soak.py --slices 1000 --size 6144x4096 --model gpu:150 --every 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from daemon_overhead import build_denoiser, make_checkpoint, rss_mib

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.model.devices import cpu_model
from nrrn_daemon.sim.microscope import encode_tiff
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.sim.phantom import make_phantom
from nrrn_daemon.store.store import Store

NAME = "SEM Image - SliceImage - {:05d}.tif"  # the demo profile's naming


def stage(folder: Path, shape: tuple[int, int], distinct: int) -> list[Path]:
    """Write ``distinct`` slices into ``folder``: a noisy phantom when small, else random."""
    if shape[0] * shape[1] <= 1 << 20:
        slices = noisy_stack(make_phantom((distinct, *shape), seed=0), "poisson:4", seed=1)
    else:
        rng = np.random.default_rng(0)
        slices = [rng.integers(30, 220, shape, dtype=np.uint8) for _ in range(distinct)]
    paths = []
    for k, image in enumerate(slices):
        paths.append(folder / f"base{k:03d}.tif")
        paths[-1].write_bytes(encode_tiff(image))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=1000)
    ap.add_argument("--size", default="128", help="N (N×N) or HxW")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--model", default="base", help='"base", a .pt path, "nrrn:BxF", "gpu:MS"')
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--ahead", type=int, default=8, help="slice files ahead of the outputs")
    ap.add_argument("--distinct", type=int, default=32, help="distinct slices replayed")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    h, w = (int(x) for x in (args.size.split("x") if "x" in args.size else [args.size] * 2))

    root = Path(tempfile.mkdtemp(prefix="nrrn-soak-"))
    (root / "raw").mkdir()
    (root / "staging").mkdir()
    staged = stage(root / "staging", (h, w), args.distinct)
    stand_in = args.model.startswith(("nrrn:", "gpu:"))
    if stand_in:
        spec = args.model.split(":", 1)[1] if args.model.startswith("nrrn:") else "1x4"
        checkpoint = str(make_checkpoint(spec, root))
    else:
        checkpoint = args.model
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(root / "raw"),
            "output.folder": str(root / "out"),
            "store.database": str(root / "db.sqlite"),
            "model.checkpoint": checkpoint,
            "model.device": "cpu",
            "model.tile": args.tile,
            "watch.observer": "native",
            "watch.settle_s": 0.1,
        },
    )
    samples: list[tuple[int, float, float]] = []
    cache_peak = {"n": 0}
    done = threading.Event()
    count = {"n": 0}
    t0 = time.perf_counter()

    with Store(profile.store.database) as store:
        daemon: Daemon

        def on_event(kind: str, data: dict) -> None:
            if kind != "output":
                return
            count["n"] += 1
            cache_peak["n"] = max(cache_peak["n"], len(daemon.cache))
            if not args.keep_outputs:
                (root / "out" / data["name"]).unlink(missing_ok=True)
            if count["n"] % args.every == 0 or count["n"] == 1:
                samples.append((count["n"], time.perf_counter() - t0, rss_mib()))
            if count["n"] >= args.slices:
                done.set()
                daemon.request_stop("soak complete")

        daemon = Daemon(profile, store, on_event=on_event)
        if stand_in:
            daemon.serving.denoiser = build_denoiser(args.model, Path(checkpoint), args.tile)

        def play() -> None:  # the microscope writes ahead of the daemon, a few slices at a time
            for k in range(args.slices):
                while k - count["n"] >= args.ahead and not done.is_set():
                    time.sleep(0.005)
                if done.is_set():
                    return
                (root / "raw" / NAME.format(k)).hardlink_to(staged[k % len(staged)])

        feeder = threading.Thread(target=play, name="bench-soak-microscope", daemon=True)
        feeder.start()
        reason = daemon.work()
        feeder.join(10)
        report = store.status()
        pipeline = {
            "slice_reads": daemon.cache.reads,
            "cache_hits": daemon.cache.hits,
            "peak_slices_kept": cache_peak["n"],
            "peak_units_with_inputs": daemon.pipeline.peak_inputs,
            "peak_outputs_held": daemon.pipeline.peak_outputs,
        }
    wall = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    ds = report["datasets"][0]
    half = [s for s in samples if s[0] >= args.slices // 2]
    growth = (half[-1][2] - half[0][2]) if len(half) >= 2 else float("nan")
    result = {
        "slices": args.slices,
        "size": [h, w],
        "model": args.model,
        "wall_s": wall,
        "stop": reason,
        "slices_per_s": args.slices / wall,
        "latency_s": ds["latency_s"],
        "samples": samples,
        "rss_growth_second_half_mib": growth,
        "pipeline": pipeline,
        "cpu": cpu_model(),
        "torch": torch.__version__,
    }
    print(f"machine: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{args.slices} slices of {h}×{w}, model {args.model}, in {wall:.0f} s "
        f"({args.slices / wall:.2f} slices/s), latency median {ds['latency_s']['median']:.2f} s, "
        f"p90 {ds['latency_s']['p90']:.2f} s; stop: {reason}"
    )
    print("\n| outputs | elapsed (s) | RSS (MiB) |\n|---|---|---|")
    for n, t, r in samples:
        print(f"| {n} | {t:.0f} | {r:.0f} |")
    print(f"\nRSS growth over the second half: {growth:+.1f} MiB")
    print(
        f"pipeline: {pipeline['slice_reads']} slice reads for {args.slices} slices "
        f"({pipeline['cache_hits']} served from memory); at most {pipeline['peak_slices_kept']} "
        f"decoded slices kept, {pipeline['peak_units_with_inputs']} units holding inputs, "
        f"{pipeline['peak_outputs_held']} outputs held"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
