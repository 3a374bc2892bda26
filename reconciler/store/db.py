"""Engines and migrations.

`make_engine` builds an engine configured for the reconciler (SQLite: WAL, busy timeout,
foreign keys, real transactions; PostgreSQL: pre-ping). `upgrade` applies the Alembic
migrations that live inside this package, configured programmatically (no alembic.ini).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

# The newest migration shipped in this package (tests check it against Alembic's head).
from reconciler.store.revision import HEAD_REVISION as HEAD_REVISION

if TYPE_CHECKING:  # Alembic is imported when a migration check runs, not by every command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")

#: Execution option marking the writer engine (`write_engine`): on SQLite its transactions
#: open with ``BEGIN IMMEDIATE`` (take the write lock at once, waiting up to the busy
#: timeout) instead of a deferred ``BEGIN``, so that a read-then-write transaction never
#: fails on a lock upgrade.
SQLITE_WRITE_OPTION = "reconciler_sqlite_write"

#: Key of the PostgreSQL advisory lock serialising concurrent `upgrade` calls (replicas).
_PG_MIGRATION_LOCK = 0x7265636F6E63  # "reconc"

SQLITE_BUSY_TIMEOUT_MS = 30000


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from pysqlite (it does not BEGIN before SELECT or
    # DDL); the "begin" listener below emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class _SQLiteWriters:
    """One writer at a time inside this process, waiting on a lock rather than on SQLite.

    SQLite's busy handler, which a ``BEGIN IMMEDIATE`` meets while another thread writes,
    sleeps 1, 2, 5, 10 ... ms between polls: with a few runners writing at once those
    sleeps, not the writes, bounded deployments/s (issue 12). A thread first takes this
    lock (released when its connection goes back to the pool, after COMMIT or ROLLBACK),
    so the next writer starts the moment the last one ends. Other processes (a CLI
    command) still meet the busy handler. The lock only orders: a writer that waited a
    whole busy timeout for it goes on to SQLite's own lock, as before.

    Transactions begin in the dialect's ``do_begin`` (the writer engine has a dialect of
    its own, `write_engine`), not in a ``begin`` connection event: any connection event
    makes SQLAlchemy dispatch the before/after-execute events of every statement, about
    15 % of a write's CPU. ``write_transactions`` counts the write transactions ended (a
    plain counter, so that a benchmark can read it without an event listener of its own).
    """

    KEY = "reconciler_sqlite_writer"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.write_transactions = 0

    @staticmethod
    def begin_read(connection: Any) -> None:
        """The reader's BEGIN (deferred): one consistent view for a block of reads."""
        if _INLINE.on:
            _no_wait(connection)
        _sqlite_begin(connection, "BEGIN")

    def begin_write(self, connection: Any) -> None:
        """The writer's BEGIN IMMEDIATE, after this process's writer lock. Inline (`inline`):
        neither waits, raising `WouldWait` instead."""
        info = connection.info
        if not info.get(self.KEY):
            if _INLINE.on:
                if not self.lock.acquire(blocking=False):
                    raise WouldWait("another writer of this process holds the write lock")
                info[self.KEY] = True
                _no_wait(connection)
            else:
                info[self.KEY] = self.lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        try:
            _sqlite_begin(connection, "BEGIN IMMEDIATE")
        except BaseException:
            self.release(connection, connection._connection_record)
            raise

    def release(self, _dbapi_connection: Any, record: Any) -> None:
        """Pool checkin: the transaction ended (committed or rolled back) on this one."""
        if record is None:
            return
        if record.info.pop(_NO_WAIT, False) and _dbapi_connection is not None:
            _dbapi_connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if record.info.pop(self.KEY, False):
            self.write_transactions += 1
            self.lock.release()


class WouldWait(Exception):
    """An inline store call (`inline`) met a lock it would have had to wait for."""


class _Inline(threading.local):
    on = False


_INLINE = _Inline()
#: Connection info key: its busy timeout is 0 until it goes back to the pool.
_NO_WAIT = "reconciler_sqlite_no_wait"


def _no_wait(connection: Any) -> None:
    info = connection.info
    if not info.get(_NO_WAIT):
        info[_NO_WAIT] = True
        connection.driver_connection.execute("PRAGMA busy_timeout=0")


def inline(engine: Engine, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a short store call on the calling thread (the event loop) instead of handing it
    to a worker thread, when that cannot wait: SQLite only, and only while neither this
    process's writer lock nor SQLite's lock is taken. Else `WouldWait` (nothing written:
    the call's transaction never began, or was rolled back), and the caller hands the call
    to a worker thread as before.

    Why: on SQLite a deployment's writes take ~100 us each, less than the hand-off to a
    worker thread and back (and the GIL passed between the two at each statement), which
    was most of a no-op deployment's cost (issue 12). ``fn`` must be one transaction, or
    reads before one (it is run again whole after `WouldWait`)."""
    if sqlite_writers(engine) is None or _INLINE.on:
        raise WouldWait("not inline")
    from sqlalchemy.exc import OperationalError

    _INLINE.on = True
    try:
        return fn(*args, **kwargs)
    except OperationalError as exc:
        if is_transient(exc):  # SQLITE_BUSY / LOCKED: another process writes
            raise WouldWait(str(exc)) from exc
        raise
    finally:
        _INLINE.on = False


def _sqlite_begin(connection: Any, statement: str) -> None:
    # Straight to the driver (the pool's connection: SQLAlchemy wraps what it raises as it
    # would any statement's, so `is_transient` reads SQLITE_BUSY from it).
    connection.driver_connection.execute(statement)


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # No pre-ping: a SQLite connection is a file handle that never goes away, and
        # the ping would be one more statement per transaction.
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        writers = _SQLiteWriters()
        engine.dialect.do_begin = writers.begin_read  # type: ignore[method-assign, assignment]
        event.listen(engine.pool, "checkin", writers.release)
        engine.__dict__[_WRITERS] = writers
        return engine
    from reconciler.store.models import postgresql_options

    postgresql_options()  # the PostgreSQL dialect is loaded now anyway
    return create_engine(parsed, pool_pre_ping=True)


#: Where a SQLite engine keeps its `_SQLiteWriters` and its writer engine.
_WRITERS = "_reconciler_sqlite_writers"
_WRITER = "_reconciler_sqlite_writer_engine"


def sqlite_writers(engine: Engine) -> _SQLiteWriters | None:
    """The writer lock and counter of a SQLite engine made by `make_engine`; else None."""
    found: _SQLiteWriters | None = engine.__dict__.get(_WRITERS)
    return found


log = logging.getLogger(__name__)


class SQLiteFile:
    """Notices a SQLite database file deleted or replaced under the running process.

    Connections opened before keep writing into the unlinked inode, so everything written
    since would be gone at the next start while every query still answers. The identity
    (device, inode) of the file is taken when the first connection opens it; `problem`
    compares it with what the path holds now (one ``stat``) and logs the first problem
    once.
    """

    def __init__(self, engine: Engine, path: Path) -> None:
        self.path = path
        # The file may exist already (migrations opened it): then that is the database.
        self._identity: tuple[int, int] | None = self._stat()
        self._problem: str | None = None
        self._lock = threading.Lock()
        event.listen(engine, "connect", self._on_connect)

    @classmethod
    def of(cls, engine: Engine) -> SQLiteFile | None:
        """For a SQLite file database; None for PostgreSQL or an in-memory database."""
        url = engine.url
        database = url.database
        if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return None
        if database.startswith("file:"):
            return None
        return cls(engine, Path(database).expanduser().absolute())

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _on_connect(self, _dbapi_connection: Any, _record: Any) -> None:
        with self._lock:
            if self._identity is None:
                self._identity = self._stat()

    def problem(self) -> str | None:
        """Why the file this process writes to is no longer the database, or None."""
        with self._lock:
            if self._problem is not None or self._identity is None:
                return self._problem
            now = self._stat()
            if now == self._identity:
                return None
            what = "deleted" if now is None else "replaced"
            self._problem = (
                f"the SQLite database file {self.path} was {what} while the daemon runs: "
                "what it records now is lost at restart; restore the file from a backup "
                "or restart the daemon"
            )
        log.error("event=database_lost path=%s reason=%s", self.path, what)
        return self._problem


def write_engine(engine: Engine) -> Engine:
    """``engine`` whose transactions take the SQLite write lock at BEGIN (the engine itself
    elsewhere). One per engine, kept: it shares the engine's pool but has a dialect of its
    own (a copy whose ``do_begin`` is `_SQLiteWriters.begin_write`), so its compiled
    statements are cached once, not per call."""
    writers = sqlite_writers(engine)
    if writers is None:
        return engine
    writer: Engine | None = engine.__dict__.get(_WRITER)
    if writer is None:
        with engine.connect():  # the dialect initialised (first connect) before the copy
            pass
        writer = engine.execution_options(**{SQLITE_WRITE_OPTION: True})
        dialect = copy.copy(engine.dialect)
        dialect.do_begin = writers.begin_write  # type: ignore[method-assign, assignment]
        writer.dialect = dialect
        writer = engine.__dict__.setdefault(_WRITER, writer)
    return writer


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    if head is None:  # pragma: no cover - the package always ships a migration
        raise RuntimeError("no migrations found in " + str(MIGRATIONS_DIR))
    return head


def _current(connection: Connection) -> str | None:
    # Read directly (as Alembic stores it) so that a daemon whose database is up to date
    # never imports Alembic: ~12 MB of a resident daemon.
    if not inspect(connection).has_table("alembic_version"):
        return None
    row = connection.execute(text("SELECT version_num FROM alembic_version")).first()
    return None if row is None else str(row[0])


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    with engine.connect() as connection:
        return _current(connection)


def schema_current(engine: Engine) -> bool:
    """The database is at this release's head (checked without importing Alembic)."""
    with engine.connect() as connection:
        return _current(connection) == HEAD_REVISION


class SchemaTooNew(Exception):
    """The database was migrated by a newer release than this one."""


def _check_known(script: ScriptDirectory, revision: str | None) -> None:
    if revision is None:
        return
    from alembic.util import CommandError

    try:
        known = script.get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise SchemaTooNew(
            f"the database is at schema revision {revision}, newer than this release knows "
            f"(its newest is {head_revision()}): run the newer release, or downgrade the "
            "database with it first (docs/operations.md, rolling back a release)"
        )


def check_schema(engine: Engine) -> None:
    """Raise SchemaTooNew when the database is ahead of this release."""
    _check_known(_script(), current_revision(engine))


def needs_upgrade(engine: Engine) -> bool:
    return current_revision(engine) != head_revision()


def upgrade(engine: Engine) -> list[str]:
    """Apply the migrations up to head; return the revision ids applied, oldest first.

    Safe to call from several processes at once: on PostgreSQL an advisory lock, on SQLite
    the write lock, serialise them, and the late ones find nothing to do.
    """
    with engine.connect() as connection:
        if _current(connection) == HEAD_REVISION:
            return []
    script = _script()
    with write_engine(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        before = _current(connection)
        _check_known(script, before)
        pending = [
            revision.revision
            for revision in script.iterate_revisions("heads", before)
            if revision is not None
        ]
        pending.reverse()
        if pending:
            from alembic import command

            command.upgrade(alembic_config(connection), "head")
    return pending


#: SQLite primary result codes worth retrying: another connection holds the lock.
_SQLITE_TRANSIENT = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
#: PostgreSQL SQLSTATEs worth retrying besides class 08 (connection exception): the server
#: shutting down or starting, too many connections, a lock or serialisation conflict.
_PG_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "53300", "55P03", "40001", "40P01"})


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: the server is down, restarting or busy (a locked
    SQLite file, a lock timeout), as opposed to a bad statement, a schema that does not
    match (`no such table`, a column count) or a broken invariant, which retrying for
    minutes cannot fix. Decided by the driver's error code, not the exception class:
    sqlite3 raises `OperationalError` for both kinds."""
    from sqlalchemy.exc import DBAPIError, InterfaceError

    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    module = type(orig).__module__
    if module == "sqlite3":
        code = getattr(orig, "sqlite_errorcode", None)
        return isinstance(code, int) and code & 0xFF in _SQLITE_TRANSIENT
    if module.startswith("psycopg"):
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate is None:  # no answer from a server: the connection failed or closed
            return isinstance(orig, _psycopg_connection_errors())
        return sqlstate.startswith("08") or sqlstate in _PG_TRANSIENT
    # Another driver: a socket-level failure or a closed connection.
    return isinstance(orig, OSError) or isinstance(exc, InterfaceError)


def _psycopg_connection_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)
