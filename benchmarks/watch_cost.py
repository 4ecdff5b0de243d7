"""Watching cost on a 10,000-file folder: CPU of one core and detection latency, per observer.

Fills a folder with ``--files`` small TIFF slices (on disk by default; ``--dir`` picks another
place, e.g. ``/dev/shm`` for tmpfs), then, one after the other, runs a real
:class:`~nrrn_daemon.watch.watcher.Watcher` for each observer in its own subprocess, so that CPU
accounting is not shared. Each child polls the watcher like the daemon loop does (every 0.1 s,
the daemon's ``IDLE_WAIT_S``), with the files already known (``mark_known``, as the daemon does
for slices in its store), the default reconciliation scan every 60 s and ``settle_s = 1``.

After a warm-up, the child's CPU time (``time.process_time``: all its threads, watchdog's
included) is measured over ``--seconds``; the window holds one reconciliation scan. Meanwhile
this process writes ``--slices`` new slices at random moments, each complete before it appears
(written under a ``.part`` name, then ``os.replace``-d into place). Detection latency is the time
from ``os.replace`` to the child's ``poll()`` reporting the file, minus ``settle_s``: what is
left is how long the watcher took to notice the file (plus the 0.1 s polling granularity).

Example::

    python benchmarks/watch_cost.py --files 10000 --seconds 60 --slices 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nrrn_daemon.model.devices import cpu_model
from nrrn_daemon.sim.microscope import encode_tiff
from nrrn_daemon.watch.watcher import Watcher

GLOB = "SEM Image - SliceImage - *.tif"
LOOP_WAIT_S = 0.1  # the daemon loop's IDLE_WAIT_S: how often it polls the watcher
SETTLE_S = 1.0
RESCAN_S = 60.0  # the profiles' default reconciliation interval
CONFIGS = ["native", "polling:1", "polling:5", "listing:2", "listing:1"]


def slice_name(index: int) -> str:
    return f"SEM Image - SliceImage - {index:05d}.tif"


def slice_bytes(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    return encode_tiff(image)


# -- the child: one watcher, measured --------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    kind, _, interval = args.config.partition(":")
    folder = Path(args.folder)
    watcher = Watcher(
        folder,
        GLOB,
        observer=kind,  # type: ignore[arg-type]
        poll_interval_s=float(interval or 2.0),
        settle_s=SETTLE_S,
        rescan_interval_s=RESCAN_S,
    )
    scans = 0
    real_scan = watcher._scan

    def counting_scan(now: float | None = None) -> None:
        nonlocal scans
        scans += 1
        real_scan(now)

    watcher._scan = counting_scan  # type: ignore[method-assign]  # counts reconciliations
    cpu0 = time.process_time()
    for entry in os.scandir(folder):
        watcher.mark_known(entry.path)
    watcher.start()
    startup_cpu = time.process_time() - cpu0
    scans = 0
    reported: dict[str, float] = {}
    t_start = time.monotonic() + args.warmup
    t_end = t_start + args.seconds
    print(json.dumps({"window_start": t_start}), flush=True)
    cpu_start = None
    try:
        while True:
            now = time.monotonic()
            if cpu_start is None and now >= t_start:
                cpu_start, wall_start, scans_start = time.process_time(), now, scans
            if now >= t_end:
                break
            for path in watcher.poll(now).complete:
                reported[path.name] = time.monotonic()
            time.sleep(LOOP_WAIT_S)
        cpu = time.process_time() - cpu_start
        wall = time.monotonic() - wall_start
    finally:
        watcher.stop()
    result = {
        "cpu_s": cpu,
        "wall_s": wall,
        "startup_cpu_s": startup_cpu,
        "reconciliations": scans - scans_start,
        "reported": reported,
    }
    print(json.dumps(result), flush=True)


# -- the parent: the folder, the writer, the table -------------------------------------------


def run_one(config: str, folder: Path, args: argparse.Namespace, first_new: int) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--folder", str(folder)]
    cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    window_start = json.loads(proc.stdout.readline())["window_start"]
    load_before = os.getloadavg()[0]
    # New slices at random moments, leaving time at the end for the slowest observer to see them.
    tail = 5.0 + SETTLE_S + 3.0
    rng = random.Random(first_new)
    offsets = sorted(rng.uniform(1.0, args.seconds - tail) for _ in range(args.slices))
    written: dict[str, float] = {}
    for k, offset in enumerate(offsets):
        name = slice_name(first_new + k)
        part = folder / ("." + name + ".part")
        part.write_bytes(slice_bytes(first_new + k))
        time.sleep(max(0.0, window_start + offset - time.monotonic()))
        os.replace(part, folder / name)
        written[name] = time.monotonic()
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{config}: the child failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    for name in written:
        (folder / name).unlink()  # every run starts with the same folder
    latencies = [
        result["reported"][name] - t - SETTLE_S
        for name, t in written.items()
        if name in result["reported"]
    ]
    return {
        "config": config,
        "cpu_pct": 100.0 * result["cpu_s"] / result["wall_s"],
        "startup_cpu_s": result["startup_cpu_s"],
        "reconciliations": result["reconciliations"],
        "seen": len(latencies),
        "written": len(written),
        "median_s": statistics.median(latencies) if latencies else float("nan"),
        "max_s": max(latencies) if latencies else float("nan"),
        "load": (load_before, os.getloadavg()[0]),
    }


def per_operation_ms(folder: Path, repeat: int = 20) -> dict[str, float]:
    """CPU milliseconds of each observer's per-interval work on the folder, and of a rescan."""
    from watchdog.utils.dirsnapshot import DirectorySnapshot

    from nrrn_daemon.watch.listing import FolderListing

    lister = FolderListing(folder, GLOB, recursive=False, poll_interval_s=0.0)
    lister.rebuild()
    lister.take(0.0)
    watcher = Watcher(folder, GLOB, observer="listing", decode_check=lambda p: (True, ""))
    for entry in os.scandir(folder):
        watcher.mark_known(entry.path)
    operations = {
        "listing (names, diff)": lambda k: lister.take(float(k + 1)),
        "watchdog polling snapshot (stat every file)": lambda k: DirectorySnapshot(str(folder)),
        "reconciliation scan (stat every file)": lambda k: watcher._scan(float(k)),
    }
    result = {}
    for label, operation in operations.items():
        t0 = time.process_time()
        for k in range(repeat):
            operation(k)
        result[label] = 1000.0 * (time.process_time() - t0) / repeat
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window per observer")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--slices", type=int, default=10, help="new slices written per observer")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="kind[:interval_s],...")
    ap.add_argument("--dir", type=Path, default=None, help="where to make the folder (/tmp)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", metavar="CONFIG", dest="config", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        child(args)
        return

    root = Path(tempfile.mkdtemp(prefix="nrrn-watch-cost-", dir=args.dir))
    folder = root / "incoming"
    folder.mkdir()
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(root)], capture_output=True, text=True)
    print(
        f"# {args.files} files in {folder} ({fs.stdout.strip()}); {cpu_model()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        flush=True,
    )
    data = slice_bytes(0)
    for i in range(args.files):
        (folder / slice_name(i)).write_bytes(data)
    rows = []
    try:
        for label, ms in per_operation_ms(folder).items():
            print(f"# {label}: {ms:.1f} ms of CPU", flush=True)
        for n, config in enumerate(args.configs.split(",")):
            row = run_one(config, folder, args, first_new=args.files + 1000 * (n + 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(root)
    print()
    print(
        "| observer | interval (s) | CPU % of one core | new slices seen | "
        "latency median (s) | max (s) | reconciliations | start-up CPU (s) | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind, _, interval = r["config"].partition(":")
        print(
            f"| {kind} | {interval or '—'} | {r['cpu_pct']:.2f} | {r['seen']}/{r['written']} | "
            f"{r['median_s']:.2f} | {r['max_s']:.2f} | {r['reconciliations']} | "
            f"{r['startup_cpu_s']:.2f} | {r['load'][0]:.2f}→{r['load'][1]:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
