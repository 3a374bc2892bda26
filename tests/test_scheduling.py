"""Engine scheduling hardening (issue 6): decisions taken after the slot, scheduler
wake-ups on the loop, planning off the loop, the running look-up's index, which database
errors are retried, and operator sync requests that coalesce without being lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError

import reconciler.planning
import reconciler.runners
from reconciler.engine import Engine
from reconciler.store import NewDeployment, Store, is_transient
from tests.support import World, git
from tests.test_engine import run_engine

pytestmark = pytest.mark.timeout(60)

WINDOW = '[{cron: "0 9 * * *", duration: 1h}]'


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


class WatchedSlots(asyncio.Semaphore):
    """The engine's `max_parallel` semaphore, telling the test when someone waits for it."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.waiting = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waiting.set()
        return await super().acquire()


def _suspend(engine: Engine, world: World) -> None:
    engine.store.record_operator_action(
        environment="production",
        service=None,
        action="suspend",
        actor="test",
        note=None,
        at=engine.clock(),
    )


def _close_window(clock: dict[str, datetime]) -> Callable[[Engine, World], None]:
    def change(engine: Engine, world: World) -> None:
        clock["now"] += timedelta(hours=1)  # 10:30: the window closed at 10:00

    return change


CHANGES: dict[str, Callable[[Engine, World], Any]] = {
    "newer version": lambda e, w: w.repo.set_env("production", {"api": "3.0"}, windows=WINDOW),
    "environment deleted": lambda e, w: (
        (w.repo.path / "production.yaml").unlink(),
        w.repo.commit("delete production"),
    ),
    "invalid file": lambda e, w: (
        w.repo.write("production.yaml", "environment: production\nservices: [\n"),
        w.repo.commit("break production"),
    ),
    "suspended": _suspend,
    "window closed": None,  # filled in by the test: it owns the clock
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_decision_is_taken_after_the_slot_from_one_snapshot(
    tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """max_parallel = 1: production plans 2.0 and waits for the slot staging holds; what
    happens meanwhile (a newer commit, a deletion, a broken file, a suspension, the window
    closing) decides what production does once the slot frees."""
    world = World(tmp_path, max_parallel=1)
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"}, windows=WINDOW)
    clock = {"now": datetime.now(UTC).replace(hour=9, minute=30)}
    apply = CHANGES[change] or _close_window(clock)

    async def body(engine: Engine) -> tuple[list[Any], str]:
        engine.clock = lambda: clock["now"]
        engine.executor.clock = engine.clock
        await engine.sync("startup")
        await engine.idle()
        slots = engine.slots = WatchedSlots(1)
        running = asyncio.Event()
        engine.executor.listener = lambda ev: (
            running.set() if ev.status == "in_progress" and ev.environment == "staging" else None
        )
        world.repo.set_env("staging", {"api": "2.0-gate"})
        await engine.sync("watch")
        await running.wait()  # staging holds the only slot
        world.repo.set_env("production", {"api": "2.0"}, windows=WINDOW)
        await engine.sync("watch")
        await slots.waiting.wait()  # production decided 2.0 is due and waits for the slot
        apply(engine, world)
        await engine.sync("watch")
        await asyncio.to_thread(world.open_gate)
        await engine.idle()
        return engine.store.history(environment="production"), git(
            world.repo.path, "rev-parse", "HEAD"
        )

    with caplog.at_level(logging.ERROR, logger="reconciler"):
        history, head = run_engine(world, body)
    versions = [d.version for d in reversed(history)]
    if change == "newer version":
        assert versions == ["1.0", "3.0"]  # 2.0 never starts
        assert history[0].commit == head
    else:
        assert versions == ["1.0"]
    assert ("production", "api", "2.0") not in world.started()
    assert "event=runner_error" not in caplog.text


def test_scheduled_wake_ups_run_on_the_event_loop(tmp_path: Path) -> None:
    """A retry after the backoff is woken by APScheduler; under asyncio debug mode, waking
    a runner from a worker thread raises `Non-thread-safe operation` and the retry is lost."""
    world = World(tmp_path, retries=2)
    world.repo.set_env("staging", {"api": "1.0-fail"})

    async def main() -> list[str]:
        from reconciler.config import load_config
        from reconciler.engine import open_source
        from reconciler.providers import build_providers

        loop = asyncio.get_running_loop()
        config = load_config(world.config, environ={})
        store = Store.from_url(config.database_url, migrate=True)
        source = open_source(config)
        failed: list[str] = []
        second = asyncio.Event()

        def listener(ev: Any) -> None:
            if ev.status == "failed":
                failed.append(ev.trigger)
                if len(failed) == 2:
                    second.set()

        engine = Engine(config, store, source, build_providers(config), listener=listener)
        engine.scheduler = AsyncIOScheduler(event_loop=loop)
        engine.scheduler.start()
        try:
            await engine.sync("startup")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second.wait(), timeout=10)
            return failed
        finally:
            # A runner woken from another thread may never run again: do not wait for it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.stop(1.0), timeout=5)
            source.close()
            store.engine.dispose()

    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    try:
        assert loop.run_until_complete(main()) == ["git", "retry"]
    finally:
        loop.close()


@pytest.mark.parametrize("big", [False, True], ids=["small-env-inline", "big-env-in-thread"])
def test_planning_runs_off_the_event_loop(
    world: World, monkeypatch: pytest.MonkeyPatch, big: bool
) -> None:
    """The fleet's planning (`Engine.decisions`: every environment, seconds of Python at
    20,000 services) runs in a worker thread. A runner's decision for its one environment
    runs inline on the loop on SQLite, with its store calls (`store.db.inline`), unless the
    environment has more services than `INLINE_PLAN_SERVICES`."""
    if big:
        monkeypatch.setattr(reconciler.runners, "INLINE_PLAN_SERVICES", 0)
    world.repo.set_env("staging", {"api": "1.0"}, windows=WINDOW)
    threads: list[bool] = []
    real = reconciler.planning.plan

    def watched(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            threads.append(True)
        except RuntimeError:
            threads.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(reconciler.planning, "plan", watched)

    async def body(engine: Engine) -> None:
        engine.runners_enabled = False
        await engine.sync("startup")
        await engine.decisions()
        await engine.drain("staging")

    run_engine(world, body)
    assert threads == [False, not big], "plan() ran on the wrong side of the event loop"


# ---------------------------------------------------------------- the running look-up


def _new(service: str, version: str) -> NewDeployment:
    return NewDeployment(
        environment="production",
        service=service,
        version=version,
        previous_version=None,
        provider="local",
        provider_type="command",
        strategy={"type": "rolling"},
        trigger="git",
        commit=None,
        commit_author=None,
        attempt=1,
        timeout_seconds=60,
        params={},
        created_at=datetime.now(UTC),
        sync_id=None,
    )


def test_the_running_deployment_look_up_uses_the_partial_index(store: Store) -> None:
    """Every terminal status write finds the service's running deployment (another one
    than the one ending, if any); with a long history that must be an index search over
    unfinished deployments, not a scan of the history."""
    at = datetime.now(UTC)
    for i in range(30):
        rec = store.create_deployment(_new("api", f"{i}.0"))
        store.set_status(rec.id, "completed", at=at)
    rec = store.create_deployment(_new("api", "31.0"))
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "max(deployments.id)" in statement and "status" in statement:
            seen.append((statement, params))

    def trace(statement: str) -> None:  # SQLite's statements of a deployment: fast.py
        if not statement.startswith("--"):  # a trigger's statements are traced as comments
            capture(None, None, statement, ())

    def traced(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(trace)  # the statement with its values

    sqlite = store.engine.dialect.name == "sqlite"
    if sqlite:
        store.engine.dispose()  # new connections, each traced
        event.listen(store.engine, "connect", traced)
    else:
        event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.set_status(rec.id, "completed", at=at)
    finally:
        if sqlite:
            event.remove(store.engine, "connect", traced)
            store.engine.dispose()
        else:
            event.remove(store.engine, "before_cursor_execute", capture)
    # One statement (SQLite traces it again for each trigger program it runs).
    assert len({statement for statement, _ in seen}) == 1, seen
    statement, params = seen[0]
    with store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")
            rows = conn.exec_driver_sql("EXPLAIN " + statement, params).all()
    plan_text = " ".join(str(r[-1]) for r in rows)
    assert "ix_deployments_running" in plan_text, plan_text


# ---------------------------------------------------------------- transient errors


def _error(run: Callable[[], Any]) -> DBAPIError:
    with pytest.raises(DBAPIError) as info:
        run()
    return info.value


def test_schema_errors_are_not_transient_but_a_locked_database_is(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (a INTEGER, b INTEGER)"))

    def run(sql: str) -> Callable[[], None]:
        def go() -> None:
            with engine.begin() as conn:
                conn.execute(text(sql))

        return go

    missing = _error(run("SELECT * FROM no_such_table"))
    columns = _error(run("INSERT INTO t VALUES (1)"))
    assert "no such table" in str(missing) and not is_transient(missing)
    assert "values" in str(columns) and not is_transient(columns)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = _error(run("INSERT INTO t VALUES (1, 2)"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()
    assert "locked" in str(locked) and is_transient(locked)


def test_postgres_lock_and_connection_errors_are_transient(pg_url: str) -> None:
    engine = create_engine(pg_url)
    other = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (a INTEGER)"))
        with other.connect() as holder:
            holder.execute(text("LOCK TABLE t IN ACCESS EXCLUSIVE MODE"))

            def blocked() -> None:
                with engine.begin() as conn:
                    conn.execute(text("SET LOCAL lock_timeout = '50ms'"))
                    conn.execute(text("SELECT * FROM t"))

            lock = _error(blocked)
            holder.rollback()
        assert is_transient(lock)

        def bad_column() -> None:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t (a, b) VALUES (1, 2)"))

        assert not is_transient(_error(bad_column))
    finally:
        engine.dispose()
        other.dispose()
    refused = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    try:
        down = _error(lambda: refused.connect().close())
    finally:
        refused.dispose()
    assert is_transient(down)


# ---------------------------------------------------------------- coalesced sync requests


class FakeEngine:
    """Records what the daemon's sync loop asks of the engine."""

    def __init__(self) -> None:
        self.effective = {"staging": object(), "production": object()}
        self.commit: Any = None  # the head applied (the daemon announces a new one)
        self.synced: list[str] = []
        self.woken: list[list[str]] = []
        self.done = asyncio.Event()

    async def sync(self, trigger: str) -> Any:
        from reconciler.engine import SyncOutcome

        self.synced.append(trigger)
        self.done.set()
        return SyncOutcome(1, "abc", "unchanged")

    def wake(self, environments: Any) -> None:
        self.woken.append(sorted(environments))


@pytest.mark.parametrize(
    ("requests", "recorded"),
    [
        (["manual", "watch"], "manual"),
        (["reload", "poll"], "reload"),
        (["reload", "watch"], "watch"),
        (["manual", "webhook", "watch", "poll"], "manual"),
        (["poll", "watch"], "watch"),
    ],
)
def test_coalesced_sync_requests_keep_the_operators(
    requests: list[str], recorded: str, tmp_path: Path
) -> None:
    """A `watch` request arriving while an operator's `manual` one waits must not replace
    it: only manual and reload wake every environment (a resumed one included)."""
    from reconciler.config import load_config
    from reconciler.daemon import Daemon

    world = World(tmp_path)

    async def main() -> tuple[list[str], list[list[str]]]:
        daemon = Daemon(load_config(world.config, environ={}))
        fake = FakeEngine()
        daemon.engine = fake  # type: ignore[assignment]
        daemon.ready.set()
        for trigger in requests:
            daemon.request_sync(trigger)
        loop = asyncio.create_task(daemon._sync_loop())
        await fake.done.wait()
        await asyncio.sleep(0)  # let the loop finish the iteration it is in
        loop.cancel()
        return fake.synced, fake.woken

    synced, woken = asyncio.run(main())
    assert synced == [recorded]
    wakes_all = bool({"manual", "reload"} & set(requests))
    assert woken == ([["production", "staging"]] if wakes_all else [])
