"""PSNR after fine-tuning on a growing stack, against the base checkpoint.

On the shared FIB-25 volume with the paper's noise protocol: the "acquisition" is the noisy block
z = 200, 201, …; after N slices the daemon would fine-tune on those N raw slices. For each stack
size N and budget, this fine-tunes the shipped base checkpoint on the first N noisy slices
(unsupervised, as the daemon does) and scores the result on held-out slices z = 236–247 (later
slices of the same acquisition, never trained on), against the clean volume, beside the base
checkpoint, in one run.

Example::

    OMP_NUM_THREADS=2 python benchmarks/finetune_growth.py --sizes 8,16,32 \
        --minutes 0.5,1,2 --paired --levels poisson:4,gaussian:25
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack

FIB25 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fib25" / "fib25_sample1_250.tif"
START, EVAL = 200, list(range(236, 248))


def mean_psnr(ckpt, noisy: np.ndarray, clean: np.ndarray) -> float:
    den = Denoiser(ckpt, device="cpu", tile=None)
    return float(
        np.mean([psnr(den.denoise(noisy[z], [noisy[z - 1], noisy[z + 1]]), clean[z]) for z in EVAL])
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--volume", type=Path, default=FIB25)
    ap.add_argument("--sizes", default="8,16,32", help="stack sizes N (slices from z = 200)")
    ap.add_argument("--minutes", default="1,2", help="fine-tune budgets (CPU wall clock)")
    ap.add_argument("--levels", default="poisson:4,gaussian:25")
    ap.add_argument("--paired", action="store_true",
                    help="pair sizes and budgets (a growing stack, a growing budget)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    budgets = [float(v) for v in args.minutes.split(",")]
    if START + max(sizes) > EVAL[0] - 1:
        ap.error(f"stack sizes must end before the evaluation slices (z < {EVAL[0] - 1})")
    clean = tifffile.imread(args.volume)
    base = load_checkpoint(None)
    print(f"base checkpoint {base.short_sha}; evaluation z = {EVAL[0]}–{EVAL[-1]}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    rows = []
    for level in args.levels.split(","):
        noisy = noisy_stack(clean, level, seed=args.seed)
        noisy_db = float(np.mean([psnr(noisy[z], clean[z]) for z in EVAL]))
        base_db = mean_psnr(base, noisy, clean)
        runs = (
            list(zip(sizes, budgets, strict=True))
            if args.paired
            else [(n, m) for n in sizes for m in budgets]
        )
        for n, minutes in runs:
            t0 = time.perf_counter()
            settings = TrainSettings(minutes=minutes, seed=args.seed, device="cpu",
                                     validation_fraction=0.0)  # fmt: skip
            ckpt, report = train([noisy[START : START + n]], settings, init=base)
            tuned_db = mean_psnr(ckpt, noisy, clean)
            rows.append((level, n, minutes, report.steps, noisy_db, base_db, tuned_db))
            print(f"{level} N={n} {minutes} min: {report.steps} steps, noisy {noisy_db:.2f}, "
                  f"base {base_db:.2f}, fine-tuned {tuned_db:.2f} dB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    print("\n| level | stack N | budget (min) | steps | noisy | base | fine-tuned | gain |")
    print("|---|---|---|---|---|---|---|---|")
    for level, n, minutes, steps, noisy_db, base_db, tuned_db in rows:
        print(f"| {level} | {n} | {minutes:g} | {steps} | {noisy_db:.2f} | {base_db:.2f} | "
              f"{tuned_db:.2f} | {tuned_db - base_db:+.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
