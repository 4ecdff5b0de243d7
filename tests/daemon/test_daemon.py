"""End to end: a real watchdog observer on real folders, a microscope writing TIFFs slowly, the real
SQLite file and a real (tiny) NRRN on the CPU."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import fill_disk
from helpers import make_profile  # noqa: F401  (other test modules import it from here)

from nrrn_daemon import files
from nrrn_daemon.daemon import loop as daemon_mod
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.errors import NRRNError
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.sim.microscope import Microscope, encode_tiff, write_slowly
from nrrn_daemon.store.store import Store

NAME = "slice_{:04d}.tif"


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, size=(1, 48, 40)).astype(np.float32)
    vol = np.repeat(base, 9, axis=0) + rng.normal(0, 12, size=(9, 48, 40))
    return np.clip(vol, 0, 255).astype(np.uint8)


class Running:
    """The daemon's loop in a thread (signals are the subprocess tests' business)."""

    def __init__(self, profile, **daemon_options: object) -> None:
        self.store = Store(profile.store.database)
        self.outputs: list[str] = []
        self.daemon = Daemon(profile, self.store, on_event=self._event, **daemon_options)
        self.reason: str | None = None
        self.thread = threading.Thread(target=self._run, name="nrrn-test-daemon")

    def _event(self, kind: str, data: dict) -> None:
        if kind == "output":
            self.outputs.append(data["name"])

    def _run(self) -> None:
        self.reason = self.daemon.work()

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def wait_for(self, predicate, timeout: float = 120.0) -> None:
        """Poll ``predicate`` until true; the bound fails only a daemon that never gets there."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.thread.is_alive(), f"daemon stopped: {self.reason}"
            assert time.monotonic() < deadline, f"timed out; outputs so far {self.outputs}"
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop("test over")
        self.thread.join(15)
        self.store.close()
        assert not self.thread.is_alive()


def tree_state(folder: Path) -> dict[str, tuple[int, float, str]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.iterdir())
    }


def current_outputs(db: Path) -> dict[str, dict]:
    with Store(db, readonly=True) as store:
        report = store.status()
        assert report["datasets"], "no data set recorded"
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT s.name, o.mode, o.version, o.path, o.sha256 FROM outputs o "
        "JOIN slices s ON s.id = o.centre_slice_id WHERE o.is_current"
    ).fetchall()
    con.close()
    return {
        name: {"mode": mode, "version": v, "path": p, "sha": sha} for name, mode, v, p, sha in rows
    }


@pytest.mark.parametrize("observer", ["native", "polling", "listing"])
def test_acquisition_end_to_end(tmp_path, tiny_checkpoint, volume, observer):
    profile = make_profile(
        tmp_path, tiny_checkpoint, **{"watch.observer": observer, "watch.poll_interval_s": 0.2}
    )
    scope = Microscope(tmp_path / "raw", volume, NAME, interval_s=0.1, chunks=4, chunk_pause_s=0.1)
    with Running(profile) as run:
        scope.start()
        run.wait_for(lambda: len(set(run.outputs)) == len(volume))
        scope.stop()
        raw_before = tree_state(tmp_path / "raw")
    # Every slice has one current output of the same shape and dtype; interior ones as triplets.
    outs = current_outputs(profile.store.database)
    assert sorted(outs) == [NAME.format(k) for k in range(len(volume))]
    for k in range(len(volume)):
        rec = outs[NAME.format(k)]
        expected = "pair" if k in (0, len(volume) - 1) else "triplet"
        assert rec["mode"] == expected, (k, rec)
        out = tifffile.imread(rec["path"])
        assert out.shape == volume[k].shape and out.dtype == np.uint8
        assert Path(rec["path"]).parent == tmp_path / "out"
        assert files.sha256_file(Path(rec["path"])) == rec["sha"]
    # The raw folder was only read.
    assert tree_state(tmp_path / "raw") == raw_before
    assert sorted(raw_before) == [NAME.format(k) for k in range(len(volume))]
    assert not list((tmp_path / "out").glob(".*"))


def run_in_order(
    tmp_path: Path, ckpt: Path, volume: np.ndarray, order: list[int]
) -> dict[str, np.ndarray]:
    profile = make_profile(tmp_path, ckpt, **{"grouping.neighbour_wait_s": 30.0})
    scope = Microscope(tmp_path / "raw", volume, NAME, interval_s=0.0, chunks=1, order=order)
    scope.run()
    with Store(profile.store.database) as store:
        reason = Daemon(profile, store).work(burst=True)
    assert reason == "burst complete"
    return {p.name: tifffile.imread(p) for p in sorted((tmp_path / "out").glob("*.tif"))}


def test_out_of_order_arrival_gives_the_same_outputs(tmp_path, tiny_checkpoint, volume):
    in_order = run_in_order(tmp_path / "a", tiny_checkpoint, volume, list(range(len(volume))))
    shuffled = run_in_order(tmp_path / "b", tiny_checkpoint, volume, [4, 0, 8, 2, 6, 1, 7, 3, 5])
    assert sorted(in_order) == sorted(shuffled) and len(in_order) == len(volume)
    for name in in_order:
        np.testing.assert_array_equal(in_order[name], shuffled[name])


def test_missing_slice_pairs_then_redoes_as_triplets(tmp_path, tiny_checkpoint, volume):
    profile = make_profile(tmp_path, tiny_checkpoint)
    scope = Microscope(tmp_path / "raw", volume, NAME, interval_s=0.0, chunks=1)
    with Running(profile) as run:
        for k in (0, 1, 2, 4, 5, 6):
            scope.write(k)
        # 3 is missing: 2 and 4 go as pairs after the wait (1 s), with the neighbour they have.
        run.wait_for(lambda: {NAME.format(k) for k in (0, 1, 2, 4, 5, 6)} <= set(run.outputs))
        outs = current_outputs(profile.store.database)
        assert outs[NAME.format(2)]["mode"] == "pair" and outs[NAME.format(4)]["mode"] == "pair"
        assert outs[NAME.format(1)]["mode"] == "triplet"
        scope.write(3)
        run.wait_for(
            lambda: (
                run.outputs.count(NAME.format(2)) == 2 and run.outputs.count(NAME.format(4)) == 2
            )
        )
        run.wait_for(lambda: NAME.format(3) in run.outputs)
    outs = current_outputs(profile.store.database)
    assert outs[NAME.format(3)]["mode"] == "triplet"
    for k in (2, 4):  # re-done as triplets; both versions kept
        assert outs[NAME.format(k)] == {**outs[NAME.format(k)], "mode": "triplet", "version": 2}
    with Store(profile.store.database, readonly=True) as store:
        report = store.provenance(NAME.format(2))
    versions = sorted((o["version"], o["mode"], o["is_current"]) for o in report["outputs"])
    assert versions == [(1, "pair", False), (2, "triplet", True)]


def test_truncated_file_fails_and_the_rest_goes_on(tmp_path, tiny_checkpoint, volume):
    profile = make_profile(tmp_path, tiny_checkpoint)
    raw = tmp_path / "raw"
    scope = Microscope(raw, volume, NAME, interval_s=0.0, chunks=1)
    for k in range(4):
        scope.write(k)
    data = encode_tiff(volume[4])
    (raw / NAME.format(4)).write_bytes(data[: len(data) // 2])  # a truncated slice
    (raw / "slice_notanumber.tif").write_bytes(encode_tiff(volume[5]))  # a wrong name
    with Running(profile) as run:
        run.wait_for(lambda: {NAME.format(k) for k in range(4)} <= set(run.outputs), timeout=40)
        db = profile.store.database

        def failed() -> dict[str, str]:
            with Store(db, readonly=True) as store:
                ds = store.status()["datasets"][0]
            return {f["name"]: f["reason"] for f in ds["failed"]}

        run.wait_for(
            lambda: NAME.format(4) in failed() and "slice_notanumber.tif" in failed(), timeout=40
        )
    reasons = failed()
    assert (
        "truncated" in reasons[NAME.format(4)].lower()
        or "cannot" in reasons[NAME.format(4)].lower()
    )
    assert "index" in reasons["slice_notanumber.tif"].lower()
    assert NAME.format(4) not in {p.name for p in (tmp_path / "out").iterdir()}


def test_duplicate_content_is_not_redone_and_other_size_fails(tmp_path, tiny_checkpoint, volume):
    profile = make_profile(tmp_path, tiny_checkpoint)
    raw = tmp_path / "raw"
    scope = Microscope(raw, volume, NAME, interval_s=0.0, chunks=1)
    with Running(profile) as run:
        for k in range(3):
            scope.write(k)
        run.wait_for(lambda: len(set(run.outputs)) == 3)
        n_before = len(run.outputs)
        # The same bytes written again (new mtime): recognised by sha256, not re-done.
        time.sleep(0.05)
        scope.write(1)
        # A slice of another size: failed, not used as a neighbour.
        write_slowly(raw / NAME.format(3), encode_tiff(np.zeros((20, 20), np.uint8)))
        run.wait_for(lambda: _failed_names(profile.store.database) == {NAME.format(3)})
        # The repeat of slice 1 was taken in before slice 3 (written earlier, files are taken
        # in in order): any unit it made was submitted by now, and is recorded once done.
        run.wait_for(lambda: run.daemon.pipeline.idle)
        assert len(run.outputs) == n_before
    with Store(profile.store.database, readonly=True) as store:
        report = store.status()["datasets"][0]
    assert "20×20" in report["failed"][0]["reason"] and "48×40" in report["failed"][0]["reason"]


def _failed_names(db: Path) -> set[str]:
    with Store(db, readonly=True) as store:
        return {f["name"] for f in store.status()["datasets"][0]["failed"]}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_full_disk_keeps_the_slice_pending_and_retries(
    tmp_path, tiny_checkpoint, volume, monkeypatch, overlap
):
    # A full disk cannot be made here: os.replace raises ENOSPC for the first writes.
    monkeypatch.setattr(daemon_mod, "RETRY_S", 0.3)
    failures = {"left": 2}
    real_replace = os.replace

    def replace(src, dst):
        if failures["left"] > 0 and str(dst).startswith(str(tmp_path / "out")):
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    profile = make_profile(tmp_path, tiny_checkpoint)
    scope = Microscope(tmp_path / "raw", volume[:3], NAME, interval_s=0.0, chunks=1)
    scope.run()
    with Running(profile, overlap=overlap) as run:
        run.wait_for(lambda: len(set(run.outputs)) == 3, timeout=40)
        assert run.daemon.state.retries == 2
    assert failures["left"] == 0
    assert not list((tmp_path / "out").glob(".*.part"))
    outs = current_outputs(profile.store.database)
    assert len(outs) == 3  # nothing lost: each slice once, each file whole and as recorded
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(outs)
    for rec in outs.values():
        assert files.sha256_file(Path(rec["path"])) == rec["sha"]


def test_a_really_full_output_disk_keeps_the_slices_ready_until_space_is_freed(
    tmp_path, tiny_checkpoint, volume, monkeypatch, small_disk
):
    """The output folder on a real, full tmpfs: nothing is patched; ENOSPC is the kernel's."""
    monkeypatch.setattr(daemon_mod, "RETRY_S", 0.3)
    out = small_disk("out", "256k")
    filler = fill_disk(out)
    profile = make_profile(tmp_path, tiny_checkpoint)
    Microscope(tmp_path / "raw", volume[:3], NAME, interval_s=0.0, chunks=1).run()
    db = profile.store.database
    with Running(profile) as run:
        run.wait_for(lambda: run.daemon.state.retries >= 3, timeout=60)
        with Store(db, readonly=True) as store:
            [ds] = store.status()["datasets"]
        assert ds["outputs"] == 0 and ds["slices"]["ready"] == 3, ds["slices"]
        assert "disk full" in store_reasons(db)
        assert sorted(p.name for p in out.iterdir()) == ["filler.bin"], "no temp file left"
        filler.unlink()  # the facility frees space: the retries go through
        run.wait_for(lambda: len(set(run.outputs)) == 3, timeout=60)
    outs = current_outputs(db)
    assert len(outs) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(outs)
    for rec in outs.values():
        assert files.sha256_file(Path(rec["path"])) == rec["sha"]


def store_reasons(db: Path) -> str:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reasons = " ".join(r or "" for (r,) in con.execute("SELECT reason FROM slices"))
    con.close()
    return reasons


def test_a_full_disk_under_the_database_stops_cleanly_and_loses_nothing(
    tmp_path, tiny_checkpoint, volume, small_disk
):
    """SQLite (WAL) on a real, full tmpfs: the daemon stops with one clear line; after space is
    freed a restart denoises every slice, and the database is whole."""
    state = small_disk("state", "1m")
    db = state / "db.sqlite"
    profile = make_profile(tmp_path, tiny_checkpoint, **{"store.database": str(db)})
    scope = Microscope(tmp_path / "raw", volume[:5], NAME, interval_s=0.0, chunks=1)
    for k in range(2):
        scope.write(k)
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    filler = fill_disk(state)
    for k in range(2, 5):
        scope.write(k)
    with pytest.raises(NRRNError) as stopped:  # opening it or recording: whichever fails first
        with Store(profile.store.database) as store:
            Daemon(profile, store).work(burst=True)
    message = str(stopped.value)
    assert "db.sqlite" in message and "disk" in message.lower(), message
    filler.unlink()
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    import sqlite3

    con = sqlite3.connect(profile.store.database)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    outs = current_outputs(profile.store.database)
    assert sorted(outs) == [NAME.format(k) for k in range(5)]
    for rec in outs.values():
        assert files.sha256_file(Path(rec["path"])) == rec["sha"]


def test_status_reads_while_the_daemon_runs(tmp_path, tiny_checkpoint, volume):
    profile = make_profile(tmp_path, tiny_checkpoint)
    Microscope(tmp_path / "raw", volume[:3], NAME, interval_s=0.0, chunks=1).run()
    with Running(profile) as run:
        run.wait_for(lambda: len(set(run.outputs)) == 3)
        run.daemon._heartbeat(run.daemon._run_id)
        with Store(profile.store.database, readonly=True) as store:
            report = store.status()
        assert report["run"]["state"] == "alive"
        assert report["run"]["live"]["cpu_fallback"] in (True, False)
        ds = report["datasets"][0]
        assert ds["slices"]["denoised"] == 3 and ds["device"] == "cpu"
        assert ds["latency_s"]["count"] == 3
    with Store(profile.store.database, readonly=True) as store:
        report = store.status()
    assert report["run"]["state"] == "ended" and report["run"]["end_reason"] == "test over"


def test_changed_content_gives_a_new_output_version(tmp_path, tiny_checkpoint, volume):
    profile = make_profile(tmp_path, tiny_checkpoint)
    raw = tmp_path / "raw"
    scope = Microscope(raw, volume[:3], NAME, interval_s=0.0, chunks=1)
    with Running(profile) as run:
        scope.run()
        run.wait_for(lambda: len(set(run.outputs)) == 3)
        first = tifffile.imread(tmp_path / "out" / NAME.format(1))
        write_slowly(raw / NAME.format(1), encode_tiff(255 - volume[1]))
        run.wait_for(lambda: run.outputs.count(NAME.format(1)) == 2)
    with Store(profile.store.database, readonly=True) as store:
        report = store.provenance(NAME.format(1))
    versions = sorted(
        (o["version"], o["reason"], o["mode"], o["is_current"]) for o in report["outputs"]
    )
    assert versions == [(1, "first", "triplet", False), (2, "input-changed", "triplet", True)]
    assert not np.array_equal(tifffile.imread(tmp_path / "out" / NAME.format(1)), first)


def test_a_stop_abandons_a_long_slice_cleanly(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(3)
    big = rng.integers(0, 255, (3, 1536, 1536), dtype=np.uint8)
    profile = make_profile(tmp_path, tiny_checkpoint, **{"model.tile": 64, "model.tile_batch": 1})
    Microscope(tmp_path / "raw", big, NAME, interval_s=0.0, chunks=1).run()
    with Running(profile) as run:
        run.wait_for(lambda: run.daemon.state.current is not None, timeout=30)
        busy_with = run.daemon.state.current
        stopped = time.monotonic()
        run.daemon.request_stop("SIGTERM")
        run.thread.join(10)
        assert not run.thread.is_alive() and time.monotonic() - stopped < 10
    assert run.reason == "SIGTERM"
    assert not (tmp_path / "out" / busy_with).exists()
    assert not list((tmp_path / "out").glob(".*.part"))
    with Store(profile.store.database, readonly=True) as store:
        rows = store.slices_in_state(run.daemon.dataset_id, ["ready"])
    assert busy_with in {r.name for r in rows}


def test_repeat_scans_form_the_group(tmp_path, tiny_checkpoint, volume):
    profile = make_profile(
        tmp_path,
        tiny_checkpoint,
        **{
            "grouping.mode": "repeat-scans",
            "grouping.scans_per_slice": 3,
            "watch.index_regex": r"slice_(?P<index>\d+)_scan(?P<scan>\d+)\.tif$",
        },
    )
    raw = tmp_path / "raw"
    # Slice 7 scanned three times (the same signal, independent noise), slice 8 twice only.
    for scan, k in enumerate([0, 1, 2], start=1):
        write_slowly(raw / f"slice_0007_scan{scan}.tif", encode_tiff(volume[k]))
    for scan, k in enumerate([3, 4], start=1):
        write_slowly(raw / f"slice_0008_scan{scan}.tif", encode_tiff(volume[k]))
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    outs = current_outputs(profile.store.database)
    assert outs["slice_0007_scan1.tif"]["mode"] == "repeat"
    assert outs["slice_0008_scan1.tif"]["mode"] == "pair"
    with Store(profile.store.database, readonly=True) as store:
        (record,) = store.provenance("slice_0007_scan1.tif")["outputs"]
    assert sorted(i["role"] for i in record["inputs"]) == ["centre", "scan", "scan"]
    with Store(profile.store.database, readonly=True) as store:
        ds = store.status()["datasets"][0]
    assert ds["waiting"] == 0, ds["slices"]


def test_a_new_model_re_denoises_earlier_slices_as_new_versions(
    tmp_path, tiny_checkpoint, volume, monkeypatch
):
    monkeypatch.setattr(daemon_mod, "HEARTBEAT_S", 0.2)
    profile = make_profile(tmp_path, tiny_checkpoint, **{"model.checkpoint": "dataset"})
    Microscope(tmp_path / "raw", volume[:3], NAME, interval_s=0.0, chunks=1).run()
    with Running(profile) as run:
        run.wait_for(lambda: len(set(run.outputs)) == 3)
        first_model = run.daemon.model.sha256
        # A model promoted by hand (`nrrn-daemon models promote`): one short transaction.
        with Store(profile.store.database) as other:
            ckpt = load_checkpoint(tiny_checkpoint)
            model_id = other.ensure_model(
                sha256=ckpt.content_sha256, path=str(tiny_checkpoint), label="ds-v1",
                kind="finetuned", config=ckpt.config.to_dict(), dataset_id=run.daemon.dataset_id,
            )  # fmt: skip
            other.set_current_model(run.daemon.dataset_id, model_id, promoted=True)
        run.wait_for(lambda: len(run.outputs) == 6)
        assert run.daemon.model.label == "ds-v1" and run.daemon.model.sha256 != first_model
    # Newest first, then every slice has a second version by the new model; the first are kept.
    assert run.outputs[3:] == [NAME.format(k) for k in (2, 1, 0)]
    with Store(profile.store.database, readonly=True) as store:
        for k in range(3):
            report = store.provenance(NAME.format(k))
            versions = sorted(
                (o["version"], o["reason"], o["model"]["label"], o["is_current"])
                for o in report["outputs"]
            )
            assert versions[0][0] == 1 and not versions[0][3]
            assert versions[1] == (2, "new-model", "ds-v1", True)


def slices_and_theirs(tmp_path: Path, volume: np.ndarray) -> tuple[Path, Path]:
    """Four slices in the watch folder, and a real TIFF that is not ours outside it."""
    raw = tmp_path / "raw"
    scope = Microscope(raw, volume, NAME, interval_s=0.0, chunks=1)
    for k in range(4):
        scope.write(k)
    elsewhere = tmp_path / "other_project" / "their_slice.tif"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(encode_tiff(volume[4]))
    return raw, elsewhere


def test_a_link_out_of_the_watch_folder_is_recorded_failed_and_not_denoised(
    tmp_path, tiny_checkpoint, volume
):
    profile = make_profile(tmp_path, tiny_checkpoint)
    raw, elsewhere = slices_and_theirs(tmp_path, volume)
    (raw / NAME.format(4)).symlink_to(elsewhere)
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
        ds = store.status()["datasets"][0]
    reasons = {f["name"]: f["reason"] for f in ds["failed"]}
    assert "outside the watch folder" in reasons[NAME.format(4)], reasons
    assert str(elsewhere) in reasons[NAME.format(4)]
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert NAME.format(4) not in written and NAME.format(3) in written


@pytest.mark.mounts
def test_a_slice_mounted_in_from_outside_is_recorded_failed_unless_links_are_followed(
    tmp_path, tiny_checkpoint, volume, bind_mount
):
    """No link to see: someone else's TIFF bind-mounted onto a slice name of the watch folder."""
    raw, elsewhere = slices_and_theirs(tmp_path, volume)
    (raw / NAME.format(4)).write_bytes(b"")
    bind_mount(elsewhere, raw / NAME.format(4))
    assert not (raw / NAME.format(4)).is_symlink()
    profile = make_profile(tmp_path, tiny_checkpoint)
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
        ds = store.status()["datasets"][0]
    reasons = {f["name"]: f["reason"] for f in ds["failed"]}
    assert "a bind mount" in reasons[NAME.format(4)], reasons
    assert "watch.follow_links = true" in reasons[NAME.format(4)]
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert NAME.format(4) not in written and NAME.format(3) in written

    followed = make_profile(
        tmp_path, tiny_checkpoint,
        **{"watch.follow_links": True, "output.folder": str(tmp_path / "out2"),
           "store.database": str(tmp_path / "state2" / "db.sqlite")},
    )  # fmt: skip
    with Store(followed.store.database) as store:
        assert Daemon(followed, store).work(burst=True) == "burst complete"
        assert not store.status()["datasets"][0]["failed"]
    assert NAME.format(4) in {p.name for p in (tmp_path / "out2").iterdir()}
