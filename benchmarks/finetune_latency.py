"""Live latency while a fine-tune runs, against idle latency, in one run.

A microscope writes noisy phantom slices at a fixed pace; the daemon (real loop, base checkpoint,
``model.checkpoint = "dataset"``) denoises them. The first ``--idle`` slices are denoised with no
fine-tune; then a fine-tune is requested (its own process, ``--minutes``), and the latency of the
slices denoised while it runs is compared with the idle ones. Target: at most 2× the idle latency.

Example::

    OMP_NUM_THREADS=2 python benchmarks/finetune_latency.py --idle 10 --busy 10 --interval 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.sim.phantom import make_phantom
from nrrn_daemon.store.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--idle", type=int, default=10, help="slices before the fine-tune")
    ap.add_argument("--busy", type=int, default=10, help="slices during the fine-tune")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between slices")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=1.0, help="fine-tune budget")
    args = ap.parse_args()

    n = args.idle + args.busy + 2
    clean = make_phantom((n, args.size, args.size), seed=0)
    noisy = noisy_stack(clean, "poisson:4", seed=1)
    root = Path(tempfile.mkdtemp(prefix="nrrn-ft-latency-"))
    (root / "raw").mkdir()
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(root / "raw"), "output.folder": str(root / "out"),
            "store.database": str(root / "db.sqlite"), "model.checkpoint": "dataset",
            "model.device": "cpu", "watch.observer": "native", "finetune.enabled": True,
            "finetune.cron": "0 3 1 1 *", "finetune.minutes": args.minutes,
            "finetune.early_after_slices": 0,
        },
    )  # fmt: skip
    idle: list[float] = []
    busy: list[float] = []
    state = {"requested": False, "done": False}
    with Store(profile.store.database) as store:
        daemon: Daemon

        def on_event(kind: str, data: dict) -> None:
            if kind == "output":
                (busy if daemon.finetuning.running else idle).append(data["latency_s"])
                if len(idle) >= args.idle and not state["requested"]:
                    state["requested"] = True
                    daemon.finetuning.request("benchmark")
                if len(busy) >= args.busy:
                    daemon.request_stop("benchmark complete")
            if kind == "finetune" and data["state"] not in ("started",):
                state["done"] = True
                daemon.request_stop(f"fine-tune ended ({data['state']})")

        daemon = Daemon(profile, store, on_event=on_event)
        scope = Microscope(root / "raw", noisy, "SEM Image - SliceImage - {:03d}.tif",
                           interval_s=args.interval, chunks=1)  # fmt: skip
        scope.start()
        t0 = time.perf_counter()
        reason = daemon.work()
        scope.stop()
        wall = time.perf_counter() - t0
    ratio = statistics.median(busy) / statistics.median(idle) if busy and idle else float("nan")
    print(f"stopped: {reason} after {wall:.0f} s; threads alive: {threading.active_count()}")
    print("| phase | slices | median latency (s) | max (s) |\n|---|---|---|---|")
    for name, values in (("idle", idle), ("during fine-tune", busy)):
        if values:
            print(
                f"| {name} | {len(values)} | {statistics.median(values):.2f} | {max(values):.2f} |"
            )
    print(f"\nratio (median during / idle): {ratio:.2f}  (target ≤ 2)")


if __name__ == "__main__":
    main()
