"""A deployment's writes on SQLite: run inline on the event loop when nothing would wait,
through the driver for the hot statements, several steps in one UPDATE (issue 12).

Each shortcut stores what the general path stores (compared row by row, on SQLite and,
for the steps written at once, PostgreSQL), and the inline path never waits: a lock held
by another writer of the process or by another process sends the call to a worker thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from reconciler.executor import _record_durably
from reconciler.store import StatusStep, Store
from reconciler.store import fast as fast_module
from reconciler.store.db import WouldWait, inline, sqlite_writers
from reconciler.store.verification import verify
from tests.test_store import new as new_deployment

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
V = {"checks": [{"name": "executable", "ok": True, "message": ""}]}


def _at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _history(store: Store, *, at_once: bool) -> None:
    """Every kind of write a deployment makes, and the off-path ones beside them.
    ``at_once``: the executor's grouped steps through `set_statuses`; else one by one."""

    def steps(ident: int, *batch: StatusStep) -> None:
        if at_once:
            store.set_statuses(ident, list(batch))
        else:
            for s in batch:
                store.set_status(
                    ident,
                    s.status,
                    at=s.at,
                    message=s.message,
                    error_message=s.error_message,
                    validation=s.validation,
                )

    first = store.create_deployment(new_deployment("staging", created_at=_at(0)))
    store.set_status(first.id, "validating", at=_at(1))
    steps(
        first.id,
        StatusStep("in_progress", _at(2), message="deploying api", validation=V),
        StatusStep("completed", _at(3), message="api is at 1.0.0"),
    )
    second = store.create_deployment(
        new_deployment("staging", version="2.0.0", created_at=_at(4)), validating_at=_at(5)
    )
    steps(second.id, StatusStep("in_progress", _at(6), validation=V))
    store.add_event(
        second.id, status="in_progress", message="half", percent=50, details={"a": 1}, at=_at(7)
    )
    steps(second.id, StatusStep("failed", _at(8), error_message="exit status 1"))
    store.set_status(second.id, "rolled_back", at=_at(9), message="rolled back")
    web = store.create_deployment(
        new_deployment("staging", service="web", created_at=_at(10)), validating_at=_at(11)
    )
    steps(
        web.id,
        StatusStep("in_progress", _at(12), validation=V),
        StatusStep("timed_out", _at(13), error_message="deadline of 1s reached"),
    )


def _rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """What the tables hold, as stored (the ledger without its clock and hashes)."""
    queries = {
        "deployments": "SELECT * FROM deployments ORDER BY id",
        "deployment_events": "SELECT * FROM deployment_events ORDER BY id",
        "service_state": "SELECT * FROM service_state ORDER BY environment, service",
        "audit_ledger": "SELECT seq, kind, ref, payload FROM audit_ledger ORDER BY seq",
    }
    with store.engine.connect() as conn:
        return {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in queries.items()}


def _made(url: str, fill: Callable[[Store], None]) -> dict[str, list[tuple[Any, ...]]]:
    store = Store.from_url(url)
    try:
        fill(store)
        report = verify(store)
        assert report.ok, [f.line() for f in report.findings]
        return _rows(store)
    finally:
        store.engine.dispose()


def test_the_driver_path_stores_what_sqlalchemy_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statements run through sqlite3 (fast.py) bind and return values as SQLAlchemy
    does: the same rows, byte for byte, and a ledger that verifies."""
    driver = _made(f"sqlite:///{tmp_path / 'driver.db'}", lambda s: _history(s, at_once=True))
    monkeypatch.setattr(fast_module, "DRIVER", False)
    general = _made(f"sqlite:///{tmp_path / 'general.db'}", lambda s: _history(s, at_once=True))
    assert driver == general
    assert len(driver["deployment_events"]) == 14 and len(driver["audit_ledger"]) >= 3


def test_steps_written_at_once_equal_steps_written_one_by_one(db_url: str, tmp_path: Path) -> None:
    """`set_statuses` of an unfinished deployment (one UPDATE, one INSERT of the events,
    the service's row advanced once) leaves what the steps one by one leave."""
    at_once = _made(db_url, lambda s: _history(s, at_once=True))
    if db_url.startswith("sqlite"):
        other = f"sqlite:///{tmp_path / 'one_by_one.db'}"
        one_by_one = _made(other, lambda s: _history(s, at_once=False))
    else:
        from tests.conftest import pg_schema

        with pg_schema() as other:
            one_by_one = _made(other, lambda s: _history(s, at_once=False))
    assert at_once == one_by_one


def test_inline_runs_on_the_calling_thread_and_never_waits(sqlite_url: str) -> None:
    """Inline: the call runs here when no lock is taken. The process's writer lock held
    by another thread, or SQLite's by another process: `WouldWait` at once, nothing
    written, and the connection keeps its busy timeout for the next (waiting) writer."""
    store = Store.from_url(sqlite_url)
    writers = sqlite_writers(store.engine)
    assert writers is not None
    new = new_deployment("staging", created_at=T0)
    made = inline(store.engine, store.create_deployment, new)
    assert made.status == "pending"

    with writers.lock, pytest.raises(WouldWait):  # another writer of this process
        inline(store.engine, store.create_deployment, new)
    other = sqlite3.connect(str(make_url(sqlite_url).database), timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writes
    try:
        with pytest.raises(WouldWait):
            inline(store.engine, store.create_deployment, new)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [r.id for r in store.history()] == [made.id]
    assert not writers.lock.locked()
    with store.engine.connect() as conn:  # the pool's connections wait again
        timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    assert timeout == 30000
    store.engine.dispose()


def test_inline_is_sqlite_only(pg_url: str) -> None:
    store = Store.from_url(pg_url)
    try:
        with pytest.raises(WouldWait):
            inline(store.engine, store.history)
    finally:
        store.engine.dispose()


def test_a_write_that_would_wait_goes_to_a_thread_and_is_written(sqlite_url: str) -> None:
    """While another writer holds the lock, the run's write neither blocks the event loop
    nor is lost: it waits in a worker thread and is written once the lock is free."""
    store = Store.from_url(sqlite_url)
    writers = sqlite_writers(store.engine)
    assert writers is not None

    async def main() -> int:
        writers.lock.acquire()
        try:
            task = asyncio.ensure_future(
                _record_durably(
                    store, store.create_deployment, new_deployment("staging", created_at=T0)
                )
            )
            await asyncio.sleep(0)  # the inline attempt met the lock: handed to a thread
            assert not task.done()
        finally:
            writers.lock.release()
        return (await task).id

    ident = asyncio.run(main())
    assert [r.id for r in store.history()] == [ident]
    store.engine.dispose()
