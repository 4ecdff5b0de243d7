"""The provenance store on a real SQLite file: schema, WAL, versioning, read-only, reports."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from nrrn_daemon.errors import StoreError
from nrrn_daemon.states import InputRole, ModelKind, OutputMode, OutputReason, SliceState
from nrrn_daemon.store.store import SCHEMA_VERSION, Store

T0 = 1_800_000_000.0


class Clock:
    """A settable clock so heartbeat ages and the last hour are exact."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "provenance.db"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db: Path, clock: Clock):
    with Store(db, clock=clock) as s:
        yield s


def add_slices(store: Store, ds: int, folder: Path, n: int, ready_at: float = T0) -> list[int]:
    return [
        store.upsert_slice(
            ds, path=str(folder / f"slice_{i:04d}.tif"), name=f"slice_{i:04d}.tif", index=i,
            scan=None, size=1000, mtime=T0, sha256=f"{i:064x}", state=SliceState.READY,
            ready_at=ready_at,
        )
        for i in range(n)
    ]  # fmt: skip


def add_model(store: Store) -> int:
    return store.ensure_model(
        sha256="ab" * 32, path="/models/base.pt", label="base-abababab", kind=ModelKind.BASE,
        config={"hidden": 32, "blocks": 4},
    )  # fmt: skip


def add_output(
    store: Store, ds: int, ids: list[int], centre: int, model: int, *,
    out: Path, finished_at: float, started_at: float | None = None,
    ready_at: float = T0, mode: OutputMode = OutputMode.TRIPLET,
    reason: OutputReason | str = OutputReason.FIRST, device: str = "cuda:0",
) -> int:  # fmt: skip
    roles = [(ids[centre], InputRole.CENTRE, f"{centre:064x}")]
    if mode is OutputMode.TRIPLET:
        roles = [
            (ids[centre - 1], InputRole.PREV, f"{centre - 1:064x}"),
            *roles,
            (ids[centre + 1], InputRole.NEXT, f"{centre + 1:064x}"),
        ]
    return store.record_output(
        dataset_id=ds, centre_slice_id=ids[centre], inputs=roles,
        path=str(out / f"slice_{centre:04d}.tif"), sha256=f"{finished_at:064.0f}", mode=mode,
        model_id=model, settings={"tile": 256, "tile_batch": 4, "precision": "fp32"},
        device=device, ready_at=ready_at,
        started_at=finished_at - 1.0 if started_at is None else started_at,
        finished_at=finished_at, read_s=0.1, model_s=0.7, write_s=0.2, reason=reason,
    )  # fmt: skip


def test_new_database_has_every_table_and_the_schema_version(store: Store, db: Path) -> None:
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    version = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    con.close()
    assert tables >= {
        "meta", "datasets", "slices", "model_versions", "outputs", "output_inputs", "runs",
        "finetune_runs",
    }  # fmt: skip
    assert {"ix_slices_dataset_index", "ix_outputs_centre_current"} <= indexes
    assert version == (str(SCHEMA_VERSION),)


def test_wal_mode_and_foreign_keys_are_on(store: Store, db: Path, tmp_path: Path) -> None:
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    ids = add_slices(store, ds, tmp_path, 3)
    with pytest.raises(StoreError, match="FOREIGN KEY"):  # no model 999
        add_output(store, ds, ids, 1, 999, out=tmp_path / "out", finished_at=T0 + 5)
    # The failed unit left nothing behind: the slice is still ready.
    assert store.get_slice(ds, str(tmp_path / "slice_0001.tif")).state is SliceState.READY


def test_ensure_dataset_and_model_are_idempotent(store: Store, tmp_path: Path) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    assert store.ensure_dataset("ds", str(tmp_path / "moved"), "fast") == ds
    model = add_model(store)
    assert add_model(store) == model
    assert store.model_label(model) == "base-abababab"
    assert store.current_model_path(ds) is None
    store.set_current_model(ds, model, promoted=True)
    assert store.current_model_path(ds) == "/models/base.pt"


def test_upsert_slice_keeps_first_seen_and_ready_at(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    (sid,) = add_slices(store, ds, tmp_path, 1, ready_at=T0 + 1)
    clock.t = T0 + 50
    again = store.upsert_slice(
        ds, path=str(tmp_path / "slice_0000.tif"), name="slice_0000.tif", index=0, scan=None,
        size=2000, mtime=T0 + 40, sha256="f" * 64, state="failed", reason="truncated",
    )  # fmt: skip
    row = store.get_slice(ds, str(tmp_path / "slice_0000.tif"))
    assert again == sid
    assert (row.first_seen_at, row.ready_at, row.updated_at) == (T0, T0 + 1, T0 + 50)
    assert (row.state, row.reason, row.size) == (SliceState.FAILED, "truncated", 2000)
    assert store.get_slice(ds, "/elsewhere.tif") is None
    with pytest.raises(StoreError, match="no slice 12345"):
        store.set_slice_state(12345, SliceState.READY)


def test_record_output_versions_and_keeps_every_output(store: Store, tmp_path: Path) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    ids = add_slices(store, ds, tmp_path, 3)
    model = add_model(store)
    out = tmp_path / "out"
    first = add_output(
        store, ds, ids, 1, model, out=out, finished_at=T0 + 5, mode=OutputMode.SINGLE
    )
    assert store.current_mode(ids[1]) is OutputMode.SINGLE
    second = add_output(
        store, ds, ids, 1, model, out=out, finished_at=T0 + 9, reason=OutputReason.REDO_AS_TRIPLET
    )
    report = store.provenance(str(out / "slice_0001.tif"))
    versions = {o["id"]: (o["version"], o["is_current"], o["reason"]) for o in report["outputs"]}
    assert versions == {first: (1, False, "first"), second: (2, True, "redo-as-triplet")}
    assert store.current_mode(ids[1]) is OutputMode.TRIPLET
    assert store.slices_in_state(ds, [SliceState.DENOISED])[0].id == ids[1]
    assert [s.id for s in store.slices_in_state(ds, ["ready"])] == [ids[0], ids[2]]
    [(row, mode)] = store.denoised_slices(ds)
    assert (row.id, mode) == (ids[1], OutputMode.TRIPLET)


def test_readonly_store_reads_while_the_writer_is_open_and_cannot_write(
    store: Store, db: Path, tmp_path: Path
) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    add_slices(store, ds, tmp_path, 2)
    with Store(db, readonly=True) as ro:
        assert ro.status()["datasets"][0]["slices"]["ready"] == 2
        add_slices(store, ds, tmp_path, 4)  # the writer goes on while the reader is open
        assert ro.status()["datasets"][0]["slices"]["ready"] == 4
        with pytest.raises(StoreError, match="read-only"):
            ro.ensure_dataset("other", str(tmp_path), "default")
        with ro._engine.connect() as con, pytest.raises(OperationalError, match="readonly"):
            con.exec_driver_sql("DELETE FROM slices")  # below the API, SQLite refuses too
    assert len(store.slices_in_state(ds, ["ready"])) == 4


def test_readonly_without_a_database_says_to_start_the_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    with pytest.raises(StoreError, match="start the daemon first or pass --db"):
        Store(missing, readonly=True)
    assert not missing.exists()


def test_newer_schema_version_is_refused(db: Path) -> None:
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    con.commit()
    con.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="newer nrrn-daemon: upgrade"):
            Store(db, readonly=readonly)


def test_corrupt_file_is_reported_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.db"
    bad.write_bytes(bytes(range(256)) * 16)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="not a database") as err:
            Store(bad, readonly=readonly)
        assert str(bad) in str(err.value)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x)")
    con.close()
    with pytest.raises(StoreError, match="not an nrrn-daemon database"):
        Store(other)


def test_status_counts_latency_throughput_and_heartbeat(
    store: Store, db: Path, clock: Clock, tmp_path: Path
) -> None:
    assert store.status()["run"] is None
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    ids = add_slices(store, ds, tmp_path, 12)
    model = add_model(store)
    run = store.start_run(
        profile_name="default", profile_json=json.dumps({"name": "default"}), device="cuda:0"
    )
    # Ten outputs, latencies 1..10 s; the last three finished within the hour before "now".
    for k in range(1, 11):
        finished = T0 + 100.0 * k + k
        add_output(store, ds, ids, k, model, out=tmp_path / "out", finished_at=finished,
                   ready_at=T0 + 100.0 * k, started_at=T0 + 100.0 * k)  # fmt: skip
    store.set_slice_state(ids[11], SliceState.FAILED, "cannot read TIFF header: truncated")
    clock.t = T0 + 1010.0 + 3600.0 - 250.0
    store.heartbeat(run, {"queue": 2, "current": "slice_0011.tif", "next_finetune": "02:00"})

    with Store(db, readonly=True, clock=clock) as ro:
        status = ro.status()
        [d] = status["datasets"]
        assert status["run"]["state"] == "alive"
        assert status["run"]["live"]["queue"] == 2
        assert status["profile"] == {"name": "default", "settings": {"name": "default"}}
        assert d["slices"] == {"seen": 0, "ready": 1, "denoised": 10, "failed": 1, "unusable": 0}
        assert d["waiting"] == 1
        assert d["failed"][0]["reason"] == "cannot read TIFF header: truncated"
        assert d["latency_s"] == {"median": 5.0, "p90": 9.0, "last": 10.0, "count": 10}
        assert d["throughput_per_h"]["last_hour"] == 3.0
        assert d["throughput_per_h"]["overall"] == pytest.approx(10 / (910.0 / 3600.0))
        assert d["model"] == {"label": "base-abababab", "sha256": "ab" * 32}
        assert (d["device"], d["cpu_fallback"], d["next_finetune"]) == ("cuda:0", False, "02:00")
        json.dumps(status)  # JSON-able as it is

        clock.t += 31.0
        stale = ro.status(stale_after_s=30)["run"]
        assert (stale["state"], stale["heartbeat_age_s"]) == ("stale", 31.0)
        store.end_run(run, "SIGTERM")
        ended = ro.status("ds")["run"]
        assert (ended["state"], ended["end_reason"]) == ("ended", "SIGTERM")
        with pytest.raises(StoreError, match="no data set named 'nope'.*known: ds"):
            ro.status("nope")


def test_status_flags_cpu_fallback(store: Store, tmp_path: Path) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    ids = add_slices(store, ds, tmp_path, 3)
    add_output(store, ds, ids, 1, add_model(store), out=tmp_path, finished_at=T0 + 3, device="cpu")
    assert store.status()["datasets"][0]["cpu_fallback"] is True


def test_provenance_by_output_path_input_path_and_name(
    store: Store, db: Path, tmp_path: Path
) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    ids = add_slices(store, ds, tmp_path, 3)
    model = add_model(store)
    out = tmp_path / "out"
    add_output(store, ds, ids, 1, model, out=out, finished_at=T0 + 5)
    # The previous slice changes on disk afterwards: the recorded sha256 no longer matches.
    store.upsert_slice(
        ds, path=str(tmp_path / "slice_0000.tif"), name="slice_0000.tif", index=0, scan=None,
        size=1000, mtime=T0 + 99, sha256="e" * 64, state=SliceState.READY,
    )  # fmt: skip

    with Store(db, readonly=True) as ro:
        by_output = ro.provenance(str(out / "slice_0001.tif"))
        by_input = ro.provenance(str(tmp_path / "slice_0001.tif"))
        by_name = ro.provenance("slice_0001.tif")
        with pytest.raises(StoreError, match="nothing in .* matches 'slice_9999.tif'"):
            ro.provenance("slice_0009.tif".replace("0009", "9999"))
    assert [r["matched"] for r in (by_output, by_input, by_name)] == [
        "output path", "input path", "name",
    ]  # fmt: skip
    assert by_output["outputs"] == by_input["outputs"] == by_name["outputs"]
    [o] = by_output["outputs"]
    assert (o["version"], o["is_current"], o["mode"], o["device"]) == (1, True, "triplet", "cuda:0")
    assert [(i["role"], i["index"], i["changed"]) for i in o["inputs"]] == [
        ("prev", 0, True), ("centre", 1, False), ("next", 2, False),
    ]  # fmt: skip
    assert o["model"]["label"] == "base-abababab"
    assert o["model"]["config"] == {"hidden": 32, "blocks": 4}
    assert o["settings"]["tile"] == 256
    assert o["timings"]["latency_s"] == 5.0
    inputs = [str(tmp_path / f"slice_{i:04d}.tif") for i in range(3)]
    assert o["rerun"]["inputs"] == inputs
    assert o["rerun"]["argv"] == [
        "nrrn-daemon", "denoise", *inputs, "--output", str(out / "rerun"),
        "--model", "/models/base.pt", "--inputs", "3", "--tile", "256", "--tile-batch", "4",
        "--device", "cuda",
    ]  # fmt: skip
    assert o["rerun"]["expected_output"] == str(out / "rerun" / "slice_0001.tif")
    assert by_input["slices"][0]["state"] == "denoised"
    json.dumps(by_output)


def test_provenance_of_a_failed_slice_shows_why(store: Store, tmp_path: Path) -> None:
    ds = store.ensure_dataset("ds", str(tmp_path), "default")
    (sid,) = add_slices(store, ds, tmp_path, 1)
    store.set_slice_state(sid, SliceState.FAILED, "truncated")
    report = store.provenance("slice_0000.tif")
    assert report["outputs"] == []
    assert (report["slices"][0]["state"], report["slices"][0]["reason"]) == ("failed", "truncated")


def test_runs_heartbeat_and_end_need_a_known_run(store: Store) -> None:
    run = store.start_run(profile_name="p", profile_json={}, device="cpu", host="h", pid=7)
    store.heartbeat(run, {"queue": 0})
    with pytest.raises(StoreError, match="no run 99"):
        store.heartbeat(99, {})
    store.end_run(run, "burst complete")
    status = store.status()
    assert (status["run"]["host"], status["run"]["pid"]) == ("h", 7)
    assert status["run"]["end_reason"] == "burst complete"
