"""Helpers shared by the store's query modules (`syncs.py`, `deployments.py`,
`service_state.py`, `outbox.py`, ...): argument checks, one-line messages,
row → record mapping, and portable INSERT ... ON CONFLICT. The one place they share code:
no query module imports another's private helpers."""

from __future__ import annotations

import gc
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, insert, select, update

from desired_state import one_line
from reconciler.store.records import (
    DeploymentRecord,
    EventRecord,
    LogLine,
    StoreError,
    SyncRecord,
    deployment_from,
    event_from,
    sync_from,
)

#: Values per IN (...) / OR chunk: stays far below SQLite's bound-variable limit.
CHUNK = 300


def aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreError(f"{name} must be a timezone-aware datetime")
    return value


def check(value: str, allowed: Collection[str], what: str) -> None:
    if value not in allowed:
        raise StoreError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def one_line_or_none(text: str | None) -> str | None:
    """Messages in records stay one line: they are printed in tables, logs and CSV."""
    return None if text is None else one_line(text)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while a read makes tens of thousands of small objects (the
    collector would walk them all, several times); restored after, whatever it was."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def deployment_record(
    row: Row[Any],
    progress: list[EventRecord] | None = None,
    log: list[LogLine] | None = None,
) -> DeploymentRecord:
    return deployment_from(row._mapping, progress, log)


def event_record(row: Row[Any]) -> EventRecord:
    return event_from(row._mapping)


def sync_record(row: Row[Any]) -> SyncRecord:
    return sync_from(row._mapping)


def insert_ignore(conn: Connection, table: Any, values: dict[str, Any], keys: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING."""
    # Each dialect's module is imported where it is used: a command reading a SQLite
    # database would otherwise pay ~0.1 s of start-up for the PostgreSQL one.
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        conn.execute(
            postgresql.insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
        )
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        conn.execute(
            sqlite.insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
        )
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        where = [table.c[key] == values[key] for key in keys]
        if conn.execute(select(*[table.c[key] for key in keys]).where(*where)).first() is None:
            conn.execute(insert(table).values(**values))


def upsert(conn: Connection, table: Any, values: dict[str, Any], keys: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET every other column."""
    changes = {name: value for name, value in values.items() if name not in keys}
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg = postgresql.insert(table).values(**values)
        conn.execute(pg.on_conflict_do_update(index_elements=keys, set_=changes))
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        lite = sqlite.insert(table).values(**values)
        conn.execute(lite.on_conflict_do_update(index_elements=keys, set_=changes))
    else:  # pragma: no cover
        where = [table.c[key] == values[key] for key in keys]
        if conn.execute(update(table).where(*where).values(**changes)).rowcount == 0:
            conn.execute(insert(table).values(**values))


# ---------------------------------------------------------------------------- reads

_PINNED = threading.local()  # this thread's (engine, connection) while `pinned_reads` runs


@contextmanager
def pinned_reads(engine: Engine) -> Iterator[None]:
    """The reads of this thread that use `reader` share one connection and one
    transaction until the block ends: a consistent view, and one checkout (on PostgreSQL
    one ping, BEGIN and ROLLBACK) instead of one per read."""
    if getattr(_PINNED, "engine", None) is engine:
        yield  # already pinned by an outer block
        return
    with engine.connect() as conn:
        _PINNED.engine, _PINNED.conn = engine, conn
        try:
            yield
        finally:
            _PINNED.engine = _PINNED.conn = None


@contextmanager
def reader(engine: Engine) -> Iterator[Connection]:
    """A connection to read with: the pinned one (`pinned_reads`), else a fresh one."""
    if getattr(_PINNED, "engine", None) is engine:
        yield _PINNED.conn
        return
    with engine.connect() as conn:
        yield conn
