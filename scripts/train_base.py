"""Train the shipped base checkpoint (``nrrn_daemon/assets/base.pt`` + ``base.json``).

The base model must denoise data sets it has never seen, before any fine-tuning, so it is trained
with **slice** normalisation (each triplet z-scored by its centre slice) on the real FIB-25 volume
corrupted on the fly with the paper's mixed noise levels (section 2.2.3: Poisson with a peak in
[1, 50] or Gaussian with σ in [10, 75], one level per triplet, independent noise per slice), with
the authors' CLI model size (4 BU × 32 features).

Data split of the 250-slice volume: training triplets use slices z < 170 only; z = 170–199 give the
validation loss; z ≥ 200 is never touched, it is held out for the quality benchmark. At the end the
script checks the result on z = 200–210 (Gaussian σ = 25 and Poisson peak 4) and records the PSNRs.

Usage::

    OMP_NUM_THREADS=2 python scripts/train_base.py /work/shared/data/fib25/fib25_sample1_250.tif \
        --minutes 20 --patch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.files import sha256_file
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.model.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.devices import cpu_model
from nrrn_daemon.model.nrrn import NRRNConfig
from nrrn_daemon.sim.noise import noisy_stack, random_mixed, to_dtype

ASSETS = Path(__file__).resolve().parents[1] / "nrrn_daemon" / "assets"
TRAIN_END, VALIDATION_END = 170, 200  # train on z < 170, validate on 170–199, never touch z ≥ 200
CHECK_SLICES = range(200, 211)
CHECK_LEVELS = ("gaussian:25", "poisson:4")
NOISE_PROTOCOL = (
    "nrrn_daemon.sim.noise.random_mixed on each triplet (3 slices stacked): with probability 1/2 "
    "Poisson with a peak uniform in [1, 50], else Gaussian with sigma uniform in [10, 75] (0-255 "
    "scale); one level per triplet, independent noise per pixel and slice; clipped and rounded "
    "to uint8"
)


def mixed_noise(triplet: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The training noise hook: the paper's mixed levels, as uint8 like real slices."""
    noisy, _spec = random_mixed(triplet, rng)
    return to_dtype(noisy, np.uint8)


mixed_noise.description = NOISE_PROTOCOL  # type: ignore[attr-defined]


def check(ckpt: Checkpoint, volume: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """PSNR (dB) of noisy input and base-model output vs clean on the held-out slices 200–210."""
    first, last = CHECK_SLICES[0] - 1, CHECK_SLICES[-1] + 2
    clean = volume[first:last]
    denoiser = Denoiser(ckpt, device="cpu", tile=None)
    out: dict[str, dict[str, float]] = {}
    for spec in CHECK_LEVELS:
        noisy = noisy_stack(clean, spec, seed=seed)
        before, after = [], []
        for k in range(1, len(clean) - 1):
            result = denoiser.denoise(noisy[k], [noisy[k - 1], noisy[k + 1]])
            before.append(psnr(noisy[k], clean[k]))
            after.append(psnr(result, clean[k]))
        out[spec] = {
            "psnr_noisy_db": round(float(np.mean(before)), 3),
            "psnr_denoised_db": round(float(np.mean(after)), 3),
            "gain_db": round(float(np.mean(after) - np.mean(before)), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volume", type=Path, help="The FIB-25 volume (250 slices, uint8, ZYX).")
    parser.add_argument("--minutes", type=float, default=20.0, help="Training budget (wall clock).")
    parser.add_argument("--steps", type=int, default=None, help="Optional budget in steps.")
    parser.add_argument("--patch", type=int, default=64, help="Crop side (CPU: more steps).")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--loss", default="auto", help="auto (plain for adjacent slices), plain, eq3 or centre."
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="Start from this checkpoint (a paper-network init warm-starts a blind one).",
    )
    parser.add_argument("--out", type=Path, default=ASSETS / "base.pt", help="Checkpoint to write.")
    args = parser.parse_args(argv)

    volume = tifffile.imread(args.volume)
    if volume.ndim != 3 or volume.shape[0] < VALIDATION_END + 12 or volume.dtype != np.uint8:
        parser.error(
            f"expected the 250-slice uint8 FIB-25 volume, got {volume.shape} {volume.dtype}"
        )
    settings = TrainSettings(
        steps=args.steps,
        minutes=args.minutes,
        patch=args.patch,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        normalisation="slice",
        validation_slices=tuple(range(TRAIN_END, VALIDATION_END)),
        validation_every=150,
        loss=args.loss,
    )
    init = load_checkpoint(args.init) if args.init else None
    config = init.config if init else NRRNConfig(blocks=4, features=32)
    started = time.time()
    last_print = [0.0]

    def report(step: int, total: int | None, loss: float, elapsed: float) -> None:
        if elapsed - last_print[0] >= 30 or step == total:
            last_print[0] = elapsed
            print(
                f"step {step}{f'/{total}' if total else ''}  loss {loss:.4f}  {elapsed:.0f} s",
                flush=True,
            )

    print(
        f"training {config} on z < {TRAIN_END} of {args.volume} for {args.minutes} min", flush=True
    )
    ckpt, result = train(
        [volume[:VALIDATION_END]],
        settings,
        None if init else config,
        init=init,
        on_progress=report,
        noise=mixed_noise,
    )
    print(
        f"{result.steps} steps in {result.seconds:.0f} s; validation loss "
        f"{result.val_loss_start:.4f} -> {result.val_loss_end:.4f}",
        flush=True,
    )
    quality = check(ckpt, volume, seed=args.seed + 1000)
    for spec, numbers in quality.items():
        print(f"check z={CHECK_SLICES[0]}-{CHECK_SLICES[-1]} {spec}: {numbers}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, args.out)
    info = {
        "what": f"nrrn-daemon base checkpoint: NRRN {ckpt.config.blocks} BU x "
        f"{ckpt.config.features} features{' (blind-spot)' if ckpt.config.blind else ''}, "
        f"'{result.loss}' loss, slice normalisation",
        "init": None if init is None else {"file": str(args.init), "sha256": init.content_sha256},
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "data": {
            "file": str(args.volume),
            "sha256": sha256_file(args.volume),
            "shape": list(volume.shape),
            "dtype": str(volume.dtype),
            "train_slices": f"z 0-{TRAIN_END - 1} (triplet centres 1-{TRAIN_END - 2})",
            "validation_slices": f"z {TRAIN_END}-{VALIDATION_END - 1} (validation loss only)",
            "held_out": f"z >= {VALIDATION_END}: never used in training or validation; reserved "
            "for the quality benchmark",
        },
        "noise_protocol": NOISE_PROTOCOL,
        "config": ckpt.config.to_dict(),
        "normalisation": ckpt.normalisation.to_dict(),
        "settings": ckpt.summary["settings"],
        "steps": result.steps,
        "minutes": round(result.seconds / 60, 2),
        "stopped_by": result.stopped_by,
        "loss": {
            "validation_start": result.val_loss_start,
            "validation_end": result.val_loss_end,
            "validation_curve": result.val_curve,
            "train_first": result.loss_curve[0][1] if result.loss_curve else None,
            "train_last": result.loss_curve[-1][1] if result.loss_curve else None,
        },
        "check": {
            "slices": f"z {CHECK_SLICES[0]}-{CHECK_SLICES[-1]} (triplets with their neighbours)",
            "psnr_vs_clean": quality,
        },
        "machine": {
            "device": result.device,
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "content_sha256": ckpt.content_sha256,
        "file_sha256": sha256_file(args.out),
    }
    json_path = args.out.with_suffix(".json")
    tmp = json_path.with_name(f".{json_path.name}.part")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, json_path)
    print(f"wrote {args.out} ({ckpt.short_sha}) and {json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
