"""Who may deploy from a database: a lock that dies with its holder, and a row naming it.

Two daemons on one SQLite file (two state directories) would each recover the other's
running deployments as "interrupted" and deploy them again: SQLite is single-replica, the
second one refuses to start. On PostgreSQL several daemons (replicas) share the work
through environment leases (reconciler/replicas.py); what must stay alone there is a
standalone command that deploys (`reconciler deploy` without a daemon), which has no lease.

- PostgreSQL: a session advisory lock held by one connection kept open for the holder's
  life; the server drops it when that session ends (a killed process closes its socket).
  Daemons take it *shared* (any number of replicas), a standalone command *exclusive*.
  Its key is derived from the database and schema names, so that databases, and the test
  suite's per-test schemas, never share it.
- SQLite: an exclusive ``flock`` on ``<database>-daemon.lock`` beside the file, which the
  kernel drops when the holder dies. It works across state directories on one host (a
  SQLite file is not shared between hosts).

The ``daemon_holder`` row (id 1) records who took the lock exclusively, for the refusal
message only: a stale row left by a killed holder is overwritten by the next one. (Shared
holders are named by the `replicas` table.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, Engine, delete, select, text

from reconciler.store import models
from reconciler.store.db import write_engine
from reconciler.store.rows import aware, upsert

log = logging.getLogger(__name__)

_H = models.daemon_holder
_ROW_ID = 1

# hashtextextended: PostgreSQL >= 11. The prefix keeps the key apart from other users of
# advisory locks in the same database.
_PG_KEY = (
    "hashtextextended('reconciler-daemon:' || current_database() || '.' "
    "|| coalesce(current_schema(), ''), 0)"
)
_PG_TRY_LOCK = text(f"SELECT pg_try_advisory_lock({_PG_KEY})")
_PG_UNLOCK = text(f"SELECT pg_advisory_unlock({_PG_KEY})")
_PG_TRY_SHARED = text(f"SELECT pg_try_advisory_lock_shared({_PG_KEY})")
_PG_UNLOCK_SHARED = text(f"SELECT pg_advisory_unlock_shared({_PG_KEY})")
_PG_ALIVE = text("SELECT 1")


@dataclass(frozen=True)
class Holder:
    role: str  # "daemon", or the standalone command that deploys ("sync", "deploy", ...)
    host: str
    pid: int
    state_dir: str
    since: datetime

    def describe(self) -> str:
        when = self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"host {self.host}, pid {self.pid}, state directory {self.state_dir}, since {when}"


class DatabaseHeld(Exception):
    """Another process holds the database; the message names it (one line)."""

    def __init__(
        self, where: str, holder: Holder | None, *, sqlite: bool = False, replicas: bool = False
    ) -> None:
        who = (
            f"another reconciler {holder.role} ({holder.describe()})"
            if holder
            else ("another reconciler process")
        )
        if replicas:
            message = (
                f"reconciler daemons (replicas) deploy from the database {where}: a standalone "
                "command cannot deploy beside them; run it where a daemon runs (it asks the "
                "daemon), or stop them (`reconciler status --replicas` lists them)"
            )
        elif sqlite:
            message = (
                f"{who} holds the database {where}: SQLite is single-replica (one daemon per "
                "database file); stop it, give this one a database of its own, or use "
                "PostgreSQL to run several replicas"
            )
        else:
            message = (
                f"{who} holds the database {where}: a standalone command deploys alone; "
                "stop it, or give this one a database of its own"
            )
        super().__init__(message)
        self.holder = holder


def _where(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return url.render_as_string(hide_password=True)


class DatabaseLock:
    """The database's deploy lock (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pg: Connection | None = None
        self._file: IO[bytes] | None = None
        self._as: tuple[str, str, bool] | None = None  # (role, state_dir, shared) taken as
        self._shared = False

    def _lock_path(self) -> Path | None:
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return Path(f"{database}-daemon.lock").expanduser()

    def acquire(self, *, role: str, state_dir: str, at: datetime, shared: bool = False) -> None:
        """Take the lock and record this process as its holder; DatabaseHeld if taken.

        ``shared`` (a daemon on PostgreSQL): beside other shared holders (replicas), never
        beside an exclusive one. On SQLite the lock is always exclusive (single-replica)."""
        aware(at, "at")
        if self.engine.dialect.name == "postgresql":
            conn = self.engine.connect()
            try:
                got = bool(conn.execute(_PG_TRY_SHARED if shared else _PG_TRY_LOCK).scalar())
                conn.commit()  # the session lock outlives the transaction; stay idle
            except BaseException:
                conn.close()
                raise
            if not got:
                conn.close()
                replicas = not shared and self._replicas_alive()
                raise DatabaseHeld(
                    _where(self.engine), None if replicas else self.holder(), replicas=replicas
                )
            self._pg = conn
            self._shared = shared
            if shared:
                self._as = (role, state_dir, shared)
                return  # the replicas table names the shared holders
        else:
            path = self._lock_path()
            if path is not None:
                f = path.open("ab")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    raise DatabaseHeld(_where(self.engine), self.holder(), sqlite=True) from None
                self._file = f
        try:
            with write_engine(self.engine).begin() as conn:
                values = {
                    "id": _ROW_ID,
                    "role": role,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "state_dir": state_dir,
                    "since": at,
                }
                upsert(conn, _H, values, ["id"])
        except BaseException:
            self._unlock()
            raise
        self._as = (role, state_dir, False)

    def _replicas_alive(self) -> bool:
        """Whether a daemon holds the lock shared (one of the replicas has a row)."""
        with contextlib.suppress(Exception), self.engine.connect() as conn:
            return conn.execute(select(models.replicas.c.id).limit(1)).first() is not None
        return False

    def check(self, *, at: datetime) -> None:
        """Make sure this process still holds the lock; DatabaseHeld if another took it.

        A flock cannot be lost, but a PostgreSQL session can end under the holder (a
        server restart, a terminated backend) and the lock with it. Then the lock is
        taken again, if it is still free. A database that does not answer says nothing
        either way (nobody else can take the lock meanwhile): asked again at the next check.
        """
        if self._as is None or self.engine.dialect.name != "postgresql":
            return
        conn = self._pg
        if conn is not None:
            try:
                conn.execute(_PG_ALIVE)
                conn.commit()
                return
            except Exception:
                self._unlock()  # the session is gone, and the lock with it
        role, state_dir, shared = self._as
        try:
            self.acquire(role=role, state_dir=state_dir, at=at, shared=shared)
        except DatabaseHeld:
            raise
        except Exception:
            return  # the server is still away: try again at the next check
        log.warning("event=database_lock_regained")

    def holder(self) -> Holder | None:
        """Who recorded itself last as the holder (stale if nobody holds the lock now)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_H).where(_H.c.id == _ROW_ID)).one_or_none()
        if row is None:
            return None
        m = row._mapping
        return Holder(m["role"], m["host"], m["pid"], m["state_dir"], m["since"])

    def release(self) -> None:
        """Clear the holder row and drop the lock (idempotent)."""
        self._as = None
        if self._pg is None and self._file is None:
            return
        # A database that is away loses the row with the lock: nothing to keep.
        with contextlib.suppress(Exception), write_engine(self.engine).begin() as conn:
            conn.execute(delete(_H).where(_H.c.id == _ROW_ID, _H.c.pid == os.getpid()))
        self._unlock()

    def _unlock(self) -> None:
        conn, self._pg = self._pg, None
        if conn is not None:
            with contextlib.suppress(Exception):
                # Unlock at once (the server ends a closed session a moment later), then
                # close the session itself rather than pool it.
                conn.execute(_PG_UNLOCK_SHARED if self._shared else _PG_UNLOCK)
                conn.commit()
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()
        f, self._file = self._file, None
        if f is not None:
            f.close()
