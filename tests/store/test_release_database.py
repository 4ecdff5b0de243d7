"""A database written by release 0.1.0 (the flat-package layout) keeps working.

``tests/data/provenance-0.1.0.sqlite`` was written by the real daemon of release 0.1.0 (commit
51d85b2, before the package was split into sub-packages): a burst over five 48×48 phantom
slices with the shipped base checkpoint, then ``wal_checkpoint`` and ``VACUUM``. Its paths point
to a temporary folder that no longer exists, as an old database's often do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nrrn_daemon.cli.app import app
from nrrn_daemon.states import SliceState
from nrrn_daemon.store.store import Store

RELEASE_DB = Path(__file__).resolve().parents[1] / "data" / "provenance-0.1.0.sqlite"


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    copy = tmp_path / "db.sqlite"
    shutil.copy(RELEASE_DB, copy)
    return copy


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_status_and_provenance_read_a_release_database(old_db: Path) -> None:
    before = _sha(old_db)
    runner = CliRunner()
    status = runner.invoke(app, ["status", "--db", str(old_db), "--json"])
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert report["run"]["version"] == "0.1.0"
    assert report["run"]["live"]["denoised"] == 5
    with Store(old_db, readonly=True) as store:
        (dataset_id,) = store.dataset_ids().values()
        rows = store.slices_in_state(dataset_id, [SliceState.DENOISED])
        outputs = store.current_outputs(dataset_id)
    assert sorted(r.name for r in rows) == [f"slice_{i:03d}.tif" for i in range(5)]
    assert len(outputs) == 5
    prov = runner.invoke(app, ["provenance", "slice_002.tif", "--db", str(old_db), "--json"])
    assert prov.exit_code == 0, prov.output
    lineage = json.loads(prov.output)
    text = json.dumps(lineage)
    assert "triplet" in text and "slice_001.tif" in text and "slice_003.tif" in text
    assert _sha(old_db) == before  # read-only commands leave the file as it was


def test_the_current_code_writes_to_a_release_database(old_db: Path) -> None:
    with Store(old_db) as store:
        (dataset_id,) = store.dataset_ids().values()
        store.upsert_slice(
            dataset_id, path="/gone/slice_005.tif", name="slice_005.tif", index=5, scan=None,
            size=10, mtime=1.0, sha256="ab" * 32, state=SliceState.READY,
        )  # fmt: skip
    with Store(old_db, readonly=True) as store:
        ready = store.slices_in_state(dataset_id, [SliceState.READY])
        assert [r.name for r in ready] == ["slice_005.tif"]
        assert len(store.current_outputs(dataset_id)) == 5
