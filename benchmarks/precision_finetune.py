"""Fine-tuning in float32 against bf16: steps per minute and validation loss at equal wall time.

Both arms fine-tune the shipped base checkpoint with ``nrrn_daemon.finetune.training.train`` (what
the daemon's nightly fine-tune runs) on the same real data — the FIB-25 slices z = 170–249, which
the base checkpoint never trained on, with the paper's noise (``--noise``, one draw per slice) —
with the same seed, crops, budget and validation slices (blocks of consecutive slices held out;
the validation loss is measured in float32, eagerly, for both). They differ only in
``precision``: ``float32`` against ``bf16`` (autocast; needs a CPU with AVX512-BF16 or AMX).

Fairness on a shared, noisy machine: the two arms run **at the same time**, as two processes
with one torch thread each, for the same wall time, so that load from elsewhere hits both alike.
The validation loss is measured every ``--every`` seconds of wall time (the same number of
validations, at the same times, in both arms) and at the end.

Reported: steps per minute; validation loss at every time mark; the time the bf16 arm needs to
reach the validation loss float32 has at the end.

Example (the recorded run uses 10 minutes)::

    python benchmarks/precision_finetune.py --minutes 10 --json runs/precision_finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import tifffile
import torch

FIB25 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fib25" / "fib25_sample1_250.tif"
FIRST, LAST = 170, 250
ARMS = ("float32", "bf16")


def arm(args: argparse.Namespace) -> None:
    """One fine-tune (in its own process, one thread); writes its report as JSON."""
    torch.set_num_threads(1)
    from nrrn_daemon.finetune.training import TrainSettings, train
    from nrrn_daemon.model.checkpoints import load_checkpoint
    from nrrn_daemon.sim.noise import noisy_stack

    clean = tifffile.imread(args.volume)[FIRST:LAST]
    noisy = noisy_stack(clean, args.noise, seed=args.seed)
    settings = TrainSettings(
        minutes=args.minutes,
        patch=args.patch,
        batch=args.batch,
        seed=args.seed,
        device="cpu",
        precision=args.arm,
        compile=args.compile,
        validation_fraction=args.validation,
        validation_every_s=args.every,
        validation_crops=1,
    )
    times: list[float] = []

    def on_progress(step: int, total: int | None, loss: float, elapsed: float) -> None:
        times.append(elapsed)

    _, report = train([noisy], settings, init=load_checkpoint(None), on_progress=on_progress)
    out = {
        "arm": args.arm,
        "precision": report.precision,
        "compiled": report.compiled,
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "first_step_s": round(times[0], 1) if times else None,
        "val_curve": report.val_curve,
        "val_seconds": report.val_seconds,
        "val_triplets": report.val_triplets,
        "train_triplets": report.train_triplets,
    }
    Path(args.out).write_text(json.dumps(out))


def steps_per_minute(r: dict) -> float:
    """Training steps per minute of wall time after the first step (compilation excluded)."""
    first = r["first_step_s"] or 0.0
    return (r["steps"] - 1) / max(r["seconds"] - first, 1e-9) * 60


def reach_time(r: dict, target: float) -> float | None:
    """Seconds of training until the validation loss first reached ``target`` (None: never).

    The starting point (the base checkpoint, before any step) does not count.
    """
    for (step, loss), t in zip(r["val_curve"], r["val_seconds"], strict=True):
        if step > 0 and loss <= target:
            return t
    return None


def markdown(report: dict) -> str:
    f32, b16 = report["arms"]["float32"], report["arms"]["bf16"]
    lines = [
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']}; two processes at once, one torch thread each.",
        f"Data: FIB-25 z = {FIRST}–{LAST - 1}, noise {report['noise']}; "
        f"{f32['train_triplets']} training / {f32['val_triplets']} validation triplets; "
        f"init: base checkpoint {report['base']}; compile = {report['compile']}.",
        "",
        "| | float32 | bf16 | bf16 / float32 |",
        "|---|---:|---:|---:|",
        f"| compiled | {f32['compiled']} | {b16['compiled']} | |",
        f"| steps in {report['minutes']:g} min | {f32['steps']} | {b16['steps']} | "
        f"{b16['steps'] / max(f32['steps'], 1):.2f} |",
        f"| steps per minute (after the first step) | {steps_per_minute(f32):.1f} | "
        f"{steps_per_minute(b16):.1f} | {steps_per_minute(b16) / steps_per_minute(f32):.2f} |",
        f"| first step done after (s) | {f32['first_step_s']} | {b16['first_step_s']} | |",
        f"| validation loss at the start | {f32['val_curve'][0][1]:.4f} | "
        f"{b16['val_curve'][0][1]:.4f} | |",
        f"| validation loss at the end | {f32['val_curve'][-1][1]:.4f} | "
        f"{b16['val_curve'][-1][1]:.4f} | |",
    ]
    target = f32["val_curve"][-1][1]
    reached = reach_time(b16, target)
    lines.append(
        "| minutes for bf16 to reach float32's final validation loss | "
        f"{f32['val_seconds'][-1] / 60:.1f} | "
        f"{'not reached' if reached is None else f'{reached / 60:.1f}'} | |"
    )
    lines += ["", "Validation loss over wall time (the same marks in both arms):", ""]
    lines += ["| minute | float32 step | float32 loss | bf16 step | bf16 loss |"]
    lines += ["|---:|---:|---:|---:|---:|"]
    for (s32, l32), t32, (s16, l16), t16 in zip(
        f32["val_curve"], f32["val_seconds"], b16["val_curve"], b16["val_seconds"], strict=False
    ):
        lines.append(f"| {t32 / 60:.1f} / {t16 / 60:.1f} | {s32} | {l32:.4f} | {s16} | {l16:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of each arm")
    parser.add_argument("--every", type=float, default=None, help="seconds between validations")
    parser.add_argument("--noise", default="poisson:4", help="paper noise level (noise.py spec)")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--validation", type=float, default=0.2, help="held-out fraction")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--volume", type=Path, default=FIB25)
    parser.add_argument("--json", type=Path, help="also save the report as JSON here")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.every is None:
        args.every = args.minutes * 6  # ten marks
    if args.arm:
        arm(args)
        return
    if not args.volume.exists():
        raise SystemExit(f"FIB-25 volume not found at {args.volume} (see ../shared/data)")
    from nrrn_daemon.model.checkpoints import load_checkpoint
    from nrrn_daemon.model.devices import cpu_bf16_features, cpu_model

    if not cpu_bf16_features():
        raise SystemExit(f"{cpu_model()} has no native bf16: nothing to compare")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name in ARMS:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--arm", name, "--out", str(out)]
            for key in ("minutes", "every", "noise", "patch", "batch", "validation", "compile",
                        "seed", "volume"):  # fmt: skip
                cmd += [f"--{key}", str(getattr(args, key))]
            procs[name] = (subprocess.Popen(cmd, env=env), out)
        arms = {}
        for name, (proc, out) in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"the {name} arm failed (exit code {proc.returncode})")
            arms[name] = json.loads(out.read_text())
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{cpu_model()} (native bf16: {', '.join(cpu_bf16_features())}), "
        f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}",
        "minutes": args.minutes,
        "noise": args.noise,
        "compile": args.compile,
        "base": load_checkpoint(None).short_sha,
        "arms": arms,
        "speedup_steps_per_min": steps_per_minute(arms["bf16"]) / steps_per_minute(arms["float32"]),
        "val_loss_end": {k: v["val_curve"][-1][1] for k, v in arms.items()},
        "bf16_minutes_to_float32_final": (
            None
            if (t := reach_time(arms["bf16"], arms["float32"]["val_curve"][-1][1])) is None
            else t / 60
        ),
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
