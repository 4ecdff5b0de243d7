"""A real run to look at: the microscope fixture writes FIB-25 slices into a real folder, a real
daemon (the shipped base NRRN on the CPU) denoises them into a real SQLite file, and one slice of
the wrong size fails with its reason."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import numpy as np

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.store.store import Store

NAME = "slice_{:04d}.tif"
SHAPE = (96, 128)
SLICES = 6
MISFIT = 20
"""Index of the slice the fixture writes with the wrong size: it fails on arrival."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what: str, timeout: float = 60.0, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"dashboard exited: {proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_profile(root: Path, **extra: object):
    """The demo profile (the shipped base model, a real trained NRRN) on folders under root."""
    overrides = {
        "watch.folder": str(root / "raw"),
        "output.folder": str(root / "out"),
        "store.database": str(root / "state" / "db.sqlite"),
        "model.device": "cpu",
        "model.tile": 64,
        "watch.settle_s": 0.2,
        "watch.rescan_interval_s": 1.0,
        "grouping.neighbour_wait_s": 1.0,
        "watch.glob": "slice_*.tif",
        "watch.index_regex": r"slice_(?P<index>\d+)\.tif$",
        **extra,
    }
    (root / "raw").mkdir(parents=True, exist_ok=True)
    return load_profile("demo", overrides=overrides)


def fib25_noisy(fib25: np.ndarray, n: int) -> np.ndarray:
    clean = np.ascontiguousarray(fib25[:n, : SHAPE[0], : SHAPE[1]])
    return noisy_stack(clean, "gaussian:20", seed=3)


def burst_run(root: Path, fib25: np.ndarray):
    """A burst run over 6 FIB-25 slices and a misfit under ``root``; returns (profile, root)."""
    profile = run_profile(root)
    scope = Microscope(root / "raw", fib25_noisy(fib25, SLICES), NAME, interval_s=0)
    scope.run()
    odd = Microscope(root / "raw", fib25_noisy(fib25, 1)[:, :64, :64], NAME, first_index=MISFIT)
    odd.run()
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    return profile, root
