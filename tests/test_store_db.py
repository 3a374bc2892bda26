"""Engines, migrations and concurrency of the store."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from reconciler.store import (
    NewDeployment,
    Store,
    current_revision,
    head_revision,
    make_engine,
    needs_upgrade,
    upgrade,
)
from reconciler.store.db import HEAD_REVISION, MIGRATIONS_DIR, _script, alembic_config
from reconciler.store.models import metadata

# Every revision, oldest first: what an empty database gets.
ALL = [rev.revision for rev in reversed(list(_script().walk_revisions()))]


def test_head_revision_constant_names_the_newest_migration():
    # The daemon skips importing Alembic when the database is at HEAD_REVISION.
    assert HEAD_REVISION == _script().get_current_head() == ALL[-1]


TABLES = {
    "syncs",
    "deployments",
    "deployment_events",
    "deployment_logs",
    "service_state",
    "environment_state",
    "operator_actions",
    "operator_suspended",
}


def test_migrations_apply_from_empty_and_are_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        assert needs_upgrade(engine)
        applied = upgrade(engine)
        assert applied == ALL
        assert applied[-1] == head_revision()
        assert current_revision(engine) == head_revision()
        assert not needs_upgrade(engine)
        assert upgrade(engine) == []
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_head_schema_matches_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
        assert differences == []
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        assert upgrade(engine) == ALL
    finally:
        engine.dispose()


def test_migrations_ship_inside_the_package() -> None:
    assert MIGRATIONS_DIR.parent.name == "store"
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()


def test_concurrent_upgrades_postgres(pg_url: str) -> None:
    engines = [make_engine(pg_url) for _ in range(3)]
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate(index: int) -> None:
        try:
            results.append(upgrade(engines[index]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert errors == []
    assert sorted(results) == [[], [], ALL]


# --------------------------------------------------------------------------- SQLite engine


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "reconciler.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert path.parent.is_dir()
    finally:
        engine.dispose()


def test_sqlite_transactions_are_real(tmp_path: Path) -> None:
    """BEGIN is emitted (DDL and SELECT are transactional, unlike pysqlite's default)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'tx.db'}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            assert conn.in_transaction()
            assert conn.connection.dbapi_connection is not None
            assert conn.connection.dbapi_connection.in_transaction
            conn.rollback()
        assert "t" not in inspect(engine).get_table_names(), "DDL was rolled back"
    finally:
        engine.dispose()


def test_concurrent_writers_sqlite(sqlite_url: str) -> None:
    store = Store.from_url(sqlite_url)
    errors: list[BaseException] = []
    start = threading.Barrier(4)
    t0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(25):
                record = store.create_deployment(
                    NewDeployment(
                        environment=f"env{worker}",
                        service=f"svc{i % 3}",
                        version=f"1.{i}",
                        previous_version=None,
                        provider="local",
                        provider_type="command",
                        strategy={"type": "rolling"},
                        trigger="git",
                        commit="c" * 40,
                        commit_author=None,
                        attempt=1,
                        timeout_seconds=60,
                        params={},
                    )
                )
                now = t0 + timedelta(seconds=i)
                store.set_status(record.id, "in_progress", at=now)
                store.add_event(
                    record.id, status="in_progress", message="half", percent=50, details={}, at=now
                )
                store.append_log(record.id, [("stdout", f"line {i}", now)])
                store.set_status(record.id, "completed" if i % 2 else "failed", at=now)
                store.history(environment=f"env{(worker + 1) % 4}", limit=5)
                store.service_states()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == [], errors
        assert len(store.history(limit=1000)) == 100
        states = store.service_states()
        assert len(states) == 12
        store.rebuild_service_state()
        assert store.service_states() == states
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM deployment_logs")).scalar() == 100
    finally:
        store.engine.dispose()


@pytest.mark.parametrize("migrate", [True, False])
def test_from_url_migrate_flag(sqlite_url: str, migrate: bool) -> None:
    store = Store.from_url(sqlite_url, migrate=migrate)
    try:
        assert (current_revision(store.engine) is not None) is migrate
    finally:
        store.engine.dispose()


def test_a_sqlite_file_deleted_or_replaced_underneath_is_noticed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from reconciler.store import Store, StoreError

    path = tmp_path / "state" / "reconciler.db"
    store = Store.from_url(f"sqlite:///{path}")
    replaced = Store.from_url(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        store.ping()
        assert store.file_problem() is None
        path.unlink()
        with caplog.at_level("ERROR"):
            for _ in range(2):
                with pytest.raises(StoreError, match="was deleted while the daemon runs"):
                    store.ping()
        assert [r.getMessage() for r in caplog.records].count(
            f"event=database_lost path={path} reason=deleted"
        ) == 1
        # Replaced by another file at the same path (a restore under a running daemon).
        replaced.ping()
        (tmp_path / "other.db").rename(tmp_path / "moved.db")
        (tmp_path / "moved.db").rename(tmp_path / "other.db")
        assert replaced.file_problem() is None  # the same file, moved back: still it
        (tmp_path / "other.db").unlink()
        Store.from_url(f"sqlite:///{tmp_path / 'other.db'}").close()
        assert "was replaced" in (replaced.file_problem() or "")
    finally:
        store.close()
        replaced.close()


def test_postgres_has_no_file_to_lose(pg_url: str) -> None:
    from reconciler.store import Store

    store = Store.from_url(pg_url)
    try:
        assert store.file_problem() is None
        store.ping()
    finally:
        store.close()
