"""Shared fixtures: real FIB-25 slices, a real small disk, and a guard against leaked threads."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

# Two cores on CI: keep torch from oversubscribing them when tests run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
FIB25 = REPO / "tests" / "data" / "fib25_z200-231.tif"
"""Real FIB-SEM slices shipped with the tests (FIB-25 z = 200–231; see tests/data/README.md)."""
FIB25_SHA256 = "747a27f8d5d6e309b8765205b212e3eaa49875e5a42d539d116e64e3309bb1b0"
PAPER_BASE = REPO / "tests" / "data" / "paper-base.pt"
"""The paper-network base shipped before the blind-spot one (see tests/data/README.md)."""


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
def paper_base() -> object:
    """The paper-network (not blind-spot) base checkpoint, for tests of the paper's forward."""
    from nrrn_daemon.model.checkpoints import load_checkpoint

    return load_checkpoint(PAPER_BASE)


@pytest.fixture(scope="session")
def fib25_path() -> Path:
    """Path of the real FIB-SEM slices in the repository (32 × 250 × 250 uint8, ZYX)."""
    return FIB25


@pytest.fixture(scope="session")
def fib25(fib25_path: Path) -> np.ndarray:
    """The real FIB-SEM slices as a (32, 250, 250) uint8 array (FIB-25 z = 200–231, held out
    from the base checkpoint's training), read once per session."""
    import tifffile

    vol = tifffile.imread(fib25_path)
    vol.setflags(write=False)
    return vol


SHARED_FIB25 = Path(
    os.environ.get(
        "NRRN_FIB25", REPO.parent / "shared" / "data" / "fib25" / "fib25_sample1_250.tif"
    )
)
"""The whole shared FIB-25 volume (250³), beside the repository on CI; absent on a fresh clone."""


@pytest.fixture(scope="session")
def fib25_volume() -> np.ndarray:
    """The whole shared FIB-25 volume (250 × 250 × 250 uint8), for the checks that need every
    slice; skips where it is absent (a fresh clone: the tests/data slices cover the rest)."""
    if not SHARED_FIB25.exists():
        pytest.skip(f"the whole FIB-25 volume is not at {SHARED_FIB25} (set NRRN_FIB25)")
    import tifffile

    vol = tifffile.imread(SHARED_FIB25)
    vol.setflags(write=False)
    return vol


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``small_disk(name, size)``: a real tmpfs of ``size`` (e.g. ``"256k"``) mounted at a fresh
    folder, unmounted after the test. Skips where this machine cannot mount (not root, or a
    container without the right to mount)."""
    mounted: list[Path] = []

    def mount(name: str = "disk", size: str = "256k") -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True)
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs a tmpfs mount, which needs root here")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): no real full disk")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def bind_mount() -> Iterator[Callable[[Path, Path], None]]:
    """``bind_mount(source, target)``: ``mount --bind source target`` (a file or a folder),
    unmounted after the test. Skips where this machine cannot mount (not root, or a container
    without the right to mount)."""
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("a bind mount needs root here")
        done = subprocess.run(
            ["mount", "--bind", str(source), str(target)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here ({done.stderr.strip()})")
        mounted.append(target)

    try:
        yield mount
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write a filler file into ``folder`` until its file system is full; returns the filler."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        block = b"\0" * 4096
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with pytest.raises(OSError) as full:  # truly full now: not one more page
        (folder / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    (folder / "probe").unlink(missing_ok=True)
    return filler


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
    deadline = time.monotonic() + 30.0  # threads end at once; the bound only fails a leak
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


@pytest.fixture
def share(tmp_path: Path):
    """A real FUSE folder (``tests/stallfs.py``) that stops answering on demand, mounted at
    ``tmp_path / "mnt"``; skips where FUSE cannot be mounted here."""
    from stallfs import StalledShare

    why = StalledShare.unavailable()
    if why is not None:
        pytest.skip(f"no hung share can be made here: {why}")
    (tmp_path / "server").mkdir()
    (tmp_path / "mnt").mkdir()
    stalled = StalledShare(tmp_path / "server", tmp_path / "mnt", tmp_path / "stalled")
    try:
        stalled.mount()
    except OSError as exc:
        pytest.skip(f"cannot mount FUSE here: {exc}")
    yield stalled
    stalled.unmount()
