"""The sqlite3 reader of `status`, `history` and `show` (reconciler/store/sqlite_read.py):
its SQL is the store's, compiled (read_sql.py is current), it gives the records the `Store`
gives for the same database, it steps aside for a database it cannot read as the store
would, and the commands that use it never import SQLAlchemy."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.store import CommitMeta, LiveObservation, Store, StoreError
from reconciler.store import sqlite_read as sqlite_read_module
from reconciler.store.read_statements import OUTPUT, render
from reconciler.store.reading import open_reader, sqlite_path
from reconciler.store.sqlite_read import SQLiteReader
from tests.support import World
from tests.test_cli_output import run_listing_modules
from tests.test_cli_status import NOT_FOR_READING, loaded
from tests.test_store import at, new

STRATEGY = {"type": "rolling", "max_unavailable": 1}  # JSON with more than one key


def test_the_generated_statements_are_current():
    assert OUTPUT.read_text(encoding="utf-8") == render(), "run scripts/gen_read_sql.py"


def fill(store: Store) -> None:
    """A ledger with every kind of row the reader reads: syncs (applied, refused, with and
    without subject), deployments of several environments/services/statuses/times with
    events and log lines, environment states, a suspension with a reason, live versions."""
    sync = store.begin_sync(
        trigger="poll",
        seen_at=at(0),
        commit=CommitMeta(sha="a" * 40, author="Ada", time=at(-60), subject="first 'quoted'"),
    )
    store.finish_sync(
        sync,
        result="ok",
        ended_at=at(1),
        environments_changed=["staging"],
        errors=[],
        full_load=True,
    )
    finals = ["completed", "failed", "completed", "timed_out", "in_progress", "pending"]
    combos = itertools.product(("staging", "production"), ("api", "web"), ("1.0", "1.1"))
    for n, (env, svc, version) in enumerate(combos):
        record = store.create_deployment(
            new(env, svc, version, sync_id=sync, created_at=at(60 * n))
        )
        final = finals[n % len(finals)]
        if final == "pending":
            continue
        store.set_status(record.id, "in_progress", at=at(60 * n + 1))
        store.add_event(
            record.id,
            status="in_progress",
            message="half",
            percent=50,
            details={"step": n},
            at=at(60 * n + 2),
        )
        store.append_log(record.id, [("stdout", f"line {n}", at(60 * n + 3))])
        if final != "in_progress":
            store.set_status(
                record.id,
                final,
                at=at(60 * n + 10),
                error_message=None if final == "completed" else "it broke",
                validation={"ok": final == "completed"},
            )
    refused = store.begin_sync(trigger="poll", seen_at=at(2000), commit=None)
    store.finish_sync(
        refused,
        result="refused",
        ended_at=at(2001),
        environments_changed=[],
        errors=[{"file": "x.yaml", "message": "bad"}],
        full_load=False,
        error_message="unsigned head",
    )
    store.save_environment_states(
        [
            ("staging", {"services": {"api": {"version": "1.1"}}}, "staging.yaml"),
            ("production", {"depends_on": ["staging"]}, "production.yaml"),
        ],
        commit="a" * 40,
        at=at(5),
    )
    store.record_operator_action(
        environment="production",
        service=None,
        action="suspend",
        actor="ada",
        note="freeze",
        at=at(30),
    )
    store.save_live_versions(
        [
            LiveObservation("staging", "api", "1.0", 1, "1.0", at(40)),
            LiveObservation("production", "web", None, None, None, at(41), error="no answer"),
        ]
    )


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[Store, SQLiteReader]]:
    url = f"sqlite:///{tmp_path / 'reconciler.db'}"
    store = Store.from_url(url)
    fill(store)
    reader = SQLiteReader.open(tmp_path / "reconciler.db")
    assert reader is not None, "a database at the head revision"
    yield store, reader
    reader.close()
    store.close()


HISTORY_FILTERS: list[dict[str, Any]] = [
    {"environment": e, "service": s, "status": st, "since": since, "limit": limit}
    for e, s, st, since, limit in itertools.product(
        (None, "staging", "nowhere"),
        (None, "api"),
        (None, "completed", "failed"),
        (None, at(200), at(100_000)),
        (50, 2),
    )
]


def test_history_is_the_stores_for_every_filter(both: tuple[Store, SQLiteReader]):
    store, reader = both
    for filters in HISTORY_FILTERS:
        assert reader.history(**filters) == store.history(**filters), filters
    assert len(store.history()) == 8  # the filters above did select something


def test_history_since_many_recent_rows(
    both: tuple[Store, SQLiteReader], monkeypatch: pytest.MonkeyPatch
):
    """The other form of `since` (more recent rows than SPARSE_SINCE): same rows."""
    from reconciler.store import deployments

    store, reader = both
    monkeypatch.setattr(deployments, "_SPARSE_SINCE", 2)
    monkeypatch.setattr(sqlite_read_module, "SPARSE_SINCE", 2)
    for filters in HISTORY_FILTERS:
        assert reader.history(**filters) == store.history(**filters), filters


def test_show_and_status_reads_are_the_stores(both: tuple[Store, SQLiteReader]):
    store, reader = both
    for ident in range(0, 10):
        for progress, log in ((False, False), (True, True)):
            got = reader.get_deployment(ident, with_progress=progress, with_log=log)
            assert got == store.get_deployment(ident, with_progress=progress, with_log=log)
    full = reader.get_deployment(2, with_progress=True, with_log=True)
    assert full is not None and full.progress and full.log and full.validation is not None
    assert (
        reader.commit_subjects([1, 2, 99])
        == store.commit_subjects([1, 2, 99])
        == {1: "first 'quoted'"}
    )
    assert reader.applied_sync() == store.applied_sync() is not None
    assert reader.refusal_in_force() == store.refusal_in_force() is not None
    assert reader.environment_states() == store.environment_states()
    assert reader.suspension_reasons() == store.suspension_reasons() == {"production": "freeze"}
    assert reader.suspended_environments() == store.suspended_environments()
    for envs in (None, ["staging"], ["nowhere"], ["staging", "production"]):
        assert reader.service_states(envs) == store.service_states(envs), envs
        assert reader.live_versions(envs) == store.live_versions(envs), envs
    triples = {("staging", "api", "1.0"), ("staging", "api", "1.1"), ("production", "web", "9")}
    assert reader.completed_versions(triples) == store.completed_versions(triples)
    assert reader.completed_versions(triples)  # one of them completed
    with reader.reading(), reader.reading():  # nested: one transaction
        assert reader.conn.in_transaction
    assert not reader.conn.in_transaction


def test_the_reader_cannot_write(both: tuple[Store, SQLiteReader]):
    _, reader = both
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.conn.execute("DELETE FROM deployments")


def test_a_database_not_at_the_head_revision_goes_to_the_store(tmp_path: Path):
    path = tmp_path / "reconciler.db"
    url = f"sqlite:///{path}"
    Store.from_url(url).close()
    assert isinstance(open_reader(url), SQLiteReader)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0008'")
    assert SQLiteReader.open(path) is None
    with pytest.raises(StoreError, match="run `reconciler db upgrade`"):
        open_reader(url)  # the store's own answer, as before


def test_a_missing_database_is_created_by_the_store(tmp_path: Path):
    path = tmp_path / "sub" / "reconciler.db"
    assert SQLiteReader.open(path) is None
    store = open_reader(f"sqlite:///{path}")
    assert isinstance(store, Store) and store.history() == []
    assert isinstance(open_reader(f"sqlite:///{path}"), SQLiteReader)  # now at the head


def test_which_urls_the_reader_takes():
    assert sqlite_path("sqlite:////var/lib/r/reconciler.db") == "/var/lib/r/reconciler.db"
    assert sqlite_path("sqlite:///state/a%20b.db") == "state/a b.db"
    for url in (
        "postgresql+psycopg://u@h/db",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///x.db?mode=ro",
        "sqlite+pysqlite:///x.db",
    ):
        assert sqlite_path(url) is None, url


@pytest.mark.postgres
def test_postgresql_is_read_through_the_store(pg_url: str):
    store = open_reader(pg_url)
    try:
        assert isinstance(store, Store)
    finally:
        store.close()


@pytest.mark.timeout(180)
def test_reading_commands_on_sqlite_import_no_sqlalchemy(tmp_path: Path):
    world = World(tmp_path, retries=1)
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    config = ("--config", str(world.config))
    for args in (("status",), ("history",), ("history", "--since", "7d"), ("show", "1")):
        modules = run_listing_modules(*config, *args)
        assert "sqlite3" in modules, args  # it did read the database
        unwanted = ("sqlalchemy", "asyncio", "ssl", *NOT_FOR_READING)
        assert not loaded(modules, unwanted), (args, loaded(modules, unwanted))
