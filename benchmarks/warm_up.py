"""How long the daemon's start-up warm-up takes, and that the first slice then compiles nothing.

``Denoiser.warm_up()`` (called at the start of ``Daemon.work``) compiles the network's branches
on small windows; the compiled graphs have dynamic shapes, so no slice should compile again.
For each model, two fresh processes run one after the other with the same, initially empty
inductor cache folder: the first start is "cold" (everything compiled), the second "warm" (what a
restarted daemon pays: inductor's on-disk cache). Each process then denoises a ``--size``
triplet twice and reports the two times and how many graphs dynamo compiled during them (0
expected).

Example::

    OMP_NUM_THREADS=2 python benchmarks/warm_up.py --models base,paper --size 1100x900 \\
        --json runs/warm_up.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One daemon-like start: build the Denoiser, warm it up, denoise twice; print JSON."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation, load_checkpoint
    from nrrn_daemon.model.denoise import Denoiser
    from nrrn_daemon.model.nrrn import NRRN

    if args.child == "base":
        ckpt = load_checkpoint(None)
    else:  # the paper's size, random weights
        torch.manual_seed(0)
        ckpt = Checkpoint.from_model(NRRN(4, 64), Normalisation("slice"))
    start = time.perf_counter()
    den = Denoiser(ckpt, device=args.device, tile=args.tile, tile_batch=args.tile_batch)
    build_s = time.perf_counter() - start
    warm_up_s = den.warm_up()
    h, w = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    stack = [rng.integers(0, 255, (h, w), dtype=np.uint8) for _ in range(3)]
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        den.denoise(stack[0], stack[1:])
        den.denoise(stack[0], stack[1:2])  # a pair too: the other compiled graph
        times.append(time.perf_counter() - t0)
    row = {
        "model": f"{args.child} ({ckpt.config.blocks}×{ckpt.config.features})",
        "precision": den.precision,
        "compiled": den.compiled,
        "build_s": round(build_s, 1),
        "warm_up_s": round(warm_up_s, 1),
        "first_slice_s": round(times[0], 2),
        "second_slice_s": round(times[1], 2),
        "graphs_compiled_by_slices": counters["stats"]["unique_graphs"] - graphs,
    }
    print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="base,paper", help="base and/or paper (4×64)")
    parser.add_argument("--size", default="1100x900", help="slice size HxW after the warm-up")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tile-batch", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for start in ("cold", "warm"):
                cmd = [sys.executable, __file__, "--child", model, "--size", args.size,
                       "--tile", str(args.tile), "--tile-batch", str(args.tile_batch),
                       "--device", args.device]  # fmt: skip
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                rows.append({"start": start, **json.loads(done.stdout.strip().splitlines()[-1])})
    print(f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        "| model | start | precision | compiled | warm-up s | first slice s | second slice s "
        "| graphs compiled by the slices |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['start']} | {r['precision']} | {r['compiled']} | "
            f"{r['warm_up_s']} | {r['first_slice_s']} | {r['second_slice_s']} | "
            f"{r['graphs_compiled_by_slices']} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
