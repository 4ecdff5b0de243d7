"""Read-side reports of the provenance store: ``status`` and ``models``.

They take an open :class:`~sqlalchemy.orm.Session` (one read transaction, one snapshot) and
return plain JSON-able dicts; :class:`nrrn_daemon.store.store.Store` calls them. Counting and
percentiles are SQL aggregates over indexed columns; no query loads a whole table. Times are
reported as ISO 8601 UTC strings, durations and ages as seconds. The ``provenance`` report of one
slice or output is :mod:`nrrn_daemon.store.lineage`.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from nrrn_daemon.errors import StoreError
from nrrn_daemon.states import (
    FAILED_LIST_LIMIT,
    RunLiveness,
    SliceState,
)
from nrrn_daemon.store.tables import (
    Dataset,
    FinetuneRun,
    ModelVersion,
    Output,
    OutputQuality,
    Run,
    Slice,
)

HOUR_S = 3600.0


def iso(t: float | None) -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC string (``None`` stays ``None``)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="seconds")


# -- status -------------------------------------------------------------------------------------


def _datasets(session: Session, dataset: str | None, where: str) -> list[Dataset]:
    """All data sets by name, or the one named ``dataset`` (a clear error if there is none)."""
    query = select(Dataset).order_by(Dataset.name)
    if dataset is not None:
        query = query.where(Dataset.name == dataset)
    datasets = list(session.scalars(query))
    if dataset is not None and not datasets:
        known = ", ".join(session.scalars(select(Dataset.name).order_by(Dataset.name))) or "none"
        raise StoreError(f"no data set named {dataset!r} in {where} (known: {known})")
    return datasets


def status_report(
    session: Session, *, dataset: str | None, stale_after_s: float, now: float, where: str
) -> dict[str, Any]:
    """The daemon's state as recorded in the database.

    Parameters
    ----------
    session
        An open read transaction.
    dataset
        Report only this data set (by name); ``None`` reports all of them.
    stale_after_s
        A run not ended whose heartbeat is older than this is reported ``"stale"``.
    now
        The time to measure heartbeat ages and the last hour from.
    where
        The database path, for messages.

    Returns
    -------
    dict
        ``run`` (the latest run: ``state`` alive/stale/ended, ``heartbeat_age_s``,
        ``end_reason``, ``live`` = its ``state_json``...; ``None`` before the first run),
        ``profile`` (name and settings of that run) and ``datasets``: one dict each with
        ``slices`` (count per state), ``waiting`` (ready slices), ``unusable`` (latest slices not
        used as neighbours, with reasons), ``failed`` (latest ones with
        reasons), ``latency_s`` (ready → finished: ``median``, ``p90``, ``last``, ``count``),
        ``throughput_per_h`` (``last_hour``, ``overall``), ``model``, ``device`` and
        ``cpu_fallback`` (of the last output), ``next_finetune`` (from the run's live state),
        ``quality`` (``measured``, ``last`` output's noise and IQR, ``noise_in_level``: the
        running median of the input noise, ``flagged``: the latest slices whose input noise
        jumped above it).

    Raises
    ------
    StoreError
        ``dataset`` names no data set.
    """
    run = session.scalar(select(Run).order_by(Run.started_at.desc(), Run.id.desc()).limit(1))
    datasets = _datasets(session, dataset, where)
    live = run.state_json if run is not None else {}
    return {
        "database": where,
        "now": iso(now),
        "run": None if run is None else _run_status(run, now, stale_after_s),
        "profile": None
        if run is None
        else {"name": run.profile_name, "settings": run.profile_json},
        "datasets": [_dataset_status(session, ds, now, live, run) for ds in datasets],
    }


def _run_status(run: Run, now: float, stale_after_s: float) -> dict[str, Any]:
    """The run row, judged alive / stale / ended from its heartbeat."""
    age = now - run.heartbeat_at
    if run.ended_at is not None:
        state = RunLiveness.ENDED
    elif age > stale_after_s:
        state = RunLiveness.STALE
    else:
        state = RunLiveness.ALIVE
    return {
        "id": run.id,
        "state": state.value,
        "host": run.host,
        "pid": run.pid,
        "version": run.version,
        "device": run.device,
        "started_at": iso(run.started_at),
        "heartbeat_at": iso(run.heartbeat_at),
        "heartbeat_age_s": age,
        "stale_after_s": stale_after_s,
        "ended_at": iso(run.ended_at),
        "end_reason": run.end_reason,
        "live": run.state_json,
    }


def _dataset_status(
    session: Session, ds: Dataset, now: float, live: dict[str, Any], run: Run | None
) -> dict[str, Any]:
    """Counts, failures, latency, throughput and model of one data set."""
    counts = {state.value: 0 for state in SliceState}
    for state, n in session.execute(
        select(Slice.state, func.count()).where(Slice.dataset_id == ds.id).group_by(Slice.state)
    ):
        counts[SliceState(state).value] = n
    failed = session.execute(
        select(Slice.path, Slice.name, Slice.index, Slice.reason, Slice.updated_at)
        .where(Slice.dataset_id == ds.id, Slice.state == SliceState.FAILED)
        .order_by(Slice.updated_at.desc())
        .limit(FAILED_LIST_LIMIT)
    )
    unusable = session.execute(
        select(Slice.path, Slice.name, Slice.index, Slice.reason, Slice.updated_at)
        .where(Slice.dataset_id == ds.id, Slice.state == SliceState.UNUSABLE)
        .order_by(Slice.updated_at.desc())
        .limit(FAILED_LIST_LIMIT)
    )
    last = session.scalar(
        select(Output)
        .where(Output.dataset_id == ds.id)
        .order_by(Output.finished_at.desc())
        .limit(1)
    )
    model = session.get(ModelVersion, ds.current_model_id) if ds.current_model_id else None
    if model is None and last is not None:
        model = session.get(ModelVersion, last.model_version_id)
    device = last.device if last is not None else (run.device if run is not None else None)
    next_finetune = live.get("next_finetune")
    if isinstance(next_finetune, dict):  # the daemon may schedule per data set
        next_finetune = next_finetune.get(ds.name)
    return {
        "name": ds.name,
        "watch_folder": ds.watch_folder,
        "profile_name": ds.profile_name,
        "slices": counts,
        "waiting": counts[SliceState.READY.value],
        "failed": [
            {"path": p, "name": n, "index": i, "reason": r, "at": iso(t)}
            for p, n, i, r, t in failed
        ],
        "unusable": [
            {"path": p, "name": n, "index": i, "reason": r, "at": iso(t)}
            for p, n, i, r, t in unusable
        ],
        "outputs": session.scalar(
            select(func.count()).select_from(Output).where(Output.dataset_id == ds.id)
        ),
        "latency_s": _latency(session, ds.id, last),
        "throughput_per_h": _throughput(session, ds.id, now),
        "model": None if model is None else {"label": model.label, "sha256": model.sha256},
        "last_output": None if last is None else {"path": last.path, "at": iso(last.finished_at)},
        "device": device,
        "precision": None if last is None else (last.settings_json or {}).get("precision"),
        "cpu_fallback": device is not None and device.split(":")[0] == "cpu",
        "next_finetune": next_finetune,
        "finetunes": _finetunes(session, ds.id, FINETUNE_HISTORY),
        "quality": _quality_status(session, ds.id),
    }


QUALITY_FLAGGED_LIMIT = 20
"""How many of a data set's latest flagged slices ``status`` lists."""


def has_quality(session: Session) -> bool:
    """Whether the database has the ``output_quality`` table (a read-only database of an earlier
    release may not: nothing was measured then)."""
    return inspect(session.connection()).has_table(OutputQuality.__tablename__)


def quality_of(row: OutputQuality | None) -> dict[str, Any] | None:
    """An ``output_quality`` row as plain data (None stays None)."""
    if row is None:
        return None
    return {
        "noise_in": row.noise_in, "noise_out": row.noise_out, "iqr_in": row.iqr_in,
        "iqr_out": row.iqr_out, "flat_box": list(row.flat_box_json), "flagged": row.flagged,
        "flag_reason": row.flag_reason,
    }  # fmt: skip


def _quality_status(session: Session, dataset_id: int) -> dict[str, Any]:
    """The latest output's quality, the running input-noise level and the flagged slices."""
    from nrrn_daemon.evaluation.quality import JUMP_WINDOW

    empty: dict[str, Any] = {"measured": 0, "last": None, "noise_in_level": None, "flagged": []}
    if not has_quality(session):
        return empty
    rows = list(
        session.scalars(
            select(OutputQuality)
            .join(Output, Output.id == OutputQuality.output_id)
            .where(OutputQuality.dataset_id == dataset_id)
            .order_by(Output.finished_at.desc(), Output.id.desc())
            .limit(JUMP_WINDOW)
        )
    )
    if not rows:
        return empty
    flagged = session.execute(
        select(Slice.name, Slice.index, OutputQuality.noise_in, OutputQuality.flag_reason)
        .join(Output, Output.id == OutputQuality.output_id)
        .join(Slice, Slice.id == Output.centre_slice_id)
        .where(OutputQuality.dataset_id == dataset_id, OutputQuality.flagged.is_(True))
        .order_by(Output.finished_at.desc())
        .limit(QUALITY_FLAGGED_LIMIT)
    )
    level = sorted(r.noise_in for r in rows)
    return {
        "measured": session.scalar(
            select(func.count())
            .select_from(OutputQuality)
            .where(OutputQuality.dataset_id == dataset_id)
        ),
        "last": quality_of(rows[0]),
        "noise_in_level": float(level[len(level) // 2]),
        "flagged": [{"name": n, "index": i, "noise_in": v, "reason": r} for n, i, v, r in flagged],
    }


FINETUNE_HISTORY = 5
"""How many of a data set's latest fine-tunes ``status`` lists."""


def _finetunes(session: Session, dataset_id: int, limit: int | None) -> list[dict[str, Any]]:
    """The data set's latest fine-tunes, newest first, with the gate's validation metrics."""
    query = (
        select(FinetuneRun)
        .where(FinetuneRun.dataset_id == dataset_id)
        .order_by(FinetuneRun.started_at.desc(), FinetuneRun.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    out = []
    for run in session.scalars(query):
        summary = run.summary_json or {}
        candidate = (
            session.get(ModelVersion, run.candidate_model_id) if run.candidate_model_id else None
        )
        parent = session.get(ModelVersion, run.parent_model_id) if run.parent_model_id else None
        out.append({
            "id": run.id, "status": run.status.value, "started_at": iso(run.started_at),
            "ended_at": iso(run.ended_at), "promoted": run.promoted,
            "parent": None if parent is None else parent.label,
            "candidate": None if candidate is None else candidate.label,
            "val_loss_parent": (summary.get("parent_metrics") or {}).get("val_loss"),
            "val_loss_candidate": (summary.get("candidate_metrics") or {}).get("val_loss"),
            "steps": summary.get("steps"), "seconds": summary.get("seconds"),
            "device": summary.get("device"), "reasons": summary.get("reasons"),
            "error": summary.get("error"),
        })  # fmt: skip
    return out


def models_report(session: Session, *, dataset: str | None, where: str) -> dict[str, Any]:
    """Every model version per data set (oldest first) and its fine-tune runs.

    Returns
    -------
    dict
        ``datasets``: one dict each with ``name``, ``current`` (label or ``None``: the
        profile's ``model.checkpoint``), ``models`` (``label``, ``sha256``, ``kind``, ``parent``
        (label, or the sha256 prefix when the parent is not recorded), ``created_at``,
        ``promoted_at``, ``metrics``, ``current``, ``path``) and ``finetunes`` (newest first).

    Raises
    ------
    StoreError
        ``dataset`` names no data set.
    """
    datasets = _datasets(session, dataset, where)
    labels = {
        sha: label
        for sha, label in session.execute(select(ModelVersion.sha256, ModelVersion.label))
    }
    report = []
    for ds in datasets:
        used = select(Output.model_version_id).where(Output.dataset_id == ds.id)
        parents = select(FinetuneRun.parent_model_id).where(FinetuneRun.dataset_id == ds.id)
        rows = session.scalars(
            select(ModelVersion)
            .where(
                (ModelVersion.dataset_id == ds.id)
                | ModelVersion.id.in_(used)
                | ModelVersion.id.in_(parents)
                | (ModelVersion.id == ds.current_model_id)
            )
            .order_by(ModelVersion.created_at, ModelVersion.id)
        )
        models = [
            {
                "id": m.id, "label": m.label, "sha256": m.sha256, "kind": m.kind.value,
                "parent": None if m.parent_sha256 is None
                else labels.get(m.parent_sha256, m.parent_sha256[:12]),
                "created_at": iso(m.created_at), "promoted_at": iso(m.promoted_at),
                "metrics": m.metrics_json, "current": m.id == ds.current_model_id, "path": m.path,
            }
            for m in rows
        ]  # fmt: skip
        current = next((m["label"] for m in models if m["current"]), None)
        report.append({"name": ds.name, "current": current, "models": models,
                       "finetunes": _finetunes(session, ds.id, None)})  # fmt: skip
    return {"database": where, "datasets": report}


def _latency(session: Session, dataset_id: int, last: Output | None) -> dict[str, Any]:
    """Ready → finished seconds of the data set's outputs: median, p90 (nearest rank), last."""
    latency = Output.finished_at - Output.ready_at
    where = (Output.dataset_id == dataset_id, Output.ready_at.is_not(None))
    n = session.scalar(select(func.count()).select_from(Output).where(*where)) or 0

    def rank(p: float) -> float | None:
        if n == 0:
            return None
        k = max(math.ceil(p * n) - 1, 0)
        return session.scalar(select(latency).where(*where).order_by(latency).offset(k).limit(1))

    last_s = None
    if last is not None and last.ready_at is not None:
        last_s = last.finished_at - last.ready_at
    return {"median": rank(0.5), "p90": rank(0.9), "last": last_s, "count": n}


def _throughput(session: Session, dataset_id: int, now: float) -> dict[str, float | None]:
    """Outputs per hour over the last hour, and over the span from first start to last finish."""
    in_hour = session.scalar(
        select(func.count())
        .select_from(Output)
        .where(Output.dataset_id == dataset_id, Output.finished_at >= now - HOUR_S)
    )
    n, first, last = session.execute(
        select(func.count(), func.min(Output.started_at), func.max(Output.finished_at)).where(
            Output.dataset_id == dataset_id
        )
    ).one()
    overall = n / ((last - first) / HOUR_S) if n and last > first else None
    return {"last_hour": float(in_hour or 0), "overall": overall}
