"""Bad frames as neighbours: the PSNR of the slices beside them, with and without the judgement.

A real FIB-25 crop (held-out z ≥ 200 of the shared volume) with noise at one paper level; three
of its slices are made bad: one blank (all zero), one cut short (bottom half zero) and one
replaced by a crop from elsewhere in the volume (unrelated content). The stack is denoised with
offline ``denoise_stack`` and the shipped base checkpoint, once with the frame judgement
(``frames=FrameSettings()``, the default) and once without (``frames=None``: every slice is a
neighbour, the old behaviour), and each neighbour of a bad frame is scored against the clean
slice. Also printed: the same slices' PSNR when the stack has no bad frame at all (the ceiling).

Example::

    OMP_NUM_THREADS=2 python benchmarks/bad_frames.py --size 128 --spec poisson:4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from nrrn_daemon.batch.offline import denoise_stack
from nrrn_daemon.config.profiles import FrameSettings
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.model.checkpoints import BASE_CHECKPOINT, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack

FIB25 = Path(__file__).resolve().parents[1].parent / "shared/data/fib25/fib25_sample1_250.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=Path, default=FIB25)
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--spec", default="poisson:4")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    vol = tifffile.imread(args.volume)
    s, n = args.size, args.slices
    clean = vol[200 : 200 + n, :s, :s].copy()
    bad = {3: "blank", 7: "cut short", 11: "unrelated"}
    clean_bad = clean.copy()
    clean_bad[11] = vol[100, -s:, -s:]  # content from elsewhere: its own reference is unknown
    good_noisy = noisy_stack(clean, args.spec, seed=7)
    noisy = noisy_stack(clean_bad, args.spec, seed=7)
    noisy[3] = 0
    noisy[7, s // 2 :] = 0
    denoiser = Denoiser(load_checkpoint(BASE_CHECKPOINT), device=args.device, compile="off")

    def run(stack: np.ndarray, frames: FrameSettings | None) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "stack.tif"
            tifffile.imwrite(src, stack)
            (out,) = denoise_stack([src], Path(tmp) / "out", denoiser, frames=frames)
            return tifffile.imread(out)

    results = {
        "no bad frame": run(good_noisy, FrameSettings()),
        "bad frames, judged": run(noisy, FrameSettings()),
        "bad frames, not judged": run(noisy, None),
    }
    rows = []
    for k in sorted({j for b in bad for j in (b - 1, b + 1)}):
        beside = next(b for b in bad if abs(b - k) == 1)
        row = {"slice": k, "beside": bad[beside]}
        row.update({name: round(psnr(out[k], clean[k]), 2) for name, out in results.items()})
        rows.append(row)
    print(json.dumps({"volume": str(args.volume), "crop": [n, s, s], "spec": args.spec}))
    header = ["slice", "beside", *results]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    means = {name: round(float(np.mean([r[name] for r in rows])), 2) for name in results}
    print("| mean | | " + " | ".join(str(means[name]) for name in results) + " |")


if __name__ == "__main__":
    main()
