"""Helpers shared by test modules in several folders (importable: ``tests`` is on pythonpath)."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import random_checkpoint

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.store.store import Store


@pytest.fixture
def one_thread():
    """Two shared cores: one torch thread is several times faster than two fighting ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(folder: Path, noisy: np.ndarray, parent: Path) -> Path:
    """Raw slice files recorded (ready) in a fresh database; returns the database path."""
    (folder / "raw").mkdir(parents=True)
    db = folder / "state" / "db.sqlite"
    with Store(db) as store:
        ds = store.ensure_dataset("ds", str(folder / "raw"), "test")
        for i, image in enumerate(noisy):
            path = folder / "raw" / f"slice_{i:04d}.tif"
            tifffile.imwrite(path, image)
            store.upsert_slice(ds, path=str(path), name=path.name, index=i, scan=None,
                               size=path.stat().st_size, mtime=path.stat().st_mtime, sha256="x",
                               state="ready")  # fmt: skip
    return db


def tiny_parent(path: Path, seed: int = 0) -> Path:
    return random_checkpoint(path, blocks=1, features=8, seed=seed)


def write_profile(folder: Path, parent: Path, **finetune: object) -> Path:
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in finetune.items())
    text = f"""
name = "ftest"
[watch]
folder = "{folder / "raw"}"
glob = "slice_*.tif"
index_regex = 'slice_(?P<index>\\d+)\\.tif$'
observer = "polling"
poll_interval_s = 0.1
settle_s = 0.2
rescan_interval_s = 1.0
[grouping]
neighbour_wait_s = 1.0
[output]
folder = "{folder / "out"}"
[store]
database = "{folder / "state" / "db.sqlite"}"
[model]
checkpoint = "{parent}"
device = "cpu"
tile = 64
[finetune]
{extra}
"""
    path = folder / "ftest.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def zarr_io_threads(tmp_path_factory):
    """Zarr's I/O pool and dask's threaded scheduler pool (ome-zarr reads through dask) live as
    long as the process (shared, not leaked): bound zarr's and start both before the per-test
    thread-leak check takes its snapshot."""
    with zarr.config.set({"threading.max_workers": 2}):
        array = zarr.create_array(
            tmp_path_factory.mktemp("warm") / "a.zarr", shape=(8, 8), chunks=(2, 2), dtype="u1"
        )
        array[...] = 1
        assert array[...].sum() == 64
        assert int(da.from_zarr(array).sum().compute(scheduler="threads")) == 64
        yield


def make_profile(tmp_path: Path, ckpt: Path, **extra: object):
    overrides = {
        "watch.folder": str(tmp_path / "raw"),
        "output.folder": str(tmp_path / "out"),
        "store.database": str(tmp_path / "state" / "db.sqlite"),
        "model.checkpoint": str(ckpt),
        "model.device": "cpu",
        "model.tile": 64,
        "watch.settle_s": 0.2,
        "watch.rescan_interval_s": 1.0,
        "grouping.neighbour_wait_s": 1.0,
        "watch.glob": "slice_*.tif",
        "watch.index_regex": r"slice_(?P<index>\d+)\.tif$",
    }
    overrides.update({k: v for k, v in extra.items()})
    (tmp_path / "raw").mkdir(parents=True, exist_ok=True)
    return load_profile("demo", overrides=overrides)
