"""The overlapped daemon: each slice read once and never stale, the same outputs as the
synchronous design, bounded memory, and a stop that leaves every output whole and recorded."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_daemon import NAME, Running, current_outputs, make_profile

from nrrn_daemon.daemon import arrivals, slicecache
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.daemon.pipeline import CACHE_SLICES, Job, Pipeline
from nrrn_daemon.daemon.slicecache import SliceCache, load_slice
from nrrn_daemon.errors import InputError
from nrrn_daemon.files import sha256_file
from nrrn_daemon.imaging import tiff as imageio
from nrrn_daemon.imaging import tiffwrite
from nrrn_daemon.imaging.tiff import read_slice
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.registry import ModelInfo
from nrrn_daemon.sim.microscope import Microscope, encode_tiff
from nrrn_daemon.slices import SliceRef
from nrrn_daemon.states import OutputReason, SliceState
from nrrn_daemon.store.store import Store
from nrrn_daemon.triplets import Work, WorkMode


@pytest.fixture
def vol() -> np.ndarray:
    rng = np.random.default_rng(5)
    base = rng.integers(40, 200, size=(1, 48, 40)).astype(np.float32)
    stack = np.repeat(base, 8, axis=0) + rng.normal(0, 12, size=(8, 48, 40))
    return np.clip(stack, 0, 255).astype(np.uint8)


# -- the slice cache ---------------------------------------------------------------------------


def test_one_read_gives_the_file_hash_and_the_same_slice_as_read_slice(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 65535, (40, 32), dtype=np.uint16)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, image, description="original", resolution=(100, 100))
    loaded = load_slice(path, "rows", 8)
    reference = read_slice(path, "rows", 8)
    assert loaded.sha256 == sha256_file(path)
    assert loaded.stable and loaded.size == path.stat().st_size
    np.testing.assert_array_equal(loaded.image.pixels, reference.pixels)
    np.testing.assert_array_equal(loaded.image.databar, reference.databar)
    assert loaded.image.tags == reference.tags
    assert loaded.image.description == reference.description == "original"


def test_the_cache_never_serves_changed_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 255, (32, 40), dtype=np.uint8) for _ in range(3))
    path = tmp_path / "s.tif"
    path.write_bytes(encode_tiff(a))
    cache = SliceCache(4)
    first = cache.load(path)
    assert cache.load(path) is first and (cache.reads, cache.hits) == (1, 1)
    # Rewritten in place with the same size, mtime put back: the change time still tells.
    # (Timestamps have a granularity of a few ms: the rewrite comes later than that.)
    time.sleep(0.05)
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(encode_tiff(b))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = cache.load(path)
    np.testing.assert_array_equal(second.image.pixels, b)
    assert second.sha256 == sha256_file(path) != first.sha256
    # Replaced by a rename (another inode), then deleted.
    (tmp_path / "new.tif").write_bytes(encode_tiff(c))
    os.replace(tmp_path / "new.tif", path)
    np.testing.assert_array_equal(cache.load(path).image.pixels, c)
    path.unlink()
    assert cache.get(path) is None
    with pytest.raises(InputError, match="not found"):
        cache.load(path)
    assert cache.reads == 3


def test_the_cache_holds_at_most_its_capacity(tmp_path: Path) -> None:
    cache = SliceCache(2)
    paths = []
    for k in range(5):
        paths.append(tmp_path / f"s{k}.tif")
        paths[-1].write_bytes(encode_tiff(np.full((8, 8), k, np.uint8)))
        cache.load(paths[-1])
        assert len(cache) <= 2
    assert cache.get(paths[0]) is None and cache.get(paths[4]) is not None  # oldest went first
    assert len(SliceCache(0)) == 0 and SliceCache(0).load(paths[1]).image.pixels[0, 0] == 1


def test_the_completeness_check_agrees_with_a_full_decode_without_reading_pixels(
    tmp_path: Path,
) -> None:
    data = encode_tiff(np.random.default_rng(2).integers(0, 255, (64, 48), dtype=np.uint8))
    path = tmp_path / "s.tif"
    for cut in [*range(0, len(data), max(1, len(data) // 40)), len(data) - 1, len(data)]:
        path.write_bytes(data[:cut])  # a file as a writer leaves it at any moment
        ok, reason = SliceCache.check(path)
        assert ok == imageio.slice_is_complete(path)[0], (cut, reason)
        assert ok == (cut == len(data)) and (ok or "cannot read" in reason)
    # The one difference: a corrupt compressed strip is found when the slice is read.
    image = np.random.default_rng(3).integers(0, 255, (64, 48), dtype=np.uint8)
    tifffile.imwrite(path, image, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(raw))
    assert SliceCache.check(path) == (True, "") and not imageio.slice_is_complete(path)[0]
    with pytest.raises(InputError, match="cannot decode"):
        SliceCache(4).load(path)


# -- the daemon with the pipeline --------------------------------------------------------------


def test_each_slice_is_read_once_in_a_live_acquisition(tmp_path, tiny_checkpoint, vol, monkeypatch):
    reads: Counter[str] = Counter()
    real_read_bytes = slicecache.read_bytes

    def counting(path: Path):
        reads[Path(path).name] += 1
        return real_read_bytes(path)

    def forbidden(path, *args, **kwargs):
        raise AssertionError(f"{path} read outside the slice cache")

    monkeypatch.setattr(slicecache, "read_bytes", counting)
    monkeypatch.setattr(slicecache, "read_slice", forbidden)
    monkeypatch.setattr(arrivals, "sha256_file", forbidden)
    profile = make_profile(tmp_path, tiny_checkpoint)
    scope = Microscope(tmp_path / "raw", vol, NAME, interval_s=0.3, chunks=1)
    with Running(profile) as run:
        scope.start()
        run.wait_for(lambda: len(set(run.outputs)) == len(vol))
        scope.stop()
        cache = run.daemon.cache
    names = [NAME.format(k) for k in range(len(vol))]
    assert sorted(current_outputs(profile.store.database)) == names
    # Decode check, sha256, shape and all three units that use a slice: one read.
    assert reads == dict.fromkeys(names, 1)
    assert cache.reads == len(vol) and cache.hits >= 3 * (len(vol) - 2)


def test_outputs_are_identical_to_the_synchronous_daemon(tmp_path, tiny_checkpoint, vol):
    files: dict[bool, dict[str, bytes]] = {}
    for overlap in (True, False):
        root = tmp_path / ("overlap" if overlap else "sync")
        profile = make_profile(root, tiny_checkpoint, **{"grouping.neighbour_wait_s": 30.0})
        Microscope(root / "raw", vol, NAME, interval_s=0.0, chunks=1).run()
        with Store(profile.store.database) as store:
            daemon = Daemon(profile, store, overlap=overlap)
            assert daemon.work(burst=True) == "burst complete"
            if overlap:  # a burst: each slice read once, the two edges (done last) twice at most
                assert len(vol) <= daemon.cache.reads <= len(vol) + 2
            for k in range(len(vol)):  # every input recorded with the sha256 of its file
                (out,) = store.provenance(NAME.format(k))["outputs"]
                for item in out["inputs"]:
                    assert item["sha256"] == sha256_file(Path(item["path"]))
        files[overlap] = {p.name: p.read_bytes() for p in sorted((root / "out").iterdir())}
    assert sorted(files[True]) == [NAME.format(k) for k in range(len(vol))]
    assert files[True] == files[False]  # byte for byte: pixels, metadata and description


def test_a_stop_during_a_write_finishes_and_records_it(tmp_path, tiny_checkpoint, vol, monkeypatch):
    writing: list[str] = []
    in_write, stop_asked = threading.Event(), threading.Event()
    real_atomic_write = tiffwrite.atomic_write

    def slow_atomic_write(path, render, hint):
        def slow_render(fh):
            render(fh)
            writing.append(Path(path).name)
            in_write.set()
            # the stop comes now, the file half made: it is finished once the stop is asked
            assert stop_asked.wait(120), "the test never asked the daemon to stop"

        return real_atomic_write(path, slow_render, hint)

    monkeypatch.setattr(tiffwrite, "atomic_write", slow_atomic_write)
    profile = make_profile(tmp_path, tiny_checkpoint)
    Microscope(tmp_path / "raw", vol, NAME, interval_s=0.0, chunks=1).run()
    with Running(profile) as run:
        assert in_write.wait(120), "no output was written"
        run.daemon.request_stop("SIGTERM")
        stop_asked.set()
        run.thread.join(10)  # the bound for a stop (SIGTERM < 10 s)
        assert not run.thread.is_alive()
    assert run.reason == "SIGTERM"
    outs = current_outputs(profile.store.database)
    assert writing[0] in outs  # the write in flight was finished and recorded
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(outs)  # no half-written or unrecorded file
    for rec in outs.values():
        assert sha256_file(Path(rec["path"])) == rec["sha"]
    with Store(profile.store.database, readonly=True) as store:
        states = {
            row.name: row.state
            for row in store.slices_in_state(run.daemon.dataset_id, list(SliceState))
        }
    # Denoised exactly when an output is recorded; the others are ready (or not taken in yet),
    # and the next start denoises them.
    assert {name for name, state in states.items() if state == SliceState.DENOISED} == set(outs)
    assert {states[name] for name in states.keys() - set(outs)} <= {SliceState.READY}


def test_memory_held_by_the_pipeline_is_bounded(tmp_path, tiny_checkpoint, vol, monkeypatch):
    real_atomic_write = tiffwrite.atomic_write
    piled_up = threading.Event()  # set by the test once the model has outputs waiting

    def slow_atomic_write(path, render, hint):  # the writer is the bottleneck: outputs pile up
        assert piled_up.wait(120), "the model never got ahead of the held writer"
        time.sleep(0.05)  # and stays a little slow, so outputs keep waiting for it
        return real_atomic_write(path, render, hint)

    monkeypatch.setattr(tiffwrite, "atomic_write", slow_atomic_write)
    profile = make_profile(tmp_path, tiny_checkpoint)
    stack = np.concatenate([vol, vol[::-1], vol])  # 24 slices
    Microscope(tmp_path / "raw", stack, NAME, interval_s=0.0, chunks=1).run()
    cache_sizes: list[int] = []
    deadline = time.monotonic() + 300  # fails only a pipeline that hangs
    with Running(profile) as run:
        pipeline = run.daemon.pipeline
        while len(set(run.outputs)) < len(stack):
            cache_sizes.append(len(run.daemon.cache))
            if pipeline.peak_outputs >= 3:  # one held by the writer, one queued, one in the model
                piled_up.set()
            assert run.thread.is_alive(), run.reason
            assert time.monotonic() < deadline, f"outputs so far: {run.outputs}"
            time.sleep(0.01)
    assert max(cache_sizes) <= CACHE_SLICES
    assert pipeline.peak_inputs <= 2  # one unit denoised, one read ahead
    assert pipeline.peak_outputs <= 3  # one being written, one queued, one waiting in the model
    assert pipeline.peak_outputs >= 2  # the slow writer did make outputs wait
    assert len(current_outputs(profile.store.database)) == len(stack)


# -- the pipeline on its own -------------------------------------------------------------------


def test_results_come_back_in_order_and_a_failed_read_does_not_stop_the_rest(
    tmp_path, tiny_checkpoint, vol
):
    refs = []
    for k in range(3):
        path = tmp_path / NAME.format(k)
        path.write_bytes(encode_tiff(vol[k]))
        refs.append(SliceRef(path=path, name=path.name, index=k))
    missing = SliceRef(path=tmp_path / NAME.format(9), name=NAME.format(9), index=9)
    denoiser = Denoiser(load_checkpoint(tiny_checkpoint), device="cpu", tile=64)
    model = ModelInfo(label="tiny", sha256="0" * 64, path=str(tiny_checkpoint), store_id=1)
    done_event = threading.Event()
    pipeline = Pipeline(
        load=SliceCache(4).load,
        serving=lambda: (denoiser, model),
        output_folder=tmp_path,
        wake=done_event.set,
    )
    works = [
        Work(refs[1], (refs[0], refs[2]), WorkMode.TRIPLET),
        Work(refs[2], (refs[1], missing), WorkMode.TRIPLET),
        Work(refs[0], (refs[1],), WorkMode.PAIR),
    ]
    pipeline.start()
    try:
        for k, work in enumerate(works):
            pipeline.submit(Job(work, OutputReason.FIRST, f"out{k}.tif"))
        done = []
        deadline = time.monotonic() + 30
        while len(done) < 3 and time.monotonic() < deadline:
            done_event.wait(0.1)
            done_event.clear()
            done += pipeline.collect()
    finally:
        assert pipeline.close() == []
    assert [d.job.output_name for d in done] == ["out0.tif", "out1.tif", "out2.tif"]
    assert isinstance(done[1].error, InputError) and "not found" in str(done[1].error)
    assert done[0].record is not None and done[2].record is not None
    reference = denoiser.denoise(vol[1], [vol[0], vol[2]])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out0.tif"), reference)
    assert done[0].record.input_sha256 == [sha256_file(r.path) for r in refs[1::-1] + refs[2:]]
    assert not (tmp_path / "out1.tif").exists() and pipeline.idle
