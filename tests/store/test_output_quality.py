"""The ``output_quality`` table: recorded with each output, flagged on a noise jump, shown in
``provenance`` and ``status``; databases of the release before it keep working."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

from nrrn_daemon.evaluation.quality import Quality
from nrrn_daemon.store.store import Store

RELEASE_DB = Path(__file__).resolve().parents[1] / "data" / "provenance-0.1.0.sqlite"
"""Written by the real daemon of release 0.1.0 (test_release_database.py): no output_quality."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(store: Store, ds: int, model: int, i: int, noise_in: float) -> int:
    sid = store.upsert_slice(
        ds, path=f"/raw/s_{i:03d}.tif", name=f"s_{i:03d}.tif", index=i, scan=None, size=1,
        mtime=1.0, sha256="0" * 64, state="ready", ready_at=float(i),
    )  # fmt: skip
    return store.record_output(
        dataset_id=ds, centre_slice_id=sid, inputs=[(sid, "centre", "0" * 64)],
        path=f"/out/s_{i:03d}.tif", sha256="1" * 64, mode="single", model_id=model,
        settings={}, device="cpu", ready_at=float(i), started_at=i + 0.1, finished_at=i + 0.5,
        read_s=0.1, model_s=0.2, write_s=0.1, reason="first",
        quality=Quality(noise_in, noise_in / 4, 2 * noise_in, noise_in / 2, (0, 8, 0, 8)),
    )  # fmt: skip


def test_quality_is_recorded_flagged_and_reported(tmp_path):
    db = tmp_path / "q.sqlite"
    with Store(db) as store:
        ds = store.ensure_dataset("ds", "/raw", "test")
        model = store.ensure_model(sha256="a" * 64, path="/m.pt", label="base", kind="base",
                                   config={})  # fmt: skip
        for i, noise in enumerate([5.0, 5.1, 4.9, 5.2, 5.0, 5.1, 14.0, 5.0]):
            _record(store, ds, model, i, noise)
        status = store.status()["datasets"][0]["quality"]
        assert status["measured"] == 8
        assert [f["name"] for f in status["flagged"]] == ["s_006.tif"]
        assert "14.0" in status["flagged"][0]["reason"]
        assert abs(status["noise_in_level"] - 5.1) < 0.11
        assert status["last"]["noise_in"] == 5.0 and status["last"]["flagged"] is False
        jumped = store.provenance("s_006.tif")["outputs"][0]["quality"]
        assert (
            jumped["flagged"] and jumped["noise_out"] == 3.5 and jumped["flat_box"] == [0, 8, 0, 8]
        )
        assert store.provenance("s_000.tif")["outputs"][0]["quality"]["flagged"] is False


def test_a_database_of_the_previous_release_keeps_working(tmp_path):
    db = tmp_path / "old.sqlite"
    shutil.copyfile(RELEASE_DB, db)
    before = _sha(db)
    with Store(db, readonly=True) as store:  # status/provenance/dashboard: nothing is added
        ds = store.status()["datasets"][0]
        assert ds["outputs"] == 5 and ds["quality"] == {
            "measured": 0,
            "last": None,
            "noise_in_level": None,
            "flagged": [],
        }
        assert store.provenance("slice_001.tif")["outputs"][0]["quality"] is None
    assert _sha(db) == before
    with Store(db) as store:  # the daemon adds the table and records into it
        (ds_id,) = store.dataset_ids().values()
        model = next(iter(store.current_outputs(ds_id).values()))["model_id"]
        _record(store, ds_id, model, 7, 6.0)
        report = store.provenance("slice_001.tif")
        assert report["outputs"][0]["quality"] is None and report["outputs"][0]["version"] == 1
        assert store.provenance("s_007.tif")["outputs"][0]["quality"]["noise_in"] == 6.0
        assert store.status()["datasets"][0]["quality"]["measured"] == 1
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert "output_quality" in tables
