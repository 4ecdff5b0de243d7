"""The daemon and ``reprocess`` on CUDA (``cuda`` marker).

* the daemon in burst mode on the GPU: the microscope fixture writes noisy FIB-25 slices into a
  real folder, a real observer sees them, the base checkpoint denoises them on CUDA (precision
  and compilation ``auto``: bf16 and compiled on a modern GPU), and every output is within one
  grey level of the CPU's float32 result, recorded with its CUDA device;
* ``reprocess`` starts one Dask worker per visible GPU, and worker ``n`` runs on ``cuda:n``.
"""

from __future__ import annotations

import sqlite3
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from cuda_helpers import compile_in_the_calling_thread, max_grey_diff  # noqa: F401 - a fixture

from nrrn_daemon.batch.reprocess import dask_cluster, plan_reprocess, run_plan
from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.model.checkpoints import BASE_CHECKPOINT, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.store.store import Store

pytestmark = pytest.mark.cuda

NAME = "slice_{:04d}.tif"


@pytest.fixture(scope="module")
def noisy(fib25: np.ndarray) -> np.ndarray:
    """8 noisy FIB-25 slices (Poisson peak 4), full 250² size."""
    return noisy_stack(fib25[0:8], "poisson:4", seed=4)


def cpu_reference(noisy: np.ndarray, k: int) -> np.ndarray:
    den = Denoiser(load_checkpoint(BASE_CHECKPOINT), device="cpu", tile=512,
                   precision="float32", compile="off")  # fmt: skip
    neighbours = [noisy[j] for j in (k - 1, k + 1) if 0 <= j < len(noisy)]
    return den.denoise(noisy[k], neighbours)


@pytest.mark.usefixtures("compile_in_the_calling_thread")
def test_the_daemon_in_burst_mode_on_cuda(tmp_path: Path, noisy):
    raw = tmp_path / "raw"
    Microscope(raw, noisy, NAME, interval_s=0.0, chunks=3, chunk_pause_s=0.02).run()
    db = tmp_path / "state" / "db.sqlite"
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(raw), "output.folder": str(tmp_path / "out"),
            "store.database": str(db), "model.checkpoint": str(BASE_CHECKPOINT),
            "model.device": "cuda", "watch.settle_s": 0.2, "watch.glob": "slice_*.tif",
            "watch.index_regex": r"slice_(?P<index>\d+)\.tif$", "watch.observer": "native",
            "grouping.neighbour_wait_s": 1.0,
        },
    )  # fmt: skip
    expected_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    with Store(db) as store:
        daemon = Daemon(profile, store)
        assert daemon.denoiser.device.startswith("cuda:")
        assert daemon.denoiser.precision == expected_precision
        assert daemon.work(burst=True) == "burst complete"
        assert daemon.denoiser.compiled, "compile 'auto' on CUDA, and no fallback"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT s.name, o.mode, o.path, o.device FROM outputs o "
        "JOIN slices s ON s.id = o.centre_slice_id WHERE o.is_current ORDER BY s.name"
    ).fetchall()
    con.close()
    assert [r[0] for r in rows] == [NAME.format(k) for k in range(len(noisy))]
    for k, (_, mode, path, device) in enumerate(rows):
        assert device.startswith("cuda:")
        assert mode == ("pair" if k in (0, len(noisy) - 1) else "triplet")
        out = tifffile.imread(path)
        assert out.shape == noisy[k].shape and out.dtype == np.uint8
        assert max_grey_diff(out, cpu_reference(noisy, k)) <= 1, NAME.format(k)


@pytest.fixture(scope="module")
def gpu_cluster():
    """A LocalCluster started with the defaults: one worker process per visible GPU."""
    with dask_cluster() as started:
        yield started


def test_reprocess_runs_one_worker_per_visible_gpu(tmp_path: Path, noisy, gpu_cluster) -> None:
    count = torch.cuda.device_count()
    raw = tmp_path / "raw"
    raw.mkdir()
    stack = np.concatenate([noisy] * max(1, -(-4 * count // len(noisy))))  # ≥ 4 slices a GPU
    for k, plane in enumerate(stack):
        tifffile.imwrite(raw / f"slice_{k:03d}.tif", plane)
    with Store(tmp_path / "db.sqlite") as store:
        plan = plan_reprocess(str(raw), store, model=str(BASE_CHECKPOINT),
                              output=tmp_path / "out", device="auto")  # fmt: skip
        summary = run_plan(plan, store, lambda: nullcontext(gpu_cluster))
    assert summary.workers == count
    assert (summary.recorded, summary.failed) == (len(stack), [])
    if count == 1:
        assert summary.devices == {"cuda:0"}
    else:  # worker n takes cuda:n; every worker got work with ≥ 4 slices each
        assert summary.devices == {f"cuda:{n}" for n in range(count)}
    for k in (1, 3):
        got = tifffile.imread(tmp_path / "out" / f"slice_{k:03d}.tif")
        assert max_grey_diff(got, cpu_reference(noisy, k)) <= 1
