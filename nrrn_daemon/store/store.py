"""The provenance store: one SQLite file that records every slice, model, output and run.

One process writes (the daemon), through one :class:`Store`; each public write method is one
transaction (one unit of work), opened with ``BEGIN IMMEDIATE`` so it never fails half-way on a
lock. The database is in WAL mode, so ``nrrn-daemon status`` and ``provenance`` can open it
read-only (``Store(path, readonly=True)``, an SQLite ``mode=ro`` URI) while the daemon runs; a
read-only store reads inside one transaction, so a report is one consistent snapshot.

The tables are in :mod:`nrrn_daemon.store.tables`, the connection and unit of work in
:mod:`nrrn_daemon.store.engine` (:class:`~nrrn_daemon.store.engine.StoreCore`), the model-version
and fine-tune records in :mod:`nrrn_daemon.store.versions`, the read-side reports in
:mod:`nrrn_daemon.store.queries`. Every failure to open, read or write the file is raised as
:class:`~nrrn_daemon.errors.StoreError` naming the file and what to do.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from enum import Enum
from typing import Any

from sqlalchemy import func, select, update

from nrrn_daemon import __version__
from nrrn_daemon.evaluation.quality import JUMP_WINDOW, Quality, noise_jump
from nrrn_daemon.states import STALE_AFTER_S, InputRole, OutputMode, OutputReason, SliceState
from nrrn_daemon.store.lineage import provenance_report
from nrrn_daemon.store.queries import status_report
from nrrn_daemon.store.tables import (
    SCHEMA_VERSION,
    Dataset,
    Output,
    OutputInput,
    OutputQuality,
    Run,
    Slice,
    SliceInfo,
)
from nrrn_daemon.store.versions import ModelVersions

__all__ = ["SCHEMA_VERSION", "SliceInfo", "Store"]


class Store(ModelVersions):
    """The provenance database, open for writing (the daemon) or read-only (``status``).

    Parameters
    ----------
    path
        The SQLite file. For writing it (and its folder) is created when missing, with the
        current schema; for reading it must exist.
    readonly
        Open with ``mode=ro``: nothing is ever written, the daemon may be running, and every
        write method raises :class:`StoreError`.
    clock
        Returns "now" in seconds since the epoch; tests pass a fake one.

    Raises
    ------
    StoreError
        The file is missing (read-only), not an SQLite database, not an nrrn-daemon database,
        or has a schema version this code does not know.
    """

    # -- data sets and slices -----------------------------------------------------------------

    def ensure_dataset(self, name: str, watch_folder: str, profile_name: str) -> int:
        """Return the id of the data set called ``name``, creating it when new.

        An existing data set keeps its name and id; its watch folder and profile are updated to
        the given ones (a restart may point at a moved folder).
        """
        with self._unit(f"record data set {name!r}") as session:
            row = session.scalar(select(Dataset).where(Dataset.name == name))
            if row is None:
                row = Dataset(name=name, created_at=self._clock())
                session.add(row)
            row.watch_folder = str(watch_folder)
            row.profile_name = profile_name
            session.flush()
            return row.id

    def dataset_ids(self) -> dict[str, int]:
        """Every data set's name and id."""
        with self._unit("read the data sets", write=False) as session:
            return {name: i for name, i in session.execute(select(Dataset.name, Dataset.id))}

    def upsert_slice(
        self,
        dataset_id: int,
        *,
        path: str,
        name: str,
        index: int,
        scan: int | None,
        size: int,
        mtime: float,
        sha256: str | None,
        state: SliceState | str,
        reason: str | None = None,
        ready_at: float | None = None,
    ) -> int:
        """Insert or update the slice at ``path`` in a data set; return its id.

        ``first_seen_at`` is set once; ``ready_at`` is kept when not given again.
        """
        now = self._clock()
        with self._unit(f"record slice {path}") as session:
            row = session.scalar(
                select(Slice).where(Slice.dataset_id == dataset_id, Slice.path == str(path))
            )
            if row is None:
                row = Slice(dataset_id=dataset_id, path=str(path), first_seen_at=now)
                session.add(row)
            row.name, row.index, row.scan = name, index, scan
            row.size, row.mtime, row.sha256 = size, mtime, sha256
            row.state, row.reason, row.updated_at = SliceState(state), reason, now
            if ready_at is not None:
                row.ready_at = ready_at
            session.flush()
            return row.id

    def set_slice_state(
        self, slice_id: int, state: SliceState | str, reason: str | None = None
    ) -> None:
        """Move a slice to ``state`` (with an optional reason, e.g. why it failed)."""
        with self._unit(f"set the state of slice {slice_id}") as session:
            done = session.execute(
                update(Slice)
                .where(Slice.id == slice_id)
                .values(state=SliceState(state), reason=reason, updated_at=self._clock())
            )
            self._exactly_one(done, f"slice {slice_id}")

    def get_slice(self, dataset_id: int, path: str) -> SliceInfo | None:
        """The slice at ``path`` in a data set, or ``None`` when it was never recorded."""
        with self._unit("read a slice", write=False) as session:
            row = session.scalar(
                select(Slice).where(Slice.dataset_id == dataset_id, Slice.path == str(path))
            )
            return None if row is None else SliceInfo.of(row)

    def slices_in_state(
        self, dataset_id: int, states: Sequence[SliceState | str]
    ) -> list[SliceInfo]:
        """The data set's slices in any of ``states``, by index then scan."""
        wanted = [SliceState(s) for s in states]
        with self._unit("read slices", write=False) as session:
            rows = session.scalars(
                select(Slice)
                .where(Slice.dataset_id == dataset_id, Slice.state.in_(wanted))
                .order_by(Slice.index, Slice.scan, Slice.id)
            )
            return [SliceInfo.of(row) for row in rows]

    # -- outputs ------------------------------------------------------------------------------

    def record_output(
        self,
        *,
        dataset_id: int,
        centre_slice_id: int,
        inputs: Sequence[tuple[int, InputRole | str, str]],
        path: str,
        sha256: str,
        mode: OutputMode | str,
        model_id: int,
        settings: dict[str, Any],
        device: str,
        ready_at: float | None,
        started_at: float,
        finished_at: float,
        read_s: float,
        model_s: float,
        write_s: float,
        reason: OutputReason | str,
        run_id: int | None = None,
        quality: Quality | None = None,
    ) -> int:
        """Record a written output file; return its id.

        In one transaction: the centre slice's earlier outputs stop being current (they are
        kept), the new row gets ``version`` = previous maximum + 1 and ``is_current``, its
        ``inputs`` (slice id, role, sha256 as read) are stored, and the centre slice becomes
        :attr:`SliceState.DENOISED`. ``reason`` is an :class:`OutputReason` or free text.
        ``quality`` (measured in the writer thread) goes to ``output_quality``, flagged when the
        input's noise jumps above the data set's running level
        (:func:`~nrrn_daemon.evaluation.quality.noise_jump`).
        """
        roles = [(slice_id, InputRole(role), sha) for slice_id, role, sha in inputs]
        if (centre_slice_id, InputRole.CENTRE) not in {(s, r) for s, r, _ in roles}:
            raise ValueError(f"inputs {inputs!r} lack the centre slice {centre_slice_id}")
        now = self._clock()
        with self._unit(f"record output {path}") as session:
            session.execute(
                update(Output)
                .where(Output.centre_slice_id == centre_slice_id, Output.is_current.is_(True))
                .values(is_current=False)
            )
            previous = session.scalar(
                select(func.max(Output.version)).where(Output.centre_slice_id == centre_slice_id)
            )
            row = Output(
                dataset_id=dataset_id, centre_slice_id=centre_slice_id, run_id=run_id,
                path=str(path), sha256=sha256, mode=OutputMode(mode), model_version_id=model_id,
                settings_json=settings, device=device, ready_at=ready_at, started_at=started_at,
                finished_at=finished_at, read_s=read_s, model_s=model_s, write_s=write_s,
                is_current=True, version=(previous or 0) + 1, reason=_text(reason), created_at=now,
            )  # fmt: skip
            session.add(row)
            session.flush()
            session.add_all(
                OutputInput(output_id=row.id, slice_id=s, role=r, sha256=sha) for s, r, sha in roles
            )
            session.execute(
                update(Slice)
                .where(Slice.id == centre_slice_id)
                .values(state=SliceState.DENOISED, reason=None, updated_at=now)
            )
            if quality is not None:
                session.add(_quality_row(session, row, quality))
            return row.id

    def current_mode(self, slice_id: int) -> OutputMode | None:
        """The mode of the slice's current output, or ``None`` when it has none."""
        with self._unit("read an output", write=False) as session:
            return session.scalar(
                select(Output.mode).where(
                    Output.centre_slice_id == slice_id, Output.is_current.is_(True)
                )
            )

    def denoised_slices(self, dataset_id: int) -> list[tuple[SliceInfo, OutputMode]]:
        """The data set's denoised slices with the mode of their current output, by index."""
        with self._unit("read denoised slices", write=False) as session:
            rows = session.execute(
                select(Slice, Output.mode)
                .join(Output, (Output.centre_slice_id == Slice.id) & Output.is_current.is_(True))
                .where(Slice.dataset_id == dataset_id, Slice.state == SliceState.DENOISED)
                .order_by(Slice.index, Slice.scan, Slice.id)
            )
            return [(SliceInfo.of(row), mode) for row, mode in rows]

    def stale_outputs(self, dataset_id: int, model_id: int) -> list[str]:
        """Input paths of the slices whose current output another model made, newest first."""
        with self._unit("read outputs of older models", write=False) as session:
            return list(
                session.scalars(
                    select(Slice.path)
                    .join(
                        Output, (Output.centre_slice_id == Slice.id) & Output.is_current.is_(True)
                    )
                    .where(Slice.dataset_id == dataset_id, Output.model_version_id != model_id)
                    .order_by(Slice.index.desc(), Slice.id.desc())
                )
            )

    def current_outputs(self, dataset_id: int) -> dict[int, dict[str, Any]]:
        """Every current output of a data set, by centre slice id, with its inputs (one read).

        Each value: ``path``, ``sha256``, ``mode``, ``model_id``, ``settings`` and ``inputs``, a
        set of (slice id, role value, sha256 as read). ``reprocess`` decides from it which
        slices are already done with a given model.
        """
        with self._unit("read current outputs", write=False) as session:
            rows = session.execute(
                select(Output, OutputInput)
                .join(OutputInput, OutputInput.output_id == Output.id)
                .where(Output.dataset_id == dataset_id, Output.is_current.is_(True))
            )
            found: dict[int, dict[str, Any]] = {}
            for out, item in rows:
                entry = found.setdefault(
                    out.centre_slice_id,
                    {"path": out.path, "sha256": out.sha256, "mode": OutputMode(out.mode).value,
                     "model_id": out.model_version_id, "settings": out.settings_json,
                     "inputs": set()},
                )  # fmt: skip
                entry["inputs"].add((item.slice_id, InputRole(item.role).value, item.sha256))
            return found

    # -- runs ---------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        profile_name: str,
        profile_json: dict[str, Any] | str,
        device: str,
        host: str | None = None,
        pid: int | None = None,
        version: str = __version__,
    ) -> int:
        """Record the start of a daemon process (its first heartbeat); return the run id.

        ``profile_json`` is the profile as a dict or as JSON text (``Profile.model_dump_json()``).
        """
        profile = json.loads(profile_json) if isinstance(profile_json, str) else profile_json
        now = self._clock()
        with self._unit("record the start of a run") as session:
            row = Run(
                profile_name=profile_name, profile_json=profile, device=device,
                host=host or socket.gethostname(), pid=os.getpid() if pid is None else pid,
                version=version, started_at=now, heartbeat_at=now, state_json={},
            )  # fmt: skip
            session.add(row)
            session.flush()
            return row.id

    def heartbeat(self, run_id: int, state: dict[str, Any]) -> None:
        """Stamp the run as alive now and store its live counters (read back by ``status``)."""
        with self._unit(f"write the heartbeat of run {run_id}") as session:
            done = session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(heartbeat_at=self._clock(), state_json=state)
            )
            self._exactly_one(done, f"run {run_id}")

    def end_run(self, run_id: int, reason: str) -> None:
        """Record that the run ended, and why (``"signal SIGTERM"``, ``"burst done"``...)."""
        with self._unit(f"record the end of run {run_id}") as session:
            now = self._clock()
            done = session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(ended_at=now, heartbeat_at=now, end_reason=reason)
            )
            self._exactly_one(done, f"run {run_id}")

    # -- reports ------------------------------------------------------------------------------

    def status(
        self, dataset: str | None = None, stale_after_s: float = STALE_AFTER_S
    ) -> dict[str, Any]:
        """What the daemon is doing, from the database alone (JSON-able).

        See :func:`nrrn_daemon.store.queries.status_report` for the keys.
        """
        with self._unit("read the status", write=False) as session:
            return status_report(
                session, dataset=dataset, stale_after_s=stale_after_s, now=self._clock(),
                where=str(self.path),
            )  # fmt: skip

    def provenance(self, path_or_name: str) -> dict[str, Any]:
        """How the output(s) for an output path, input path or bare file name were made.

        See :func:`nrrn_daemon.store.lineage.provenance_report` for the keys.
        """
        with self._unit("read provenance", write=False) as session:
            return provenance_report(session, path_or_name, where=str(self.path))


def _quality_row(session: Any, out: Output, quality: Quality) -> OutputQuality:
    """The ``output_quality`` row of a new output, judged against the data set's latest ones."""
    previous = session.scalars(
        select(OutputQuality.noise_in)
        .join(Output, Output.id == OutputQuality.output_id)
        .where(OutputQuality.dataset_id == out.dataset_id, Output.id != out.id)
        .order_by(Output.finished_at.desc(), Output.id.desc())
        .limit(JUMP_WINDOW)
    ).all()
    flag = noise_jump(list(reversed(previous)), quality.noise_in)
    return OutputQuality(
        output_id=out.id, dataset_id=out.dataset_id, noise_in=quality.noise_in,
        noise_out=quality.noise_out, iqr_in=quality.iqr_in, iqr_out=quality.iqr_out,
        flat_box_json=list(quality.flat_box), flagged=flag is not None, flag_reason=flag,
    )  # fmt: skip


def _text(value: Enum | str) -> str:
    """The stored text of an enum member or a plain string (``str()`` of a member is its name)."""
    return value.value if isinstance(value, Enum) else str(value)
