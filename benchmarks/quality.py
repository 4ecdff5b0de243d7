"""Denoising quality on real FIB-SEM: the paper's EPFL-style protocol on the FIB-25 volume.

The shared FIB-25 crop (250³ uint8, 10 nm voxels, already fairly clean: σ ≈ 3.8 grey levels) is
the "clean" reference. For each noise level (default :data:`~nrrn_daemon.sim.noise.PROTOCOL_LEVELS`)
the whole volume is noised with :func:`~nrrn_daemon.sim.noise.noisy_stack` (independent noise per
slice; slice z always gets the draw ``(seed, z)``), and every method denoises the same noisy data:

* **noisy** — the noisy centre slice itself;
* **gauss-avg / median-avg / nlm-avg** — the filters of :mod:`nrrn_daemon.evaluation.baselines` on
the
  average of the three slices z−1, z, z+1; **bm3d** on the centre slice alone;
* **NRRN base** — the shipped base checkpoint (``nrrn_daemon/assets/base.pt``, or
  ``--checkpoint``) in triplet mode: centre z with neighbours z−1 and z+1;
* **NRRN fine-tuned** — the base checkpoint fine-tuned, unsupervised, on the noisy evaluation
  block itself (the product's per-data-set fine-tune: training sees only noisy slices, never a
  clean one), for ``--finetune-minutes`` of wall clock on this machine, then used like the base;
  once per loss in ``--finetune-losses`` (``plain``, the default for adjacent slices, and/or
  ``eq3``, the paper's: see :mod:`nrrn_daemon.finetune.training`);
* **NRRN previous base** (with ``--previous-checkpoint``) — another checkpoint scored beside the
  base, for comparison only: it takes no part in the margin.

Data split. The base checkpoint was trained on z < 170 and validated on z = 170–199
(``scripts/train_base.py``); this benchmark only touches z ≥ 200 (refused otherwise). Evaluation
block: ``--slices`` consecutive slices from ``--first`` (default z = 200–223); scores are the mean
over its interior slices (each has both neighbours in the block: z = 201–222). Each baseline's
parameter is chosen by :func:`~nrrn_daemon.evaluation.baselines.best_of_grid` on a separate tuning
slice (``--tune-slice``, default z = 230, outside the block) against its *clean* image: an oracle a
user does not have, which favours the baselines (NRRN gets no such help).

All outputs are scored as the 8-bit images the pipeline writes: baseline results are clipped to
[0, 255] and rounded like NRRN's. PSNR with peak 255 and SSIM (Wang et al., 11-px Gaussian window)
from :mod:`nrrn_daemon.evaluation.metrics`, against the clean slice.

BM3D costs seconds per 250² slice on a CPU: ``--bm3d-slices N`` evaluates it on N evenly spread
eval slices only (0 = all). The margin of NRRN over BM3D is then computed on those same slices.

Example (the run in ``BENCHMARKS.md`` §1)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality.py --finetune-minutes 0 \\
        --finetune-steps 300 --finetune-losses plain,eq3 --previous-checkpoint OLD.pt \\
        --bm3d-slices 8 --json runs/quality3.json --markdown runs/quality3.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from nrrn_daemon.evaluation.baselines import METHODS, best_of_grid, run_method
from nrrn_daemon.evaluation.metrics import psnr, ssim
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.imaging.alignment import apply_shift
from nrrn_daemon.model.checkpoints import Checkpoint, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.devices import cpu_model
from nrrn_daemon.sim.noise import PROTOCOL_LEVELS, noisy_stack, parse_spec, to_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import train_supervised  # noqa: E402 - the sibling benchmark module

DEFAULT_VOLUME = Path(__file__).resolve().parents[2] / "shared/data/fib25/fib25_sample1_250.tif"
HELD_OUT_FROM = 200
"""First slice the base checkpoint never saw (train z < 170, validation 170–199)."""
TARGET_MARGIN_DB = 1.0
"""The goal: best NRRN at least this much PSNR above the best classical method."""
NRRN_BASE, NRRN_FT, NRRN_PREVIOUS = "nrrn-base", "nrrn-finetuned", "nrrn-previous"
NRRN_CEILING = "nrrn-supervised"
DRIFT_STILL, DRIFT_ALIGNED, DRIFT_RAW = "drift-none", "drift-aligned", "drift-unaligned"
LOSS_NAMES = {"plain": "plain", "eq3": "eq. 3", "centre": "centre"}
NOT_IN_MARGIN = (NRRN_PREVIOUS, NRRN_CEILING, DRIFT_STILL, DRIFT_ALIGNED, DRIFT_RAW)
"""Columns scored for comparison only: the best NRRN for the margin is never one of these."""


def candidate(name: str) -> str:
    """The result key of a ``--candidate NAME=PATH`` checkpoint."""
    return f"nrrn-{name}"


def finetuned(loss: str) -> str:
    """The result key of the fine-tune with ``loss``."""
    return f"{NRRN_FT}-{loss}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--volume", type=Path, default=DEFAULT_VOLUME, help="Clean ZYX uint8 volume.")
    p.add_argument("--first", type=int, default=200, help="First slice of the evaluation block.")
    p.add_argument("--slices", type=int, default=24, help="Slices in the block (≥ 3).")
    p.add_argument("--tune-slice", type=int, default=230, help="Baselines' tuning slice.")
    p.add_argument(
        "--levels", default=",".join(PROTOCOL_LEVELS), help="Comma-separated noise specs."
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="Comma-separated baselines (of METHODS)."
    )
    p.add_argument("--seed", type=int, default=0, help="Noise seed (and fine-tune seed).")
    p.add_argument("--checkpoint", type=Path, default=None, help="Default: the base checkpoint.")
    p.add_argument(
        "--finetune-minutes",
        type=float,
        default=2.0,
        help="Wall-clock fine-tune budget per level (0: skip the fine-tune).",
    )
    p.add_argument("--finetune-steps", type=int, default=None, help="Optional step budget.")
    p.add_argument("--finetune-patch", type=int, default=96, help="Crop side (CLI default 96).")
    p.add_argument("--finetune-batch", type=int, default=8, help="Triplets per step.")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="Peak lr (CLI default 1e-3).")
    p.add_argument(
        "--finetune-losses", default="plain", help="Comma-separated: plain, eq3 and/or centre."
    )
    p.add_argument(
        "--previous-checkpoint", type=Path, default=None, help="Also score this one (no margin)."
    )
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="Another base checkpoint, scored and counted in the margin (repeatable).",
    )
    p.add_argument(
        "--finetune-from",
        action="append",
        default=[],
        metavar="LOSS=NAME",
        help="The fine-tune with LOSS starts from --candidate NAME (default: the base).",
    )
    p.add_argument(
        "--supervised-steps",
        type=int,
        default=0,
        help="Also train the supervised ceiling (clean targets) for N steps (0: skip).",
    )
    p.add_argument(
        "--supervised-from",
        type=Path,
        default=None,
        help="Checkpoint the ceiling starts from (default: --checkpoint).",
    )
    p.add_argument(
        "--drift",
        type=float,
        default=0.0,
        help="Also score --checkpoint on a copy drifted by a random walk of this σ (px) per "
        "slice, with and without alignment (0: skip).",
    )
    p.add_argument("--per-unit", action="store_true", help="PSNR/SSIM after every building unit.")
    p.add_argument(
        "--bm3d-slices", type=int, default=8, help="Evaluate BM3D on N eval slices (0 = all)."
    )
    p.add_argument("--tile", type=int, default=0, help="Denoiser tile (0: whole slice).")
    p.add_argument("--json", type=Path, default=None, help="Write all results here.")
    p.add_argument("--markdown", type=Path, default=None, help="Write the report here too.")
    args = p.parse_args(argv)
    args.levels = [s.strip() for s in args.levels.split(",") if s.strip()]
    for spec in args.levels:
        try:
            parse_spec(spec)
        except Exception as exc:  # InputError with a clear message
            p.error(str(exc))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    candidates = {}
    for item in args.candidate:
        name, _, path = item.partition("=")
        if not name or not path or not name.replace("-", "").isalnum():
            p.error(f"--candidate {item!r}: expected NAME=PATH (NAME of letters, digits, -)")
        candidates[name] = Path(path)
    args.candidate = candidates
    starts = {}
    for item in args.finetune_from:
        loss, _, name = item.partition("=")
        if loss not in LOSS_NAMES or (name != "base" and name not in candidates):
            p.error(f"--finetune-from {item!r}: LOSS=NAME, NAME 'base' or a --candidate")
        starts[loss] = name
    args.finetune_from = starts
    args.finetune_losses = [x.strip() for x in args.finetune_losses.split(",") if x.strip()]
    if not args.finetune_losses or set(args.finetune_losses) - set(LOSS_NAMES):
        p.error(f"--finetune-losses: choose from {', '.join(LOSS_NAMES)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.slices < 3:
        p.error("--slices must be ≥ 3 (the interior slices need both neighbours)")
    last = args.first + args.slices - 1
    if args.first < HELD_OUT_FROM or args.tune_slice - 1 < HELD_OUT_FROM:
        p.error(
            f"the base checkpoint trained/validated on z < {HELD_OUT_FROM}: evaluation block and "
            f"tuning triplet must lie at z ≥ {HELD_OUT_FROM}"
        )
    if args.first - 1 <= args.tune_slice <= last + 1:
        p.error(f"--tune-slice {args.tune_slice} must lie outside the block {args.first}–{last}")
    return args


def as_uint8(image: np.ndarray) -> np.ndarray:
    """A baseline's float result as the 8-bit image the pipeline would write."""
    return to_dtype(image, np.uint8)


def score(out: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    return psnr(out, clean), ssim(out, clean)


def mean_of(per_slice: dict[int, tuple[float, float]], zs: list[int] | None = None) -> dict:
    zs = sorted(per_slice) if zs is None else zs
    return {
        "psnr": float(np.mean([per_slice[z][0] for z in zs])),
        "ssim": float(np.mean([per_slice[z][1] for z in zs])),
        "slices": len(zs),
    }


def nrrn_scores(
    ckpt: Checkpoint, noisy: np.ndarray, clean: np.ndarray, zs: list[int], tile: int | None
) -> dict[int, tuple[float, float]]:
    denoiser = Denoiser(ckpt, device="cpu", tile=tile)
    return {
        z: score(denoiser.denoise(noisy[z], [noisy[z - 1], noisy[z + 1]]), clean[z]) for z in zs
    }


def random_walk(sigma: float, seed: int, count: int) -> np.ndarray:
    """``(count, 2)`` positions (px) of a stack drifting by a random walk: each slice moves from
    the previous one by a shift drawn from N(0, σ²) per axis, as FIB-SEM slices drift."""
    rng = np.random.default_rng(seed + 7919)
    return np.cumsum(rng.normal(0.0, sigma, size=(count, 2)), axis=0)


def drift_triplets(
    volume: np.ndarray, spec: str, positions: np.ndarray, first: int, zs: list[int], seed: int
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each centre z: (clean centre, drifted noisy triplet, undrifted noisy triplet).

    The drifted triplet has slice k at its own random-walk position; the undrifted one has all
    three slices at the centre's position, so both went through the same resampling and share
    one clean centre and one noise draw (seed per z): the only difference is the drift.
    """
    out = {}
    for z in zs:
        here = positions[z - first]
        clean = [apply_shift(volume[k], tuple(positions[k - first])) for k in (z - 1, z, z + 1)]
        still = [apply_shift(volume[k], tuple(here)) for k in (z - 1, z, z + 1)]
        noisy_drift = noisy_stack(np.stack(clean), spec, seed=seed + z)
        noisy_still = noisy_stack(np.stack(still), spec, seed=seed + z)
        out[z] = (clean[1], noisy_drift, noisy_still)
    return out


def run_level(
    spec: str,
    volume: np.ndarray,
    base: Checkpoint,
    args: argparse.Namespace,
    eval_zs: list[int],
    bm3d_zs: list[int],
    previous: Checkpoint | None = None,
    candidates: dict[str, Checkpoint] | None = None,
    supervised_init: Checkpoint | None = None,
) -> dict[str, Any]:
    candidates = candidates or {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    noisy = noisy_stack(volume, spec, seed=args.seed)
    timings["noise_s"] = time.perf_counter() - t0
    per_slice: dict[str, dict[int, tuple[float, float]]] = {}
    per_slice["noisy"] = {z: score(noisy[z], volume[z]) for z in eval_zs}
    tuned: dict[str, Any] = {}

    for name in args.methods:
        t0 = time.perf_counter()
        best = best_of_grid(name, noisy, volume, args.tune_slice)
        zs = bm3d_zs if name == "bm3d" else eval_zs
        per_slice[name] = {
            z: score(as_uint8(run_method(name, noisy, z, best.param)), volume[z]) for z in zs
        }
        timings[f"{name}_s"] = time.perf_counter() - t0
        tuned[name] = {
            "param": best.param,
            "parameter": METHODS[name].parameter,
            "tune_psnr": best.psnr,
            "grid_psnr": {str(k): v for k, v in best.scores.items()},
        }
        print(
            f"  {name:<14} {METHODS[name].parameter}={best.param:g}  "
            f"{mean_of(per_slice[name])['psnr']:.2f} dB  ({timings[f'{name}_s']:.0f} s)",
            flush=True,
        )

    tile = args.tile or None
    models = [(NRRN_BASE, base)] + ([(NRRN_PREVIOUS, previous)] if previous else [])
    models += [(candidate(name), ckpt) for name, ckpt in candidates.items()]
    for key, ckpt in models:
        t0 = time.perf_counter()
        per_slice[key] = nrrn_scores(ckpt, noisy, volume, eval_zs, tile)
        timings[f"{key}_s"] = time.perf_counter() - t0
        print(
            f"  {key:<14} {mean_of(per_slice[key])['psnr']:.2f} dB  ({timings[f'{key}_s']:.0f} s)",
            flush=True,
        )

    finetune: dict[str, Any] = {}
    for loss in args.finetune_losses if args.finetune_minutes > 0 or args.finetune_steps else []:
        key = finetuned(loss)
        block = noisy[args.first : args.first + args.slices]
        settings = TrainSettings(
            steps=args.finetune_steps,
            minutes=args.finetune_minutes if args.finetune_minutes > 0 else None,
            patch=args.finetune_patch,
            batch=args.finetune_batch,
            lr=args.finetune_lr,
            seed=args.seed,
            device="cpu",
            validation_fraction=0.0,
            loss=loss,
        )
        t0 = time.perf_counter()
        name = args.finetune_from.get(loss, "base")
        start_from = base if name == "base" else candidates[name]
        ckpt, report = train([block], settings, init=start_from)
        timings[f"{key}_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_slice[key] = nrrn_scores(ckpt, noisy, volume, eval_zs, tile)
        timings[f"{key}_s"] = time.perf_counter() - t0
        finetune[loss] = {
            "steps": report.steps,
            "seconds": report.seconds,
            "stopped_by": report.stopped_by,
            "train_triplets": report.train_triplets,
            "from": args.finetune_from.get(loss, "base"),
            "loss_first": report.loss_curve[0][1] if report.loss_curve else None,
            "loss_last": report.loss_curve[-1][1] if report.loss_curve else None,
        }
        print(
            f"  {key:<14} {mean_of(per_slice[key])['psnr']:.2f} dB  "
            f"({report.steps} steps in {report.seconds:.0f} s + "
            f"{timings[f'{key}_s']:.0f} s inference)",
            flush=True,
        )

    block = slice(args.first, args.first + args.slices)
    supervised: dict[str, Any] = {}
    if args.supervised_steps and supervised_init is not None:
        ceiling, supervised = train_supervised(
            supervised_init,
            noisy[block],
            volume[block],
            steps=args.supervised_steps,
            patch=args.finetune_patch,
            batch=args.finetune_batch,
            lr=args.finetune_lr,
            seed=args.seed,
        )
        per_slice[NRRN_CEILING] = nrrn_scores(ceiling, noisy, volume, eval_zs, tile)
        print(
            f"  {NRRN_CEILING:<14} {mean_of(per_slice[NRRN_CEILING])['psnr']:.2f} dB  "
            f"({args.supervised_steps} steps in {supervised['seconds']:.0f} s)",
            flush=True,
        )

    drift: dict[str, Any] = {}
    if args.drift > 0:
        positions = random_walk(args.drift, args.seed, args.slices)
        cases = drift_triplets(volume, spec, positions, args.first, eval_zs, args.seed)
        runs = ((DRIFT_STILL, True, 2), (DRIFT_ALIGNED, True, 1), (DRIFT_RAW, False, 1))
        for key, align, which in runs:
            den = Denoiser(base, device="cpu", tile=tile, align=align)
            per_slice[key] = {
                z: score(den.denoise(c[which][1], [c[which][0], c[which][2]]), c[0])
                for z, c in cases.items()
            }
            print(f"  {key:<14} {mean_of(per_slice[key])['psnr']:.2f} dB", flush=True)
        steps = np.diff(positions, axis=0)
        still = mean_of(per_slice[DRIFT_STILL])["psnr"]
        drift = {
            "sigma_px": args.drift,
            "mean_neighbour_shift_px": float(np.mean(np.hypot(steps[:, 0], steps[:, 1]))),
            "loss_aligned_db": still - mean_of(per_slice[DRIFT_ALIGNED])["psnr"],
            "loss_unaligned_db": still - mean_of(per_slice[DRIFT_RAW])["psnr"],
        }

    per_unit: list[dict[str, float]] = []
    if args.per_unit:
        den = Denoiser(base, device="cpu", tile=None)
        rows: list[list[tuple[float, float]]] = []
        for z in eval_zs:
            images = den.unit_estimates(noisy[z], [noisy[z - 1], noisy[z + 1]])
            rows.append([score(im, volume[z]) for im in images])
        per_unit = [
            {
                "psnr": float(np.mean([r[k][0] for r in rows])),
                "ssim": float(np.mean([r[k][1] for r in rows])),
            }
            for k in range(len(rows[0]))
        ]

    means = {name: mean_of(scores) for name, scores in per_slice.items()}
    margin = compare(per_slice, means, args.methods)
    return {
        "level": spec,
        "means": means,
        "per_slice": {
            name: {str(z): {"psnr": v[0], "ssim": v[1]} for z, v in scores.items()}
            for name, scores in per_slice.items()
        },
        "tuned": tuned,
        "finetune": finetune,
        "supervised": supervised,
        "drift": drift,
        "per_unit": per_unit,
        "margin": margin,
        "timings_s": timings,
    }


def compare(
    per_slice: dict[str, dict[int, tuple[float, float]]],
    means: dict[str, dict[str, float]],
    methods: list[str],
) -> dict[str, Any]:
    """Best NRRN (by mean PSNR) minus each classical method, on the slices both were scored on."""
    nrrn = [n for n in per_slice if n.startswith("nrrn-") and n not in NOT_IN_MARGIN]
    best_nrrn = max(nrrn, key=lambda n: means[n]["psnr"])
    diffs: dict[str, dict[str, float]] = {}
    for m in methods:
        zs = sorted(per_slice[m])
        diffs[m] = {
            "psnr_db": float(
                np.mean([per_slice[best_nrrn][z][0] - per_slice[m][z][0] for z in zs])
            ),
            "ssim": float(np.mean([per_slice[best_nrrn][z][1] - per_slice[m][z][1] for z in zs])),
            "slices": len(zs),
        }
    closest = min(diffs, key=lambda m: diffs[m]["psnr_db"]) if diffs else None
    return {
        "best_nrrn": best_nrrn,
        "best_classical": closest,
        "psnr_db": diffs[closest]["psnr_db"] if closest else math.nan,
        "ssim": diffs[closest]["ssim"] if closest else math.nan,
        "meets_target": bool(closest and diffs[closest]["psnr_db"] >= TARGET_MARGIN_DB),
        "vs_each": diffs,
    }


def budget(args: dict[str, Any]) -> str:
    """The fine-tune budget in words."""
    parts = []
    if args["finetune_minutes"] > 0:
        parts.append(f"{args['finetune_minutes']:g} min wall clock (setup included)")
    if args["finetune_steps"]:
        parts.append(f"{args['finetune_steps']} steps")
    return " or ".join(parts) + ", whichever ends first" * (len(parts) > 1)


def markdown(result: dict[str, Any]) -> str:
    args = result["settings"]
    cols = ["noisy", *args["methods"], NRRN_BASE]
    cols += [candidate(name) for name in args.get("candidate", {})]
    if args.get("previous_checkpoint"):
        cols.append(NRRN_PREVIOUS)
    if any(lv["finetune"] for lv in result["levels"]):
        cols += [finetuned(loss) for loss in args["finetune_losses"]]
    if any(lv.get("supervised") for lv in result["levels"]):
        cols.append(NRRN_CEILING)
    if any(lv.get("drift") for lv in result["levels"]):
        cols += [DRIFT_STILL, DRIFT_ALIGNED, DRIFT_RAW]
    names = {
        "noisy": "noisy",
        "gauss-avg": "Gaussian (avg)",
        "median-avg": "median (avg)",
        "nlm-avg": "NLM (avg)",
        "bm3d": "BM3D" + (" †" if args["bm3d_slices"] else ""),
        NRRN_BASE: "NRRN base",
        NRRN_PREVIOUS: "NRRN previous base",
        "gauss-reg": "Gaussian (registered avg)",
        NRRN_CEILING: "supervised ceiling",
        DRIFT_STILL: "same resampling, no drift",
        DRIFT_ALIGNED: "drifted, aligned",
        DRIFT_RAW: "drifted, not aligned",
        **{candidate(name): f"NRRN {name}" for name in args.get("candidate", {})},
        **{finetuned(k): f"NRRN fine-tuned ({v})" for k, v in LOSS_NAMES.items()},
    }
    lines = [
        "| level | " + " | ".join(names.get(c, c) for c in cols) + " | margin (dB) |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for lv in result["levels"]:
        cells = []
        for c in cols:
            m = lv["means"].get(c)
            cells.append(f"{m['psnr']:.2f} / {m['ssim']:.3f}" if m else "—")
        mg = lv["margin"]
        tick = "" if mg["meets_target"] else " ✗"
        cells.append(
            f"{mg['psnr_db']:+.2f} vs {names.get(mg['best_classical'], mg['best_classical'])}{tick}"
        )
        lines.append(f"| {lv['level']} | " + " | ".join(cells) + " |")
    m = result["machine"]
    ev = result["evaluation"]
    notes = [
        "",
        "Cells: mean PSNR (dB, peak 255) / mean SSIM over the evaluation slices, against the clean "
        "slice. Margin: best NRRN variant minus the closest classical method, PSNR, on the slices "
        f"both were scored on (target ≥ +{TARGET_MARGIN_DB:g} dB; ✗ = missed).",
        f"Evaluation: z = {ev['eval_slices'][0]}–{ev['eval_slices'][-1]} "
        f"({len(ev['eval_slices'])} slices, each with both neighbours; block "
        f"z = {ev['block'][0]}–{ev['block'][1]}); baselines tuned on z = {ev['tune_slice']} "
        "against its clean image (oracle tuning, favours the baselines).",
    ]
    if args["bm3d_slices"] and "bm3d" in args["methods"]:
        notes.append(f"† BM3D evaluated on z = {', '.join(map(str, ev['bm3d_slices']))} only.")
    ft = [lv["finetune"] for lv in result["levels"] if lv["finetune"]]
    if ft:
        notes.append(
            "Fine-tune: "
            + ", ".join(
                f"{LOSS_NAMES[loss]} from {args['finetune_from'].get(loss, 'base')}"
                for loss in args["finetune_losses"]
            )
            + ", on the noisy block only (unsupervised), "
            f"{budget(args)} per level on the CPU, patch "
            f"{args['finetune_patch']}, batch {args['finetune_batch']}, "
            f"lr {args['finetune_lr']:g}, "
            f"no validation; steps per level and loss: "
            + ", ".join(
                f"{lv['level']} {loss} {ft['steps']} ({ft['seconds'] / 60:.1f} min)"
                for lv in result["levels"]
                for loss, ft in lv["finetune"].items()
            )
            + "."
        )
    sup = [lv for lv in result["levels"] if lv.get("supervised")]
    if sup:
        notes.append(
            "Supervised ceiling: the same network from "
            f"{args.get('supervised_from') or 'the checkpoint'}, {args['supervised_steps']} "
            "steps on the noisy block with the clean centre as "
            "target (same crops, batch, lr and schedule as the fine-tunes); comparison only."
        )
    dr = [lv for lv in result["levels"] if lv.get("drift")]
    if dr:
        notes.append(
            f"Drift: the block drifted by a random walk of σ {args['drift']:g} px per slice "
            "(mean neighbour shift "
            + ", ".join(
                f"{lv['level']} {lv['drift']['mean_neighbour_shift_px']:.2f} px" for lv in dr
            )
            + "), NRRN base; each triplet is also made without drift (all three slices at the "
            "centre's position: the same resampling, clean centre and noise draw), and the loss "
            "against it is, aligned / not aligned: "
            + ", ".join(
                f"{lv['level']} {lv['drift']['loss_aligned_db']:+.2f} / "
                f"{lv['drift']['loss_unaligned_db']:+.2f} dB"
                for lv in dr
            )
            + "."
        )
    pu = [lv for lv in result["levels"] if lv.get("per_unit")]
    if pu:
        units = len(pu[0]["per_unit"])
        notes += [
            "",
            "NRRN base after each building unit (PSNR / SSIM; the last column is the output "
            "before the posterior step, paper Fig. 5):",
            "",
            "| level | " + " | ".join(f"BU {k + 1}" for k in range(units - 1)) + " | output |",
            "|---|" + "---|" * units,
        ]
        for lv in pu:
            notes.append(
                f"| {lv['level']} | "
                + " | ".join(f"{u['psnr']:.2f} / {u['ssim']:.3f}" for u in lv["per_unit"])
                + " |"
            )
        notes.append("")
    notes.append(
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}, "
        f"OMP_NUM_THREADS={m['omp_num_threads']}), {m['platform']}; torch {m['torch']}, "
        f"numpy {m['numpy']}."
    )
    notes.append(f"Wall time: {result['wall_s'] / 60:.1f} min in all.")
    notes.append(f"Command: `{result['command']}`")
    return "\n".join(lines + notes) + "\n"


def command_line(argv: list[str] | None) -> str:
    """The command as run (with OMP_NUM_THREADS when set), for the report."""
    env = os.environ.get("OMP_NUM_THREADS")
    words = [".venv/bin/python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]
    return (f"OMP_NUM_THREADS={env} " if env else "") + shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    volume = tifffile.imread(args.volume)
    if volume.ndim != 3 or volume.dtype != np.uint8:
        raise SystemExit(f"expected a ZYX uint8 volume, got {volume.shape} {volume.dtype}")
    last = args.first + args.slices - 1
    if last >= len(volume) or args.tune_slice + 1 >= len(volume):
        raise SystemExit(
            f"block {args.first}–{last} / tuning slice {args.tune_slice} exceed "
            f"the volume's {len(volume)} slices"
        )
    eval_zs = list(range(args.first + 1, last))
    if args.bm3d_slices and args.bm3d_slices < len(eval_zs):
        pick = np.linspace(0, len(eval_zs) - 1, args.bm3d_slices).round().astype(int)
        bm3d_zs = [eval_zs[i] for i in sorted(set(pick.tolist()))]
    else:
        bm3d_zs = eval_zs
    base = load_checkpoint(args.checkpoint)
    previous = load_checkpoint(args.previous_checkpoint) if args.previous_checkpoint else None
    candidates = {name: load_checkpoint(path) for name, path in args.candidate.items()}
    supervised_init = (
        (load_checkpoint(args.supervised_from) if args.supervised_from else base)
        if args.supervised_steps
        else None
    )
    print(
        f"checkpoint {args.checkpoint or 'base'} ({base.short_sha}); eval z = "
        f"{eval_zs[0]}–{eval_zs[-1]}, tuning z = {args.tune_slice}",
        flush=True,
    )

    levels = []
    for spec in args.levels:
        print(f"{spec}:", flush=True)
        t0 = time.perf_counter()
        lv = run_level(
            spec, volume, base, args, eval_zs, bm3d_zs, previous, candidates, supervised_init
        )
        lv["timings_s"]["level_s"] = time.perf_counter() - t0
        levels.append(lv)

    settings = json.loads(json.dumps(vars(args), default=str))  # paths as text
    result = {
        "what": "denoising quality, EPFL-style synthetic noise on FIB-25 (held-out z >= 200)",
        "command": command_line(argv),
        "settings": settings,
        "checkpoint": {
            "path": str(args.checkpoint) if args.checkpoint else "nrrn_daemon/assets/base.pt",
            "content_sha256": base.content_sha256,
            "config": base.config.to_dict(),
            "normalisation": base.normalisation.to_dict(),
            "train_slices": [d.get("train_slices") for d in base.summary.get("data", [])],
        },
        "evaluation": {
            "block": [args.first, last],
            "eval_slices": eval_zs,
            "bm3d_slices": bm3d_zs,
            "tune_slice": args.tune_slice,
        },
        "levels": levels,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["wall_s"] = time.perf_counter() - started
    report = markdown(result)
    print()
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
