"""Arrivals: a complete slice file becomes a store row and the units it makes ready.

Real TIFF files in a real folder, a real SQLite store, the real grouper and slice cache; no
daemon loop: :meth:`Arrivals.complete` returns the ready units instead of submitting them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_daemon import make_profile

from nrrn_daemon.daemon.arrivals import Arrivals
from nrrn_daemon.daemon.loop import LiveState
from nrrn_daemon.daemon.slicecache import SliceCache
from nrrn_daemon.states import OutputReason, SliceState
from nrrn_daemon.store.store import Store
from nrrn_daemon.triplets import TripletGrouper, WorkMode


@pytest.fixture
def setup(tmp_path: Path, tiny_checkpoint: Path):
    profile = make_profile(tmp_path, tiny_checkpoint)
    raw = Path(profile.watch.folder)
    store = Store(profile.store.database)
    dataset_id = store.ensure_dataset(name=str(raw), watch_folder=str(raw), profile_name="demo")
    state = LiveState()
    events: list[tuple[str, dict]] = []
    arrivals = Arrivals(
        profile=profile, store=store, dataset_id=dataset_id, watch_folder=raw,
        grouper=TripletGrouper.from_settings(profile.grouping), cache=SliceCache(4),
        state=state, on_event=lambda kind, data: events.append((kind, data)),
    )  # fmt: skip
    yield arrivals, raw, store, dataset_id, state, events
    store.close()


def _write(raw: Path, index: int, image: np.ndarray) -> Path:
    path = raw / f"slice_{index:03d}.tif"
    tifffile.imwrite(path, image)
    return path


def test_the_third_slice_makes_the_middle_one_ready_as_a_triplet(setup) -> None:
    arrivals, raw, store, dataset_id, state, events = setup
    rng = np.random.default_rng(0)
    paths = [_write(raw, i, rng.integers(0, 255, (32, 32), dtype=np.uint8)) for i in range(3)]
    assert arrivals.complete(paths[0], now=0.0) == []
    assert arrivals.complete(paths[1], now=0.1) == []
    ready = arrivals.complete(paths[2], now=0.2)
    assert len(ready) == 1
    (work, reason) = ready[0]
    assert reason is None and work.mode == WorkMode.TRIPLET and work.centre.index == 1
    assert [n.index for n in work.neighbours] == [0, 2]
    rows = store.slices_in_state(dataset_id, [SliceState.READY])
    assert sorted(r.index for r in rows) == [0, 1, 2]
    assert all(r.sha256 and len(r.sha256) == 64 for r in rows)
    assert state.seen == 3 and [k for k, _ in events] == ["ready"] * 3


def test_a_slice_of_another_size_fails_with_both_sizes_and_makes_nothing_ready(setup) -> None:
    arrivals, raw, store, dataset_id, state, events = setup
    first = _write(raw, 0, np.zeros((32, 32), np.uint8))
    odd = _write(raw, 1, np.zeros((40, 32), np.uint8))
    arrivals.complete(first, now=0.0)
    assert arrivals.complete(odd, now=0.1) == []
    (row,) = store.slices_in_state(dataset_id, [SliceState.FAILED])
    assert row.name == odd.name and "40" in (row.reason or "") and "32" in (row.reason or "")
    assert state.failed == 1 and events[-1][0] == "failed"


def test_a_name_without_an_index_is_recorded_as_failed(setup) -> None:
    arrivals, raw, store, dataset_id, _, _ = setup
    path = raw / "slice_x.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    assert arrivals.complete(path, now=0.0) == []
    (row,) = store.slices_in_state(dataset_id, [SliceState.FAILED])
    assert row.name == "slice_x.tif" and "index" in (row.reason or "")


def test_new_content_under_a_denoised_name_is_redone_with_the_same_neighbours(setup) -> None:
    arrivals, raw, store, dataset_id, _, _ = setup
    rng = np.random.default_rng(1)
    paths = [_write(raw, i, rng.integers(0, 255, (32, 32), dtype=np.uint8)) for i in range(3)]
    ((work, _),) = [r for p in paths for r in arrivals.complete(p, now=0.0)]
    rows = {r.index: r for r in store.slices_in_state(dataset_id, [SliceState.READY])}
    model_id = store.ensure_model(sha256="m" * 64, path="/m.pt", label="m", kind="base", config={})
    store.record_output(
        dataset_id=dataset_id, centre_slice_id=rows[1].id,
        inputs=[(rows[i].id, role, rows[i].sha256) for i, role in ((1, "centre"), (0, "prev"),
                                                                    (2, "next"))],
        path=str(raw.parent / "out" / "slice_001.tif"), sha256="o" * 64, mode="triplet",
        model_id=model_id, settings={}, device="cpu", ready_at=0.0, started_at=0.0,
        finished_at=1.0, read_s=0.0, model_s=0.0, write_s=0.0, reason=OutputReason.FIRST,
        run_id=None,
    )  # fmt: skip
    assert store.get_slice(dataset_id, str(paths[1])).state == SliceState.DENOISED
    tifffile.imwrite(paths[1], rng.integers(0, 255, (32, 32), dtype=np.uint8))  # rewritten
    ((redo, reason),) = arrivals.complete(paths[1], now=5.0)
    assert reason == OutputReason.INPUT_CHANGED
    assert redo.mode == WorkMode.TRIPLET and [n.index for n in redo.neighbours] == [0, 2]
    (row,) = [r for r in store.slices_in_state(dataset_id, [SliceState.READY]) if r.index == 1]
    assert row.sha256 != rows[1].sha256  # the new content's hash is recorded
    assert arrivals.complete(paths[1], now=6.0) == []  # reported again: nothing more to do
