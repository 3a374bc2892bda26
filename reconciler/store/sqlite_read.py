"""A read-only view of a SQLite database through the standard library's `sqlite3`.

What `status`, `history` and `show` read, answered without SQLAlchemy, whose import is
200-300 ms of a command's start-up (bench/bench_cli.py). It runs the store's own
statements, compiled for SQLite into `read_sql.py` (`read_statements.py` generates it; a
test regenerates and compares), converts the columns as the store's types do (naive UTC
text → aware datetime, JSON text → values) and maps rows to records with the functions
the `Store` uses (`records.deployment_from`, ...): same SQL, same records.

The file is opened ``mode=ro`` (the reader can change nothing) with the store's busy
timeout. `SQLiteReader.open` answers None when the database is missing or not at this
release's schema revision: the caller then takes the `Store` path, which creates,
refuses or explains as before (`reading.open_reader`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.store.read_sql import (
    BUSY_TIMEOUT_MS,
    CHUNK,
    HISTORY,
    SPARSE_SINCE,
    STATE_SQL,
    STATEMENTS,
)
from reconciler.store.records import (
    DeploymentRecord,
    EnvironmentStateRecord,
    LiveObservation,
    LogLine,
    ServiceState,
    StoredDecisions,
    StoreError,
    SyncRecord,
    deployment_from,
    environment_state_from,
    event_from,
    service_states_from_text,
    sync_from,
)
from reconciler.store.revision import HEAD_REVISION

#: The form bound for a time (SQLAlchemy's SQLite DATETIME, naive UTC: models.UTCDateTime).
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


_CONVERT: dict[str, Callable[[Any], Any]] = {"t": _time, "j": json.loads, "b": bool}


def bind_time(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreError("since must be a timezone-aware datetime")
    return value.astimezone(UTC).replace(tzinfo=None).strftime(TIME_FORMAT)


class SQLiteReader:
    """The reads of `status`, `history` and `show`, as the `Store` answers them."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: str | Path) -> SQLiteReader | None:
        """The reader of the database file at ``path``, or None when the file is missing,
        cannot be opened read-only, or is not at `HEAD_REVISION` (the `Store` decides)."""
        file = Path(path).absolute()  # as the store opens it (pysqlite: abspath, no ~)
        if not file.is_file():
            return None
        try:
            conn = sqlite3.connect(
                f"{file.as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error:
            return None
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.Error:  # no alembic_version (an empty file), or unreadable
            row = None
        if row is None or row[0] != HEAD_REVISION:
            conn.close()
            return None
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """The reads inside the block share one transaction: one consistent view."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    # ---- running the generated statements

    def _run(
        self, name: str, params: Mapping[str, Any] | None = None, **expand: list[Any]
    ) -> list[tuple[Any, ...]]:
        """The rows of statement ``name``, each column converted as its kind says;
        ``expand``: the values of an expanding parameter (``IN (...)``)."""
        return self._execute(STATEMENTS[name], params, expand)[1]

    def _mappings(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of ``name`` as column name → converted value (what the store's rows map)."""
        names, rows = self._execute(STATEMENTS[name], params, {})
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _execute(
        self,
        statement: tuple[str, str],
        params: Mapping[str, Any] | None,
        expand: Mapping[str, list[Any]],
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and converted rows of a generated (SQL, kinds) statement."""
        sql, kinds = statement
        bound = dict(params or {})
        for key, values in expand.items():
            names = [f"{key}_{i}" for i in range(len(values))]
            sql = sql.replace(f"__[POSTCOMPILE_{key}]", ", ".join(f":{n}" for n in names))
            bound.update(zip(names, values, strict=True))
        cursor = self.conn.execute(sql, bound)
        rows = cursor.fetchall()
        columns = [d[0] for d in cursor.description]
        cursor.close()
        convert = [(i, _CONVERT[k]) for i, k in enumerate(kinds) if k != "-"]
        if not convert:
            return columns, rows
        out = []
        for row in rows:
            values = list(row)
            for i, fn in convert:
                if values[i] is not None:
                    values[i] = fn(values[i])
            out.append(tuple(values))
        return columns, out

    # ---- history and show

    def history(
        self,
        *,
        environment: str | None = None,
        service: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[DeploymentRecord]:
        """As `Store.history`: the same statement for the same filters (without paging)."""
        params: dict[str, Any] = {"limit": limit, "environment": environment}
        params.update(service=service, status=status)
        form = "none"
        with self.reading():
            if since is not None:
                params["since"] = bind_time(since)
                count = self._run("few_since", {"since": params["since"]})[0][0]
                form = "few" if int(count) < SPARSE_SINCE else "many"
            given = {k: v for k, v in params.items() if v is not None}
            key = (environment is not None, service is not None, status is not None, form)
            names, rows = self._execute(HISTORY[key], given, {})
            return [deployment_from(dict(zip(names, row, strict=True))) for row in rows]

    def get_deployment(
        self, deployment_id: int, *, with_progress: bool = False, with_log: bool = False
    ) -> DeploymentRecord | None:
        key = {"id": deployment_id}
        with self.reading():
            found = self._mappings("deployment", key)
            if not found:
                return None
            progress = (
                [event_from(m) for m in self._mappings("events", key)] if with_progress else None
            )
            log = [LogLine(*row) for row in self._run("log", key)] if with_log else None
        return deployment_from(found[0], progress, log)

    def commit_subjects(self, sync_ids: Collection[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        wanted = sorted(set(sync_ids))
        for start in range(0, len(wanted), CHUNK):
            rows = self._run("commit_subjects", ids=wanted[start : start + CHUNK])
            out.update({int(i): str(subject) for i, subject in rows})
        return out

    # ---- status

    def applied_sync(self) -> SyncRecord | None:
        found = self._mappings("applied_sync")
        return sync_from(found[0]) if found else None

    def refusal_in_force(self) -> SyncRecord | None:
        found = self._mappings("last_applied_or_refused")
        if not found or found[0]["result"] != "refused":
            return None
        return sync_from(found[0])

    def environment_states(self) -> dict[str, EnvironmentStateRecord]:
        return {m["name"]: environment_state_from(m) for m in self._mappings("environment_states")}

    def environment_names(self) -> list[str]:
        return [row[0] for row in self._run("environment_names")]

    def environment_states_of(self, names: Collection[str]) -> dict[str, EnvironmentStateRecord]:
        found: dict[str, EnvironmentStateRecord] = {}
        wanted = sorted(set(names))
        for start in range(0, len(wanted), CHUNK):
            names_, rows = self._execute(
                STATEMENTS["environment_states_in"], None, {"names": wanted[start : start + CHUNK]}
            )
            for row in rows:
                record = environment_state_from(dict(zip(names_, row, strict=True)))
                found[record.name] = record
        return dict(sorted(found.items()))

    def environment_changes(self) -> dict[str, int]:
        return {env: int(seq) for env, seq in self._run("environment_changes")}

    def stored_decisions(self) -> dict[str, StoredDecisions]:
        return {row[0]: StoredDecisions(*row) for row in self._run("stored_decisions")}

    def suspension_reasons(self) -> dict[str, str | None]:
        return {env: note for env, note in self._run("suspension_reasons")}

    def suspended_environments(self) -> set[str]:
        return {row[0] for row in self._run("suspended")}

    def service_states(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], ServiceState]:
        if environments is None:
            return service_states_from_text(self.conn.execute(STATE_SQL).fetchall())
        wanted = sorted(set(environments))
        found: list[tuple[Any, ...]] = []
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            marks = ", ".join("?" for _ in chunk)
            found += self.conn.execute(f"{STATE_SQL} WHERE environment IN ({marks})", chunk)
        return service_states_from_text(found)

    def completed_versions(
        self, triples: Collection[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        found: set[tuple[str, str, str]] = set()
        for e, s, v in sorted(set(triples)):  # one index search each
            found.update(
                (r[0], r[1], r[2]) for r in self._run("completed_one", {"e0": e, "s0": s, "v0": v})
            )
        return found

    def live_versions(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], LiveObservation]:
        rows: list[tuple[Any, ...]] = []
        if environments is None:
            rows = self._run("live")
        else:
            envs = sorted(set(environments))
            for start in range(0, len(envs), CHUNK):
                rows += self._run("live_in", envs=envs[start : start + CHUNK])
        return {(row[0], row[1]): LiveObservation(*row) for row in rows}
