"""What the dashboard shows, read from the provenance database: plain JSON-able dicts.

Each function takes an open read :class:`~sqlalchemy.orm.Session` (one snapshot, through
:meth:`~nrrn_daemon.store.engine.StoreCore.read`) and reuses the store's own reports
(:func:`~nrrn_daemon.store.queries.status_report`, :func:`~nrrn_daemon.store.queries.models_report`)
for what ``status`` and ``models`` already say, so the dashboard and the terminal never disagree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from nrrn_daemon.errors import StoreError
from nrrn_daemon.states import SliceState
from nrrn_daemon.store.queries import has_quality, models_report, status_report
from nrrn_daemon.store.tables import Dataset, Output, OutputQuality, Slice

KEEPING_UP_SLACK = 2
"""Slices that may wait without the daemon being behind: the newest waits for its next neighbour
(a triplet needs it) and one is being denoised."""
PACE_WINDOW = 20
"""Acquisition and denoising pace are measured over this many latest arrivals / outputs."""
SERIES_LIMIT = 5000
"""Most outputs a plot's series holds (the latest ones)."""


def strip_state(state: SliceState, version: int | None) -> str:
    """The state a strip cell shows: ``denoised``, ``re-denoised`` (a later output version),
    ``waiting`` (complete, waiting for a neighbour or the model), ``arriving`` or ``failed``."""
    if state == SliceState.DENOISED:
        return "re-denoised" if (version or 1) > 1 else "denoised"
    return {SliceState.READY: "waiting", SliceState.SEEN: "arriving"}.get(state, "failed")


def dataset_row(session: Session, name: str) -> Dataset:
    """The data set called ``name``.

    Raises
    ------
    StoreError
        No such data set.
    """
    row = session.scalar(select(Dataset).where(Dataset.name == name))
    if row is None:
        raise StoreError(f"no data set named {name!r} in the database")
    return row


def _rate_per_h(times: list[float]) -> float | None:
    """Events per hour over a list of time stamps (None with fewer than two)."""
    times = sorted(times)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / ((times[-1] - times[0]) / 3600.0)


def overview(session: Session, name: str, *, now: float, stale_after_s: float) -> dict[str, Any]:
    """One data set's page: the strip, the pace, the run, the model, the latest quality.

    Returns
    -------
    dict
        ``status`` (the data set's entry of ``status --json``), ``run`` (its ``run``), ``slices``
        (one per slice by index: ``name``, ``index``, ``scan``, ``state`` (see
        :func:`strip_state`), ``reason``, ``mode``, ``version``, ``noise_in``, ``noise_out``,
        ``flagged``, ``flag_reason``), ``newest`` (name of the newest denoised slice) and
        ``pace`` (``acquired_per_h``, ``denoised_per_h``, ``behind``, ``keeping_up``,
        ``message``).
    """
    ds = dataset_row(session, name)
    report = status_report(
        session, dataset=name, stale_after_s=stale_after_s, now=now, where="the database"
    )
    quality = has_quality(session)
    columns: list[Any] = [Slice, Output.mode, Output.version, Output.finished_at]
    query = select(*columns).outerjoin(
        Output, (Output.centre_slice_id == Slice.id) & Output.is_current.is_(True)
    )
    if quality:
        query = query.add_columns(
            OutputQuality.noise_in, OutputQuality.noise_out, OutputQuality.flagged,
            OutputQuality.flag_reason,
        ).outerjoin(OutputQuality, OutputQuality.output_id == Output.id)  # fmt: skip
    rows = session.execute(
        query.where(Slice.dataset_id == ds.id).order_by(Slice.index, Slice.scan, Slice.id)
    ).all()
    slices, newest, newest_at = [], None, -1.0
    for row in rows:
        s, mode, version, finished = row[0], row[1], row[2], row[3]
        extra = row[4:] if quality else (None, None, None, None)
        state = strip_state(SliceState(s.state), version)
        if finished is not None and finished > newest_at and state.endswith("denoised"):
            newest, newest_at = s.name, finished
        slices.append({
            "name": s.name, "index": s.index, "scan": s.scan, "state": state,
            "reason": s.reason, "mode": None if mode is None else mode.value, "version": version,
            "noise_in": extra[0], "noise_out": extra[1], "flagged": bool(extra[2]),
            "flag_reason": extra[3],
        })  # fmt: skip
    arrivals = list(
        session.scalars(
            select(Slice.first_seen_at)
            .where(Slice.dataset_id == ds.id)
            .order_by(Slice.first_seen_at.desc())
            .limit(PACE_WINDOW)
        )
    )
    finished = list(
        session.scalars(
            select(Output.finished_at)
            .where(Output.dataset_id == ds.id)
            .order_by(Output.finished_at.desc())
            .limit(PACE_WINDOW)
        )
    )
    behind = sum(1 for s in slices if s["state"] in ("waiting", "arriving"))
    keeping_up = behind <= KEEPING_UP_SLACK
    return {
        "name": ds.name,
        "status": report["datasets"][0],
        "run": report["run"],
        "slices": slices,
        "newest": newest,
        "pace": {
            "acquired_per_h": _rate_per_h(arrivals),
            "denoised_per_h": _rate_per_h(finished),
            "behind": behind,
            "keeping_up": keeping_up,
            "message": "keeping up" if keeping_up else f"{behind} slices behind",
        },
    }


def series(session: Session, name: str) -> dict[str, list[list[float]]]:
    """The plots' data of a data set.

    Returns
    -------
    dict
        ``latency`` (``[finished_at, ready → finished s]`` per output, oldest first),
        ``finished`` (finished_at of every output), ``noise_in`` / ``noise_out``
        (``[index, σ]`` of each slice's current output) and ``flagged`` (``[index, σ in]``).
    """
    ds = dataset_row(session, name)
    outs = session.execute(
        select(Output.finished_at, Output.ready_at)
        .where(Output.dataset_id == ds.id)
        .order_by(Output.finished_at.desc())
        .limit(SERIES_LIMIT)
    ).all()
    outs.reverse()
    result: dict[str, list[list[float]]] = {
        "latency": [[f, f - r] for f, r in outs if r is not None],
        "finished": [[f, 1.0] for f, _ in outs],
        "noise_in": [],
        "noise_out": [],
        "flagged": [],
    }
    if not has_quality(session):
        return result
    rows = session.execute(
        select(Slice.index, OutputQuality.noise_in, OutputQuality.noise_out, OutputQuality.flagged)
        .join(Output, Output.id == OutputQuality.output_id)
        .join(Slice, Slice.id == Output.centre_slice_id)
        .where(OutputQuality.dataset_id == ds.id, Output.is_current.is_(True))
        .order_by(Slice.index)
    )
    for index, noise_in, noise_out, flagged in rows:
        result["noise_in"].append([float(index), noise_in])
        result["noise_out"].append([float(index), noise_out])
        if flagged:
            result["flagged"].append([float(index), noise_in])
    return result


def slice_row(session: Session, dataset: str, name: str) -> tuple[Dataset, Slice, Output | None]:
    """A data set's slice by file name, with its current output (None when it has none).

    Raises
    ------
    StoreError
        No such data set, or no slice of that name in it.
    """
    ds = dataset_row(session, dataset)
    row = session.scalar(
        select(Slice)
        .where(Slice.dataset_id == ds.id, Slice.name == name)
        .order_by(Slice.scan.desc(), Slice.id.desc())
        .limit(1)
    )
    if row is None:
        raise StoreError(f"data set {dataset!r} has no slice named {name!r}")
    out = session.scalar(
        select(Output).where(Output.centre_slice_id == row.id, Output.is_current.is_(True))
    )
    return ds, row, out


def models(session: Session) -> dict[str, Any]:
    """The ``models`` report (versions, fine-tunes with gate decisions and validation losses)."""
    return models_report(session, dataset=None, where="the database")


def datasets(session: Session) -> list[str]:
    """Every data set's name."""
    return list(session.scalars(select(Dataset.name).order_by(Dataset.name)))
