"""Reprocess throughput on Dask distributed: 1 and 2 local workers, side by side, on this machine.

Data: ``--slices`` noisy slices of the real FIB-25 volume (250×250 uint8, Poisson peak 4, the
paper's protocol), one TIFF per slice; model: the shipped base checkpoint; every run writes the
TIFFs and an OME-Zarr volume and records provenance in a fresh SQLite file. Both clusters
(``LocalCluster`` of 1 and of 2 worker processes, one Dask thread each, torch threads = cores /
workers) are started and warmed up (4 slices each) before timing, and the runs alternate
1, 2, 1, 2... so a noisy machine affects both alike. Also measured, for the N-GPU analysis in
BENCHMARKS.md section 10:

- per slice, on the workers: read (+ sha256), model, write (TIFF + pyramid) seconds;
- on the client: seconds spent writing provenance per slice (the one writer);
- the scheduler: round trip of 2000 no-op tasks (its per-task overhead);
- bytes per slice read and written.

Run: ``.venv/bin/python benchmarks/reprocess_throughput.py [--slices 48] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
FIB25 = REPO.parent / "shared" / "data" / "fib25" / "fib25_sample1_250.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()

    from nrrn_daemon.batch.reprocess import dask_cluster, plan_reprocess, run_plan
    from nrrn_daemon.imaging.omezarr import OmeZarrVolume
    from nrrn_daemon.model.devices import cpu_model
    from nrrn_daemon.sim.noise import noisy_stack
    from nrrn_daemon.store.store import Store

    if not FIB25.exists():
        sys.exit(f"FIB-25 volume not found at {FIB25}")
    tmp = Path(tempfile.mkdtemp(prefix="nrrn-reprocess-bench-"))
    noisy = noisy_stack(tifffile.imread(FIB25)[: args.slices], "poisson:4", seed=0)
    raw = tmp / "raw"
    raw.mkdir()
    for k, plane in enumerate(noisy):
        tifffile.imwrite(
            raw / f"slice_{k:04d}.tif", plane, imagej=True, resolution=(100, 100),
            metadata={"spacing": 0.01, "unit": "um"},
        )  # fmt: skip

    warm = tmp / "warm"
    warm.mkdir()
    for k in range(4):
        tifffile.imwrite(warm / f"slice_{k:04d}.tif", noisy[k])
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with ExitStack() as stack:
        clusters = {}
        for n in (1, 2):
            t0 = time.perf_counter()
            clusters[n] = stack.enter_context(dask_cluster(local_workers=n))
            clusters[n].client.wait_for_workers(n)
            print(f"cluster of {n}: started in {time.perf_counter() - t0:.1f} s", flush=True)
        overhead = {n: _noop_round_trip(c.client) for n, c in clusters.items()}
        for n, cluster in clusters.items():  # torch's first calls are slow: not timed
            with Store(tmp / f"warm-{n}.sqlite") as store:
                plan = plan_reprocess(str(warm), store, output=tmp / f"warm-{n}", device="cpu")
                run_plan(plan, store, lambda c=cluster: nullcontext(c))
        for rep in range(args.repeats):
            for n in (1, 2):
                out = tmp / f"run{rep}-w{n}"
                per_slice: list[tuple[float, float, float]] = []
                with Store(out / "nrrn.sqlite") as store:
                    plan = plan_reprocess(
                        str(raw), store, output=out / "tif", zarr=out / "vol.zarr", device="cpu"
                    )
                    summary = run_plan(
                        plan, store, lambda c=clusters[n]: nullcontext(c),
                        on_result=lambda r, s, acc=per_slice: acc.append(
                            (r.read_s, r.model_s, r.write_s)
                        ),
                    )  # fmt: skip
                assert summary.recorded == args.slices and not summary.failed
                runs[n].append(
                    {
                        "seconds": summary.seconds,
                        "slices_per_s": summary.recorded / summary.seconds,
                        "record_ms_per_slice": 1000 * summary.record_s / summary.recorded,
                        "read_s": statistics.median(p[0] for p in per_slice),
                        "model_s": statistics.median(p[1] for p in per_slice),
                        "write_s": statistics.median(p[2] for p in per_slice),
                        "volume": str(out / "vol.zarr"),
                        "tif": str(out / "tif"),
                    }
                )
                print(f"repeat {rep}, {n} worker(s): {summary.seconds:.1f} s, "
                      f"{summary.recorded / summary.seconds:.2f} slices/s", flush=True)  # fmt: skip

    first = {n: runs[n][0] for n in (1, 2)}
    a = OmeZarrVolume.open(Path(first[1]["volume"])).read(0).astype(int)
    b = OmeZarrVolume.open(Path(first[2]["volume"])).read(0).astype(int)
    slice_bytes = (raw / "slice_0000.tif").stat().st_size
    tif_bytes = statistics.median(p.stat().st_size for p in Path(first[1]["tif"]).iterdir())
    zarr_bytes = (
        sum(p.stat().st_size for p in Path(first[1]["volume"]).rglob("*") if p.is_file())
        / args.slices
    )
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}",
        "slices": args.slices,
        "slice_shape": list(noisy.shape[1:]),
        "repeats": args.repeats,
        "workers": {
            n: {
                "slices_per_s_median": statistics.median(r["slices_per_s"] for r in runs[n]),
                "seconds": [round(r["seconds"], 2) for r in runs[n]],
                "read_s": statistics.median(r["read_s"] for r in runs[n]),
                "model_s": statistics.median(r["model_s"] for r in runs[n]),
                "write_s": statistics.median(r["write_s"] for r in runs[n]),
                "record_ms_per_slice": statistics.median(r["record_ms_per_slice"] for r in runs[n]),
                "noop_task_ms": overhead[n],
            }
            for n in (1, 2)
        },
        "max_abs_diff_1_vs_2_workers": int(np.abs(a - b).max()),
        "bytes_per_slice": {
            "raw_tiff": slice_bytes,
            "read_per_slice_batch1": 3 * slice_bytes,
            "tiff_out": int(tif_bytes),
            "zarr_out": int(zarr_bytes),
        },
    }
    speedup = (
        result["workers"][2]["slices_per_s_median"] / result["workers"][1]["slices_per_s_median"]
    )
    result["speedup_2_vs_1"] = speedup
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _noop_round_trip(client, n: int = 2000) -> float:
    """Milliseconds per task of ``n`` no-op tasks submitted at once (scheduler + comm cost)."""
    t0 = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return 1000 * (time.perf_counter() - t0) / n


def _noop(x: int) -> int:
    return x


if __name__ == "__main__":
    main()
