"""What issue 15 adds per slice: the writer thread's quality measures and the dashboard's preview.

On a 24-Mpx (6144 × 4096) uint16 slice built from the real FIB-25 volume (tiled, scaled to 16
bits, Gaussian noise added) and a smoothed copy standing in for the denoised output:

* :func:`nrrn_daemon.evaluation.quality.measure` (noise σ of input and output, flat-region IQR),
  which the daemon's writer thread runs once per output;
* :meth:`nrrn_daemon.dashboard.previews.Previews.render` of the raw and denoised TIFFs, cold
  (read, shrink to 1024 px, window, PNG-encode) and from the cache.

Median of ``--repeats`` runs, one thread each. Example::

    python benchmarks/dashboard_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from nrrn_daemon.dashboard.previews import Previews
from nrrn_daemon.evaluation.quality import measure

FIB25 = Path(__file__).resolve().parents[1].parent / "shared/data/fib25/fib25_sample1_250.tif"


def slice_24mpx(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    vol = tifffile.imread(FIB25)
    tile = vol[125].astype(np.float64) * 200.0 + 5000.0
    big = np.tile(tile, (6144 // 250 + 1, 4096 // 250 + 1))[:6144, :4096]
    rng = np.random.default_rng(seed)
    raw = np.clip(big + rng.normal(0, 3000, big.shape), 0, 65535).astype(np.uint16)
    den = ndimage.uniform_filter(raw, 5).astype(np.uint16)
    return raw, den


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    raw, den = slice_24mpx()
    with tempfile.TemporaryDirectory() as tmp:
        raw_p, den_p = Path(tmp) / "raw.tif", Path(tmp) / "den.tif"
        tifffile.imwrite(raw_p, raw)
        tifffile.imwrite(den_p, den)
        previews = Previews(1024)

        def cold() -> None:
            previews._cache.clear()
            previews._windows.clear()
            previews.render(raw_p, raw_p)
            previews.render(den_p, raw_p)

        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "slice": "6144x4096 uint16",
            "quality_measure_s": timed(lambda: measure(raw, den), args.repeats),
            "previews_cold_s (raw + denoised)": timed(cold, args.repeats),
            "previews_cached_s (raw + denoised)": timed(
                lambda: (previews.render(raw_p, raw_p), previews.render(den_p, raw_p)),
                args.repeats,
            ),
            "repeats": args.repeats,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
