"""The provenance database's tables, as SQLAlchemy 2 declarative models.

Conventions: every ``*_at`` column is seconds since the Unix epoch (UTC) as a float, so latencies
and ages are plain SQL subtraction; reports turn them into ISO 8601 strings. States are the
``str`` enums of :mod:`nrrn_daemon.states`, stored as their text value. ``*_json`` columns hold
plain JSON objects. :data:`SCHEMA_VERSION` is written to the ``meta`` table when the database is
created and checked on every open (see :class:`nrrn_daemon.store.store.Store`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum as PyEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from nrrn_daemon.states import FinetuneStatus, InputRole, ModelKind, OutputMode, SliceState

SCHEMA_VERSION = 1
"""Version of the tables below; bump it (and add a migration) whenever they change."""


def _text_enum(cls: type[PyEnum]) -> Enum:
    """A column type storing a ``str`` enum as its value (``"denoised"``, not ``"DENOISED"``)."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,  # a new member must not need a migration
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    """Declarative base of every provenance table."""

    type_annotation_map = {dict[str, Any]: JSON}


class Meta(Base):
    """Key/value facts about the database itself; ``schema_version`` is always present."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Dataset(Base):
    """One acquisition: a watch folder processed under one profile."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    watch_folder: Mapped[str] = mapped_column(Text)
    profile_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    current_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))


class Slice(Base):
    """One raw slice file of a data set, with the sha256 it had when it was found complete."""

    __tablename__ = "slices"
    __table_args__ = (
        UniqueConstraint("dataset_id", "path", name="uq_slices_dataset_path"),
        Index("ix_slices_dataset_index", "dataset_id", "index"),
        Index("ix_slices_dataset_state", "dataset_id", "state", "updated_at"),
        Index("ix_slices_name", "name"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    path: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    index: Mapped[int] = mapped_column(Integer)
    scan: Mapped[int | None] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float] = mapped_column(Float)
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[SliceState] = mapped_column(_text_enum(SliceState))
    reason: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[float] = mapped_column(Float)
    ready_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class ModelVersion(Base):
    """A checkpoint: the global base model or a data set's fine-tuned one."""

    __tablename__ = "model_versions"
    __table_args__ = (Index("ix_model_versions_dataset", "dataset_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    label: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[ModelKind] = mapped_column(_text_enum(ModelKind))
    config_json: Mapped[dict[str, Any]]
    parent_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics_json: Mapped[dict[str, Any] | None]
    created_at: Mapped[float] = mapped_column(Float)
    promoted_at: Mapped[float | None] = mapped_column(Float)


class Run(Base):
    """One daemon process; ``heartbeat_at`` and ``state_json`` are what ``status`` reads."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_started", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    profile_name: Mapped[str] = mapped_column(String(200))
    profile_json: Mapped[dict[str, Any]]
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    end_reason: Mapped[str | None] = mapped_column(Text)
    state_json: Mapped[dict[str, Any]]


class Output(Base):
    """One denoised file; every re-do adds a row (``version`` + 1) and moves ``is_current``."""

    __tablename__ = "outputs"
    __table_args__ = (
        Index("ix_outputs_centre_current", "centre_slice_id", "is_current"),
        Index("ix_outputs_dataset_finished", "dataset_id", "finished_at"),
        Index("ix_outputs_path", "path"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    centre_slice_id: Mapped[int] = mapped_column(ForeignKey("slices.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    mode: Mapped[OutputMode] = mapped_column(_text_enum(OutputMode))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    settings_json: Mapped[dict[str, Any]]
    device: Mapped[str] = mapped_column(String(64))
    ready_at: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float] = mapped_column(Float)
    read_s: Mapped[float] = mapped_column(Float)
    model_s: Mapped[float] = mapped_column(Float)
    write_s: Mapped[float] = mapped_column(Float)
    is_current: Mapped[bool] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class OutputInput(Base):
    """One input of an output, with the sha256 the file had when it was read."""

    __tablename__ = "output_inputs"
    __table_args__ = (Index("ix_output_inputs_slice", "slice_id"),)

    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), primary_key=True)
    slice_id: Mapped[int] = mapped_column(ForeignKey("slices.id"), primary_key=True)
    role: Mapped[InputRole] = mapped_column(_text_enum(InputRole), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))


class FinetuneRun(Base):
    """One nightly fine-tune of a data set's model (filled in by ``training.py``)."""

    __tablename__ = "finetune_runs"
    __table_args__ = (Index("ix_finetune_runs_dataset", "dataset_id", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    status: Mapped[FinetuneStatus] = mapped_column(_text_enum(FinetuneStatus))
    parent_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    candidate_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    summary_json: Mapped[dict[str, Any]]


class OutputQuality(Base):
    """No-reference quality of one output and its input (:mod:`nrrn_daemon.evaluation.quality`).

    A table of its own, added after schema version 1 and created when a writable store opens a
    database that lacks it: databases of earlier releases keep working, and read-side reports
    treat a missing table as "nothing measured".
    """

    __tablename__ = "output_quality"

    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    noise_in: Mapped[float] = mapped_column(Float)
    noise_out: Mapped[float] = mapped_column(Float)
    iqr_in: Mapped[float] = mapped_column(Float)
    iqr_out: Mapped[float] = mapped_column(Float)
    flat_box_json: Mapped[list[int]] = mapped_column(JSON)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text)


ADDED_TABLES = (OutputQuality.__table__,)
"""Tables added since schema version 1 without a version bump: created on open when missing."""


MTIME_TOLERANCE_S = 1e-3
"""Two mtimes closer than this are the same (SQLite stores them as floats)."""


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """A ``slices`` row as plain data that outlives its session (see :class:`Slice`)."""

    id: int
    dataset_id: int
    path: str
    name: str
    index: int
    scan: int | None
    size: int
    mtime: float
    sha256: str | None
    state: SliceState
    reason: str | None
    first_seen_at: float
    ready_at: float | None
    updated_at: float

    def unchanged(self, size: int, mtime: float) -> bool:
        """Whether a file of this size and mtime is still the one recorded (mtime to 1 ms, which
        every file system the daemon watches keeps): the one "unchanged since recorded" test of
        the daemon and ``reprocess``."""
        return size == self.size and abs(mtime - self.mtime) < MTIME_TOLERANCE_S

    @classmethod
    def of(cls, row: Slice) -> SliceInfo:
        """Copy an ORM row."""
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})
