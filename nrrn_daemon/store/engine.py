"""SQLite plumbing of the provenance store: connections, PRAGMAs, schema check, error messages,
and :class:`StoreCore`, the open database with its one-transaction units of work.

Every connection, on connect, gets ``synchronous=NORMAL``, ``foreign_keys=ON`` and a
``busy_timeout``; the writer also sets ``journal_mode=WAL`` (persistent in the file, so readers
find it). The driver's implicit transactions are turned off and every transaction is opened
explicitly: ``BEGIN IMMEDIATE`` for the writer (a unit of work takes the write lock up front and
never fails half-way), a plain ``BEGIN`` for readers (several SELECTs, one snapshot). A read-only
store connects through an SQLite ``file:...?mode=ro`` URI and sets ``query_only``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from nrrn_daemon import __version__
from nrrn_daemon.errors import StoreError
from nrrn_daemon.store.tables import ADDED_TABLES, SCHEMA_VERSION, Base, Meta

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
"""How long a connection waits for a lock before failing (``PRAGMA busy_timeout``)."""


def make_engine(path: Path, readonly: bool) -> Engine:
    """An engine on ``path`` whose connections get the store's PRAGMAs and explicit BEGINs."""
    if readonly:
        uri = f"file:{quote(str(path))}?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, check_same_thread=False)
    else:

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(str(path), check_same_thread=False)

    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=QueuePool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.isolation_level = None  # no implicit BEGIN: the "begin" hook opens each one
        if not readonly:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if readonly:
            dbapi_conn.execute("PRAGMA query_only=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def open_schema(session: Session, path: Path, readonly: bool) -> None:
    """Create the tables in an empty writable database, else check its schema version.

    Raises
    ------
    StoreError
        The database has tables but no ``meta`` table (not ours), or a schema version other than
        :data:`SCHEMA_VERSION` (newer: upgrade; older or unreadable: no migration exists).
    """
    tables = set(inspect(session.connection()).get_table_names())
    if not tables and not readonly:
        Base.metadata.create_all(session.connection())
        session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        session.add(Meta(key="created_by", value=f"nrrn-daemon {__version__}"))
        return
    if "meta" not in tables:
        what = "is empty" if not tables else "has no meta table"
        raise StoreError(
            f"{path} is not an nrrn-daemon database (it {what}); start the daemon to create "
            "one or pass another --db"
        )
    found = session.get(Meta, "schema_version")
    version = found.value if found is not None else "missing"
    if version == str(SCHEMA_VERSION):
        missing = [t for t in ADDED_TABLES if t.name not in tables]
        if missing and not readonly:  # a database of an earlier release: add, never alter
            Base.metadata.create_all(session.connection(), tables=missing)
        return
    if version.isdigit() and int(version) > SCHEMA_VERSION:
        advice = "it was written by a newer nrrn-daemon: upgrade nrrn-daemon or pass another --db"
    else:
        advice = "this nrrn-daemon cannot migrate it: move it aside or pass another --db"
    raise StoreError(
        f"database {path} has schema version {version}, nrrn-daemon {__version__} reads "
        f"version {SCHEMA_VERSION}; {advice}"
    )


def explain(path: Path, doing: str, exc: DBAPIError) -> str:
    """One line saying what failed on which file, and what to do about it."""
    cause = str(exc.orig) if exc.orig is not None else str(exc)
    lowered = cause.lower()
    if "not a database" in lowered or "malformed" in lowered:
        advice = "the file is corrupt or not an SQLite database: move it aside or pass another --db"
    elif "locked" in lowered or "busy" in lowered:
        advice = "another process holds the write lock: is a second nrrn-daemon using this --db?"
    elif "readonly" in lowered or "read-only" in lowered:
        advice = "the file or its folder is not writable: fix its permissions or pass another --db"
    elif "unable to open" in lowered:
        advice = "check that the file and its folder exist and are readable"
    elif "disk" in lowered or "full" in lowered:
        advice = "free some disk space"
    else:
        advice = "check the file, its folder and the disk"
    return f"cannot {doing} in database {path}: {cause}; {advice}"


class StoreCore:
    """The open database under :class:`nrrn_daemon.store.store.Store`: engine, units of work.

    Opening creates (writer) or checks the schema; :meth:`_unit` is one transaction whose database
    errors become :class:`StoreError`. The record methods are in the subclasses; the parameters are
    documented on :class:`~nrrn_daemon.store.store.Store`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.readonly = readonly
        self._clock = clock
        if readonly and not self.path.is_file():
            raise StoreError(f"no database at {self.path}, start the daemon first or pass --db")
        if not readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder of {self.path}: {exc}") from exc
        self._engine = make_engine(self.path, readonly)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._open_schema()
        except BaseException:
            self._engine.dispose()
            raise

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection (the last writer to close folds the WAL into the file)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _unit(self, doing: str, *, write: bool = True) -> Iterator[Session]:
        """One transaction; database errors become :class:`StoreError` saying what failed."""
        if write and self.readonly:
            raise StoreError(f"cannot {doing}: database {self.path} is open read-only")
        try:
            with self._sessions.begin() as session:
                yield session
        except DBAPIError as exc:
            raise StoreError(explain(self.path, doing, exc)) from exc

    def read(self, doing: str, report: Callable[[Session], T]) -> T:
        """Run ``report(session)`` in one read transaction (one snapshot); return its result.

        For read-side reports kept outside the store (the dashboard's); ``doing`` names what is
        read in the error message.
        """
        with self._unit(doing, write=False) as session:
            return report(session)

    def _open_schema(self) -> None:
        with self._unit("read the schema", write=False) as session:
            open_schema(session, self.path, self.readonly)

    def _exactly_one(self, result: Any, what: str) -> None:
        """Raise when an UPDATE by id touched no row (the id is not in this database)."""
        if result.rowcount != 1:
            raise StoreError(f"no {what} in database {self.path}")
