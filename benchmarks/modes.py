"""The 1-, 2- and 3-image modes of the shipped base on held-out FIB-25 (paper: ~−2 % PSNR for 2).

For each noise level, slices z = 201…(200 + N) of the FIB-25 crop (never used in training) are
noised with :func:`~nrrn_daemon.sim.noise.noisy_stack` and denoised by the base checkpoint as a
triplet (z−1, z, z+1), a pair (z, z+1) and a single image; mean PSNR against the clean slice.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/modes.py --slices 8 --json runs/modes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile

from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack

FIB25 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fib25" / "fib25_sample1_250.tif"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volume", type=Path, default=FIB25)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--levels", default="gaussian:25,poisson:4")
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    volume = tifffile.imread(args.volume)
    ckpt = load_checkpoint(args.checkpoint)
    den = Denoiser(ckpt, device="cpu", tile=None)
    zs = range(201, 201 + args.slices)
    result: dict[str, dict[str, float]] = {}
    for spec in args.levels.split(","):
        noisy = noisy_stack(volume, spec, seed=args.seed)
        modes = {"noisy": [], "single": [], "pair": [], "triplet": []}
        for z in zs:
            modes["noisy"].append(psnr(noisy[z], volume[z]))
            modes["single"].append(psnr(den.denoise(noisy[z]), volume[z]))
            modes["pair"].append(psnr(den.denoise(noisy[z], [noisy[z + 1]]), volume[z]))
            modes["triplet"].append(
                psnr(den.denoise(noisy[z], [noisy[z - 1], noisy[z + 1]]), volume[z])
            )
        result[spec] = {k: round(float(np.mean(v)), 3) for k, v in modes.items()}
        t = result[spec]["triplet"]
        for k in ("pair", "single"):
            result[spec][f"{k}_vs_triplet_pct"] = round(100 * (result[spec][k] - t) / t, 2)
        print(spec, result[spec], flush=True)
    record = {"checkpoint": ckpt.content_sha256, "slices": list(zs), "psnr_db": result}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
