"""Probe: one objective against another on a tiny NRRN (2 BU x 16), FIB-25, held-out z >= 200.

Trains from scratch (or ``base``: from the shipped checkpoint) on the noisy block z = 200-249
for STEPS steps per loss and scores z = 201-206 against the oracle 3-slice Gaussian.

Usage::

    python benchmarks/objective_probe.py gaussian:25 200 centre,plain [base]
"""

import sys
import time

import numpy as np
import tifffile
import torch

from nrrn_daemon.evaluation.baselines import gaussian_denoise, three_slice_average
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.nrrn import NRRNConfig
from nrrn_daemon.sim.noise import noisy_stack

torch.set_num_threads(1)
spec = sys.argv[1]
steps = int(sys.argv[2])
losses = sys.argv[3].split(",")
init = sys.argv[4] if len(sys.argv) > 4 else ""
vol = tifffile.imread("/work/shared/data/fib25/fib25_sample1_250.tif")
noisy = noisy_stack(vol, spec, seed=1)
train_stack = noisy[200:250]  # fine-tune on the noisy eval block itself, as the benchmark
ev = range(201, 207)


def score(den):
    return float(
        np.mean([psnr(den.denoise(noisy[z], [noisy[z - 1], noisy[z + 1]]), vol[z]) for z in ev])
    )


best = max(
    (
        float(
            np.mean(
                [
                    psnr(
                        np.clip(gaussian_denoise(three_slice_average(noisy, z), s), 0, 255)
                        .round()
                        .astype(np.uint8),
                        vol[z],
                    )
                    for z in ev
                ]
            )
        ),
        s,
    )
    for s in (0.5, 0.8, 1, 1.3, 1.6, 2, 2.5)
)
print("gauss-avg best", best, flush=True)
res = {}
for loss in losses:
    t = time.time()
    ck = load_checkpoint(None) if init == "base" else None
    cfg = None if ck else NRRNConfig(blocks=2, features=16)
    s = TrainSettings(
        steps=steps, patch=48, batch=8, loss=loss, compile="off", validation_fraction=0.1
    )
    ckpt, rep = train([train_stack], s, config=cfg, init=ck)
    res[loss] = score(Denoiser(ckpt, device="cpu", tile=None, compile="off"))
    print(
        loss,
        res[loss],
        "time",
        round(time.time() - t),
        rep.val_loss_start,
        rep.val_loss_end,
        flush=True,
    )
