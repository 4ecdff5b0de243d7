"""Record a finished unit in the store: its output, inputs (role, sha256) and timings.

Called by the daemon loop (the store's one writer) once the output file is completely written,
never before: a kill between the write and this record leaves a file that the restarted daemon
makes again and records then.
"""

from __future__ import annotations

from nrrn_daemon.daemon.units import OutputRecord
from nrrn_daemon.frames import unusable_label
from nrrn_daemon.registry import ModelInfo
from nrrn_daemon.states import InputRole, OutputReason, SliceState
from nrrn_daemon.store.store import Store
from nrrn_daemon.triplets import Work


def record_unit(
    store: Store,
    *,
    dataset_id: int,
    run_id: int | None,
    work: Work,
    record: OutputRecord,
    reason: OutputReason,
    model: ModelInfo,
) -> float:
    """Record ``record`` as the current output of ``work.centre``; return its latency (s).

    Each input is recorded with the sha256 of the bytes that were denoised when the reader hashed
    them (else the one recorded when the slice arrived). A repeat scan used by the unit is
    consumed: it becomes denoised too.
    """
    refs = [work.centre, *work.neighbours]
    rows = {r.path: store.get_slice(dataset_id, str(r.path)) for r in refs}
    roles = work.roles
    centre_row = rows[work.centre.path]
    assert centre_row is not None, "a slice reached the grouper without a store row"
    read = record.input_sha256 or [None] * len(refs)
    inputs = []
    for ref, role, sha in zip(refs, roles, read, strict=True):
        row = rows[ref.path]
        if row is not None:
            inputs.append((row.id, role, sha or row.sha256))
    ready_at = centre_row.ready_at or record.started_at
    store.record_output(
        dataset_id=dataset_id, centre_slice_id=centre_row.id, inputs=inputs,
        path=str(record.path), sha256=record.sha256, mode=record.mode, model_id=model.store_id,
        settings=record.settings, device=record.device, ready_at=ready_at,
        started_at=record.started_at, finished_at=record.finished_at, read_s=record.read_s,
        model_s=record.model_s, write_s=record.write_s, reason=reason, run_id=run_id,
        quality=record.quality,
    )  # fmt: skip
    if work.unusable is not None:  # written, but still no neighbour nor fine-tune target
        store.set_slice_state(
            centre_row.id, SliceState.UNUSABLE, reason=unusable_label(work.unusable)
        )
    for ref, role in zip(refs, roles, strict=True):
        row = rows[ref.path]
        if role == InputRole.SCAN and row is not None and row.state == SliceState.READY:
            # A repeat scan is consumed by its slice's output: it waits for nothing more.
            store.set_slice_state(
                row.id, SliceState.DENOISED, reason=f"scan used for {work.centre.name}"
            )
    return record.finished_at - ready_at
