"""Shared fixtures: the real FIB-25 volume, and a guard against leaked threads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# Two cores on CI: keep torch from oversubscribing them when tests run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
FIB25 = Path(
    os.environ.get(
        "NRRN_FIB25", REPO.parent / "shared" / "data" / "fib25" / "fib25_sample1_250.tif"
    )
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` run only where torch sees a CUDA device; elsewhere they skip, saying
    why (``scripts/gpu_check.sh`` runs them on a GPU machine)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    why = "built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    skip = pytest.mark.skip(
        reason=f"needs a CUDA GPU: torch {torch.__version__} here is {why} "
        "(run scripts/gpu_check.sh on a GPU machine)"
    )
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def fib25_path() -> Path:
    """Path of the shared real FIB-SEM volume (250³ uint8, ZYX); skips when it is absent."""
    if not FIB25.exists():
        pytest.skip(f"real FIB-25 volume not found at {FIB25} (set NRRN_FIB25 to its path)")
    return FIB25


@pytest.fixture(scope="session")
def fib25(fib25_path: Path) -> np.ndarray:
    """The shared real FIB-SEM volume as a (250, 250, 250) uint8 array, read once per session."""
    import tifffile

    vol = tifffile.imread(fib25_path)
    vol.setflags(write=False)
    return vol


def random_checkpoint(path: Path, blocks: int = 1, features: int = 4, seed: int = 0) -> Path:
    """Save a small NRRN with random weights (slice normalisation) to ``path``."""
    import torch

    from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation, save_checkpoint
    from nrrn_daemon.model.nrrn import NRRN

    torch.manual_seed(seed)
    model = NRRN(blocks=blocks, features=features)
    return save_checkpoint(Checkpoint.from_model(model, Normalisation("slice", 0.0, 1.0)), path)


def noisy_test_stack(rng_seed: int = 0, n: int = 6, size: int = 40) -> np.ndarray:
    """A small synthetic noisy stack (smooth pattern + Gaussian noise, σ 20) for training tests."""
    rng = np.random.default_rng(rng_seed)
    yy, xx = np.mgrid[:size, :size]
    clean = 100 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    stack = clean[None] + rng.normal(0, 20, (n, size, size))
    return np.clip(stack, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-building-unit, 4-channel NRRN with random weights: fast, for the daemon's mechanics."""
    return random_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    """Fail a test that leaves threads running (observers, schedulers, workers)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon
        ]
        leaked += [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and t.daemon and t.name.startswith("nrrn")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test left threads running: {[t.name for t in leaked]}"
