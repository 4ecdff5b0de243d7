"""Soak the daemon: many slices through the real loop; host memory must stay flat.

Plays a microscope writing N noisy phantom slices into a temporary watch folder, runs the daemon
(real watchdog observer, real SQLite, the given checkpoint on the CPU) until every slice has its
output, and samples the process's resident memory (VmRSS) every ``--every`` outputs. Prints a
markdown table: slices, throughput, latency, RSS at each sample, and the growth over the second
half of the run (start-up allocations excluded).

Example::

    python benchmarks/daemon_soak.py --slices 400 --size 256 --every 50
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from nrrn_daemon.daemon import Daemon
from nrrn_daemon.microscope import Microscope
from nrrn_daemon.noise import noisy_stack
from nrrn_daemon.phantom import make_phantom
from nrrn_daemon.profiles import load_profile
from nrrn_daemon.provenance import Store


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--checkpoint", default="base", help='"base" or a .pt path')
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    # A phantom of 32 slices, replayed with fresh noise: the daemon sees a long acquisition.
    clean = make_phantom((32, args.size, args.size), seed=0)
    root = Path(tempfile.mkdtemp(prefix="nrrn-soak-"))
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(root / "raw"),
            "output.folder": str(root / "out"),
            "store.database": str(root / "db.sqlite"),
            "model.checkpoint": args.checkpoint,
            "model.device": "cpu",
            "watch.observer": "native",
        },
    )
    (root / "raw").mkdir()
    samples: list[tuple[int, float, float]] = []
    done = threading.Event()
    count = {"n": 0}
    t0 = time.perf_counter()

    with Store(profile.store.database) as store:
        daemon: Daemon

        def on_event(kind: str, data: dict) -> None:
            if kind != "output":
                return
            count["n"] += 1
            if count["n"] % args.every == 0 or count["n"] == 1:
                samples.append((count["n"], time.perf_counter() - t0, rss_mib()))
            if count["n"] >= args.slices:
                done.set()
                daemon.request_stop("soak complete")

        daemon = Daemon(profile, store, on_event=on_event)
        noisy = np.concatenate(
            [noisy_stack(clean, "poisson:4", seed=s) for s in range(-(-args.slices // len(clean)))]
        )[: args.slices]
        scope = Microscope(
            root / "raw", noisy, "SEM Image - SliceImage - {:05d}.tif", interval_s=0.0, chunks=1
        )

        # The microscope writes ahead of the daemon, a few slices at a time.
        def play() -> None:
            for k in range(args.slices):
                while k - count["n"] > 8 and not done.is_set():
                    time.sleep(0.02)
                scope.write(k)

        writer = threading.Thread(target=play, name="nrrn-soak-microscope", daemon=True)
        writer.start()
        reason = daemon.work()
        report = store.status()
    wall = time.perf_counter() - t0
    ds = report["datasets"][0]
    half = [s for s in samples if s[0] >= args.slices // 2]
    growth = (half[-1][2] - half[0][2]) if len(half) >= 2 else float("nan")
    result = {
        "slices": args.slices,
        "size": args.size,
        "wall_s": wall,
        "stop": reason,
        "slices_per_s": args.slices / wall,
        "latency_s": ds["latency_s"],
        "samples": samples,
        "rss_growth_second_half_mib": growth,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "model": ds["model"],
    }
    print(f"machine: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{args.slices} slices of {args.size}² in {wall:.0f} s "
        f"({args.slices / wall:.2f} slices/s), "
        f"latency median {ds['latency_s']['median']:.2f} s, p90 {ds['latency_s']['p90']:.2f} s"
    )
    print("\n| outputs | elapsed (s) | RSS (MiB) |\n|---|---|---|")
    for n, t, r in samples:
        print(f"| {n} | {t:.0f} | {r:.0f} |")
    print(f"\nRSS growth over the second half: {growth:+.1f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
