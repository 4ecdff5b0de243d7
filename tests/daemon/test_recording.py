"""Recording a finished unit: its output row, each input with its role and the sha256 that was
denoised, its latency, and repeat scans consumed. A real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from nrrn_daemon.daemon.recording import record_unit
from nrrn_daemon.daemon.units import OutputRecord
from nrrn_daemon.registry import ModelInfo
from nrrn_daemon.slices import SliceRef
from nrrn_daemon.states import InputRole, OutputReason, SliceState
from nrrn_daemon.store.store import Store
from nrrn_daemon.triplets import Work, WorkMode


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "db.sqlite") as s:
        yield s


def _slices(store: Store, refs: list[SliceRef], ready_at: float) -> int:
    ds = store.ensure_dataset(name="ds", watch_folder="/acq", profile_name="t")
    for ref in refs:
        store.upsert_slice(
            ds, path=str(ref.path), name=ref.name, index=ref.index, scan=ref.scan, size=1,
            mtime=1.0, sha256=f"{ref.name}-arrived", state=SliceState.READY, ready_at=ready_at,
        )  # fmt: skip
    return ds


def _record(finished_at: float, sha: list[str | None]) -> OutputRecord:
    return OutputRecord(
        path=Path("/out/c.tif"), sha256="out", mode="triplet", settings={}, device="cpu",
        started_at=finished_at - 1.0, finished_at=finished_at, read_s=0.1, model_s=0.8,
        write_s=0.1, input_sha256=sha,
    )  # fmt: skip


def _model(store: Store) -> ModelInfo:
    model_id = store.ensure_model(sha256="m" * 64, path="/m.pt", label="m", kind="base", config={})
    return ModelInfo(label="m", sha256="m" * 64, path="/m.pt", store_id=model_id)


def test_a_triplet_records_roles_the_hashes_denoised_and_its_latency(store: Store) -> None:
    refs = [SliceRef(Path(f"/acq/s{i}.tif"), f"s{i}.tif", i) for i in range(3)]
    ds = _slices(store, refs, ready_at=100.0)
    work = Work(refs[1], (refs[0], refs[2]), WorkMode.TRIPLET)
    latency = record_unit(
        store, dataset_id=ds, run_id=None, work=work,
        record=_record(105.0, ["centre-read", None, "next-read"]), reason=OutputReason.FIRST,
        model=_model(store),
    )  # fmt: skip
    assert latency == pytest.approx(5.0)  # from the centre's ready_at to the output's finish
    (output,) = store.provenance("/acq/s1.tif")["outputs"]
    inputs = {i["path"]: (i["role"], i["sha256"]) for i in output["inputs"]}
    assert inputs == {
        "/acq/s1.tif": (InputRole.CENTRE.value, "centre-read"),
        "/acq/s0.tif": (InputRole.PREV.value, "s0.tif-arrived"),  # not re-hashed: as arrived
        "/acq/s2.tif": (InputRole.NEXT.value, "next-read"),
    }
    assert store.get_slice(ds, "/acq/s1.tif").state == SliceState.DENOISED
    assert store.get_slice(ds, "/acq/s0.tif").state == SliceState.READY  # still its own work


def test_repeat_scans_used_by_a_unit_are_consumed(store: Store) -> None:
    refs = [SliceRef(Path(f"/acq/s5_{k}.tif"), f"s5_{k}.tif", 5, scan=k) for k in range(3)]
    ds = _slices(store, refs, ready_at=10.0)
    work = Work(refs[0], (refs[1], refs[2]), WorkMode.REPEAT)
    record_unit(
        store, dataset_id=ds, run_id=None, work=work, record=_record(11.0, []),
        reason=OutputReason.FIRST, model=_model(store),
    )  # fmt: skip
    states = [store.get_slice(ds, str(r.path)).state for r in refs]
    assert states == [SliceState.DENOISED] * 3
    (output,) = store.provenance("/acq/s5_0.tif")["outputs"]
    assert sorted(i["role"] for i in output["inputs"]) == ["centre", "scan", "scan"]
