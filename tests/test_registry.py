"""The registry: current else base, the profile's choice, one row per checkpoint, and the
model in service switching (``daemon/serving.py``), on a real SQLite store and real checkpoints."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import random_checkpoint
from helpers import make_profile

from nrrn_daemon.daemon.serving import Serving
from nrrn_daemon.errors import CheckpointError, StoreError
from nrrn_daemon.model.checkpoints import BASE_CHECKPOINT, load_checkpoint
from nrrn_daemon.registry import (
    current_checkpoint,
    find_checkpoint,
    is_base,
    profile_checkpoint,
    record_checkpoint,
)
from nrrn_daemon.states import ModelKind
from nrrn_daemon.store.store import Store


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "db.sqlite") as s:
        yield s


def _dataset(store: Store, name: str = "ds") -> int:
    return store.ensure_dataset(name=name, watch_folder=f"/acq/{name}", profile_name="t")


def test_current_is_the_promoted_model_else_the_base(store: Store, tmp_path: Path) -> None:
    ds = _dataset(store)
    assert current_checkpoint(store, ds) == BASE_CHECKPOINT
    assert current_checkpoint(store, None) == BASE_CHECKPOINT
    path = random_checkpoint(tmp_path / "ft.pt")
    model_id = record_checkpoint(store, path, load_checkpoint(path), ds)
    store.set_current_model(ds, model_id, promoted=True)
    assert current_checkpoint(store, ds) == path
    assert profile_checkpoint("dataset", store, ds) == path
    assert profile_checkpoint("base", store, ds) == BASE_CHECKPOINT
    assert profile_checkpoint(str(tmp_path / "x.pt"), store, ds) == tmp_path / "x.pt"


def test_one_row_per_checkpoint_labelled_base_or_model(store: Store, tmp_path: Path) -> None:
    ds = _dataset(store)
    base = load_checkpoint(BASE_CHECKPOINT)
    base_id = record_checkpoint(store, BASE_CHECKPOINT, base, ds)
    assert store.model_label(base_id) == f"base-{base.short_sha}"
    assert is_base(BASE_CHECKPOINT) and not is_base(tmp_path / "base.pt")
    path = random_checkpoint(tmp_path / "m.pt", seed=3)
    ckpt = load_checkpoint(path)
    first = record_checkpoint(store, path, ckpt, ds)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    assert record_checkpoint(store, copy, load_checkpoint(copy), ds) == first  # by sha256
    assert store.model_label(first) == f"model-{ckpt.short_sha}"
    rows = (
        sqlite3.connect(store.path)
        .execute("SELECT id, kind, dataset_id FROM model_versions ORDER BY id")
        .fetchall()
    )
    assert rows == [(base_id, ModelKind.BASE.value, None), (first, ModelKind.FINETUNED.value, ds)]


def test_find_checkpoint_by_label_file_or_current(store: Store, tmp_path: Path) -> None:
    ds = _dataset(store)
    path = random_checkpoint(tmp_path / "m.pt", seed=4)
    ckpt = load_checkpoint(path)
    model_id = record_checkpoint(store, path, ckpt, ds)
    assert find_checkpoint(store, ds, None) == BASE_CHECKPOINT.absolute()
    assert find_checkpoint(store, ds, str(path)) == path.absolute()
    assert find_checkpoint(store, ds, store.model_label(model_id)) == path.absolute()
    with pytest.raises(StoreError, match="or give a checkpoint file"):
        find_checkpoint(store, ds, "no-such-model")


def test_serving_switches_models_and_names_each_for_provenance(tmp_path: Path) -> None:
    first = random_checkpoint(tmp_path / "first.pt", seed=1)
    second = random_checkpoint(tmp_path / "second.pt", seed=2)
    profile = make_profile(tmp_path, first, **{"model.checkpoint": "dataset"})
    with Store(profile.store.database) as store:
        ds = _dataset(store)
        model_id = record_checkpoint(store, first, load_checkpoint(first), ds)
        store.set_current_model(ds, model_id, promoted=True)
        serving = Serving(profile, store, ds)
        denoiser, model = serving.get()
        assert model.path == str(first) and model.store_id == model_id
        assert serving.current_path() == str(first)
        image = np.random.default_rng(0).integers(0, 255, (24, 24), dtype=np.uint8)
        before = denoiser.denoise(image, [image, image])
        serving.switch(str(second))
        denoiser2, model2 = serving.get()
        assert model2.path == str(second) and model2.store_id != model_id
        assert model2.label == f"model-{load_checkpoint(second).short_sha}"
        assert not np.array_equal(before, denoiser2.denoise(image, [image, image]))
        broken = tmp_path / "broken.pt"
        broken.write_bytes(second.read_bytes()[:100])
        with pytest.raises(CheckpointError):
            serving.switch(str(broken))
        assert serving.get()[1] == model2  # the model in service stays
