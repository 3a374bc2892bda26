"""One deploying process per database (reconciler.store.holder), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reconciler.store import Store
from reconciler.store.holder import DatabaseHeld, DatabaseLock
from tests.conftest import POSTGRES_URL_ENV
from tests.support import ROOT, wait_for

AT = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


@pytest.fixture
def stores(db_url: str) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database, as two daemons would open it."""
    a, b = Store.from_url(db_url), Store.from_url(db_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_second_holder_is_refused_with_the_first_named(stores: tuple[Store, Store]) -> None:
    a, b = stores
    first, second = DatabaseLock(a.engine), DatabaseLock(b.engine)
    first.acquire(role="daemon", state_dir="/srv/one", at=AT)
    try:
        with pytest.raises(DatabaseHeld) as refused:
            second.acquire(role="daemon", state_dir="/srv/two", at=AT)
        message = str(refused.value)
        assert "\n" not in message
        for part in (socket.gethostname(), f"pid {os.getpid()}", "/srv/one", "2026-11-29T08:00"):
            assert part in message
    finally:
        first.release()
    # Released: the next one takes it, and is the one named from now on.
    second.acquire(role="sync", state_dir="/srv/two", at=AT)
    try:
        holder = DatabaseLock(a.engine).holder()
        assert holder is not None and holder.state_dir == "/srv/two" and holder.role == "sync"
    finally:
        second.release()


_HOLD = """
import sys
from datetime import UTC, datetime
from reconciler.store import Store
from reconciler.store.holder import DatabaseLock
store = Store.from_url(sys.argv[1], migrate=False)
lock = DatabaseLock(store.engine)
lock.acquire(role="daemon", state_dir="/srv/killed", at=datetime.now(UTC))
print("held", flush=True)
sys.stdin.read()
"""


def _try(lock: DatabaseLock) -> bool:
    try:
        lock.acquire(role="daemon", state_dir="/srv/next", at=AT)
    except DatabaseHeld:
        return False
    return True


def test_a_killed_holder_does_not_block_the_next_start(db_url: str) -> None:
    Store.from_url(db_url).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, db_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        store = Store.from_url(db_url, migrate=False)
        lock = DatabaseLock(store.engine)
        with pytest.raises(DatabaseHeld, match="/srv/killed"):
            lock.acquire(role="daemon", state_dir="/srv/next", at=AT)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The kernel drops the flock at once; PostgreSQL ends the session when it reads the
        # closed socket, a moment later: poll for it.
        wait_for(lambda: _try(lock), timeout=10, what="the dead holder's lock to go")
        holder = lock.holder()
        assert holder is not None and holder.state_dir == "/srv/next"
        lock.release()
        store.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_postgres_locks_are_per_schema(pg_url: str) -> None:
    """Two schemas of one database (two installations, or two tests) do not share it."""
    base = os.environ[POSTGRES_URL_ENV]
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    other_url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    a = Store.from_url(pg_url)
    b = Store.from_url(other_url.render_as_string(hide_password=False))
    first, second = DatabaseLock(a.engine), DatabaseLock(b.engine)
    try:
        first.acquire(role="daemon", state_dir="/srv/a", at=AT)
        second.acquire(role="daemon", state_dir="/srv/b", at=AT)
    finally:
        first.release()
        second.release()
        a.close()
        b.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_a_release_frees_the_lock_at_once(stores: tuple[Store, Store]) -> None:
    """A restart takes the lock again straight away (no waiting for the server to notice a
    closed session)."""
    a, b = stores
    for store in (a, b) * 10:
        lock = DatabaseLock(store.engine)
        lock.acquire(role="daemon", state_dir="/srv/one", at=AT)
        lock.release()


def _terminate_holders(url: str) -> None:
    """End the server sessions holding advisory locks on this schema's database (what a
    server restart or an administrator's pg_terminate_backend does)."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    # With a timeout, it waits until the session is gone (PostgreSQL 14+).
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND objid = "
                    "(hashtextextended('reconciler-daemon:' || current_database() || '.' "
                    "|| current_schema(), 0) & 4294967295)::oid"
                )
            )
    finally:
        engine.dispose()


def test_a_lost_postgres_session_is_taken_again_or_reported(pg_url: str) -> None:
    a, b = Store.from_url(pg_url), Store.from_url(pg_url)
    lock, other = DatabaseLock(a.engine), DatabaseLock(b.engine)
    try:
        lock.acquire(role="daemon", state_dir="/srv/one", at=AT)
        lock.check(at=AT)  # alive: nothing to do
        _terminate_holders(pg_url)
        # Nobody took it meanwhile: the check takes it again, and it keeps others out.
        lock.check(at=AT)
        with pytest.raises(DatabaseHeld):
            other.acquire(role="daemon", state_dir="/srv/two", at=AT)
        # Lost again, and another process was quicker: the check says who holds it now.
        _terminate_holders(pg_url)
        assert _try(other)
        with pytest.raises(DatabaseHeld, match="/srv/next"):
            lock.check(at=AT)
    finally:
        lock.release()
        other.release()
        a.close()
        b.close()
