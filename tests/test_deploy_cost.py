"""What one deployment costs the store, kept honest without timing it (issue 12).

The number of transactions per deployment is the one docs/architecture.md states, and the
incremental `service_state` row (advanced at each write, re-derived only off the common
path) equals `rebuild_service_state()` after any sequence of operations, on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from reconciler.engine import Engine
from reconciler.providers import CommandProvider, DeployContext, Provider
from reconciler.store import TERMINAL_STATUSES, NewDeployment, Store, StoreError
from tests.support import World, run_engine
from tests.test_store import new as new_deployment

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


class _NoProcess(CommandProvider):
    """Deploys at once and reports no process group (a hosted platform, say)."""

    reports_process = False  # so its `in_progress` is written before `deploy`

    async def deploy(self, ctx: DeployContext) -> None:
        return None


class _GoneAtOnce(CommandProvider):
    """Its process has ended (and been reaped) before it reports it: a run faster than the
    spawn's return, as `/bin/true` often is."""

    async def deploy(self, ctx: DeployContext) -> None:
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        await ctx.process_started(proc.pid)


class Commits:
    """Counts the transactions committed on a store's engine (readers commit nothing)."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        event.listen(store.engine, "commit", self._seen)

    def _seen(self, _conn: Any) -> None:
        self.count += 1


def _no_process(providers: dict[str, Provider]) -> dict[str, Provider]:
    local = providers["local"]
    assert isinstance(local, CommandProvider)
    return {"local": _NoProcess("local", local.config, local.base_dir)}


def _three_services(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0", "web": "1.0", "db": "1.0"})
    return world


async def _count_commits(engine: Engine) -> tuple[int, list[list[str]]]:
    """Deploy every service of the synced state; the commits that took and the statuses
    recorded (progress events) per deployment."""
    engine.runners_enabled = False
    await engine.sync("startup")
    commits = Commits(engine.store)
    engine.runners_enabled = True
    engine.wake(["staging"])
    await engine.idle()
    records = [
        engine.store.get_deployment(rec.id, with_progress=True) for rec in engine.store.history()
    ]
    statuses = [[p.status for p in rec.progress or []] for rec in records if rec]
    return commits.count, statuses


def test_a_deployment_is_three_transactions(tmp_path: Path) -> None:
    """A provider without a process (a hosted platform): create + validating, in_progress
    (before `deploy`), the terminal status: three commits per deployment, and every status
    still recorded as its own progress event, in order."""
    count, statuses = run_engine(
        _three_services(tmp_path).config, _count_commits, providers=_no_process
    )
    assert statuses == [["pending", "validating", "in_progress", "completed"]] * 3
    assert count == 3 * 3


def test_a_run_over_before_it_reports_its_process_is_two_transactions(tmp_path: Path) -> None:
    """A process gone by the time it is reported: ``in_progress`` is written with the
    terminal status (create + validating, then in_progress + completed), every status
    still its own progress event, in order."""

    def gone(providers: dict[str, Provider]) -> dict[str, Provider]:
        local = providers["local"]
        assert isinstance(local, CommandProvider)
        return {"local": _GoneAtOnce("local", local.config, local.base_dir)}

    count, statuses = run_engine(_three_services(tmp_path).config, _count_commits, providers=gone)
    assert statuses == [["pending", "validating", "in_progress", "completed"]] * 3
    assert count == 2 * 3


def test_a_run_with_a_process_records_in_progress_with_its_process_group(
    tmp_path: Path,
) -> None:
    """The command provider records the run's process group (crash recovery) in the same
    transaction as ``in_progress``: three commits (create + validating, in_progress + the
    process group, the terminal status), the process group recorded while it runs."""
    world = World(tmp_path)
    gated = tmp_path / "gated.sh"
    gated.write_text('#!/bin/sh\nread -r _ < "$DEPLOY_GATE"\n')  # silent; alive until the gate
    gated.chmod(0o755)
    world.config.write_text(
        world.config.read_text().replace(str(tmp_path / "deploy.sh"), str(gated))
    )
    world.repo.set_env("staging", {"api": "1.0"})

    async def body(engine: Engine) -> tuple[int, list[str], Any]:
        engine.runners_enabled = False
        await engine.sync("startup")
        commits = Commits(engine.store)
        # The gate opens only once the process group is recorded: a script let go earlier
        # could exit before the executor reads its start time, and then nothing is recorded.
        recorded = threading.Event()
        record = engine.store.set_statuses
        seen: list[Any] = []

        def set_statuses(deployment_id: int, steps: Any, **kwargs: Any) -> Any:
            rec = record(deployment_id, steps, **kwargs)
            if kwargs.get("run_process") is not None:
                seen.append(([s.status for s in steps], engine.store.unfinished_processes()))
                recorded.set()
            return rec

        engine.store.set_statuses = set_statuses  # type: ignore[method-assign]
        engine.runners_enabled = True
        engine.wake(["staging"])
        assert await asyncio.to_thread(recorded.wait, 30)
        await asyncio.to_thread(world.open_gate)  # returns once the script reads it
        await engine.idle()
        [rec] = engine.store.history()
        full = engine.store.get_deployment(rec.id, with_progress=True)
        assert full is not None
        return commits.count, [p.status for p in full.progress or []], seen

    count, statuses, seen = run_engine(world.config, body)
    assert statuses == ["pending", "validating", "in_progress", "completed"]
    [(written, unfinished)] = seen
    assert written == ["in_progress"] and len(unfinished) == 1
    assert count == 3


# ---- the incremental service_state equals the rebuilt one ------------------------------------

VERSIONS = ("1.0", "1.1", "2.0")
SERVICES = (("prod", "api"), ("prod", "web"), ("staging", "api"))
TRIGGERS = ("git", "git", "git", "manual", "retry", "rollback", "drift")
ENDINGS = ("completed", "completed", "failed", "failed", "timed_out", "cancelled")


class Ops:
    """Random operations on a store, as the engine, operators and recovery make them."""

    def __init__(self, store: Store, rng: random.Random) -> None:
        self.store, self.rng = store, rng
        self.clock = T0
        self.active: list[int] = []
        self.failed: list[int] = []
        self.finished: list[int] = []

    def now(self) -> datetime:
        self.clock += timedelta(seconds=self.rng.randint(1, 90))
        return self.clock

    def create(self) -> None:
        environment, service = self.rng.choice(SERVICES)
        trigger = self.rng.choice(TRIGGERS)
        rollback_of = (
            self.rng.choice(self.failed) if trigger == "rollback" and self.failed else None
        )
        rec = self.store.create_deployment(
            NewDeployment(
                environment=environment,
                service=service,
                version=self.rng.choice(VERSIONS),
                previous_version=None,
                provider="local",
                provider_type="command",
                strategy={"type": "rolling"},
                trigger=trigger,
                commit=None,
                commit_author=None,
                attempt=self.rng.randint(1, 3),
                timeout_seconds=60,
                params={},
                created_at=self.now(),
                sync_id=None,
                rollback_of=rollback_of,
            ),
            validating_at=self.now() if self.rng.random() < 0.7 else None,
        )
        self.active.append(rec.id)

    def advance(self) -> None:
        if self.active:
            ident = self.rng.choice(self.active)
            status = self.rng.choice(("validating", "in_progress"))
            self.store.set_status(ident, status, at=self.now(), message=f"now {status}")

    def end(self) -> None:
        if self.active:
            # Mostly the newest (one runner per environment), sometimes an older one.
            ident = self.active[-1] if self.rng.random() < 0.7 else self.rng.choice(self.active)
            status = self.rng.choice(ENDINGS)
            error = None if status == "completed" else f"{status} by the test"
            self.store.set_status(ident, status, at=self.now(), error_message=error)
            self.active.remove(ident)
            (self.failed if status == "failed" else self.finished).append(ident)

    def roll_back(self) -> None:
        if self.failed:
            ident = self.rng.choice(self.failed)
            self.store.set_status(ident, "rolled_back", at=self.now(), message="rolled back")
            self.failed.remove(ident)
            self.finished.append(ident)

    def progress(self) -> None:
        if self.active:
            ident = self.rng.choice(self.active)
            self.store.add_event(
                ident, status="in_progress", message="step", percent=50, details={}, at=self.now()
            )

    def refused(self) -> None:
        """A finished record never changes: the write is refused and changes nothing."""
        if self.finished:
            ident = self.rng.choice(self.finished)
            before = self.store.get_deployment(ident)
            with pytest.raises(StoreError):
                self.store.set_status(
                    ident, self.rng.choice(("in_progress", "completed")), at=self.now()
                )
            assert self.store.get_deployment(ident) == before

    def reset(self) -> None:
        self.store.reset_streak(*self.rng.choice(SERVICES))

    def interrupt(self) -> None:
        ids = self.store.interrupt_unfinished(message="interrupted: test", at=self.now())
        assert sorted(ids) == sorted(self.active)
        self.failed.extend(ids)
        self.active.clear()

    def step(self) -> None:
        ops = (
            (self.create, 30),
            (self.advance, 15),
            (self.end, 30),
            (self.roll_back, 5),
            (self.progress, 8),
            (self.refused, 4),
            (self.reset, 4),
            (self.interrupt, 2),
        )
        [op] = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])
        op()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_service_state_equals_the_rebuilt_one(store: Store, seed: int) -> None:
    ops = Ops(store, random.Random(seed))
    for round_ in range(12):
        for _ in range(25):
            ops.step()
        incremental = store.service_states()
        store.rebuild_service_state()
        assert store.service_states() == incremental, f"seed {seed}, after round {round_}"
    # Every status change and progress event recorded, in order, for every deployment.
    for rec in store.history(limit=10_000):
        full = store.get_deployment(rec.id, with_progress=True)
        assert full is not None and full.progress
        times = [p.at for p in full.progress]
        assert times == sorted(times)
        assert full.progress[0].status == "pending"
        if rec.status in TERMINAL_STATUSES:
            assert rec.status in [p.status for p in full.progress]


def test_a_services_first_deployment_inserts_its_row_and_only_then(store: Store) -> None:
    """The first deployment of a service inserts the service's row (one guarded INSERT,
    not the fold); a row missing beside older deployments (deleted here) is re-derived by
    the fold instead, never made as if the new deployment were the first."""
    from sqlalchemy import delete

    from reconciler.store.models import service_state

    first = store.create_deployment(new_deployment("staging", created_at=T0))
    state = store.service_states()["staging", "api"]
    assert (state.last_deployment_id, state.running_deployment_id) == (first.id, first.id)
    assert (state.last_status, state.deployed_version, state.streak_count) == ("pending", None, 0)
    store.set_status(first.id, "failed", at=T0 + timedelta(seconds=1), error_message="no")
    with store._writer.begin() as conn:
        conn.execute(delete(service_state))
    second = store.create_deployment(new_deployment("staging", created_at=T0))
    incremental = store.service_states()
    state = incremental["staging", "api"]
    assert (state.last_deployment_id, state.streak_count) == (second.id, 1)  # the fold ran
    store.rebuild_service_state()
    assert store.service_states() == incremental


def test_the_fast_path_stores_started_at_as_the_column_type_does(store: Store) -> None:
    """The conditional UPDATE sets ``started_at`` from a parameter typed like the column:
    SQLite holds the same text as any other time (an untyped one held the driver's
    ``... 10:00:01+00:00``), and the ledger's entry made from the returned row equals the
    one made from the stored row (the chain verifies)."""
    from sqlalchemy import text

    from reconciler.store.verification import verify

    new = new_deployment("staging", created_at=T0)
    first = store.create_deployment(new)
    store.set_status(first.id, "in_progress", at=T0 + timedelta(seconds=1))
    store.set_status(first.id, "completed", at=T0 + timedelta(seconds=2))
    second = store.create_deployment(new, validating_at=T0 + timedelta(seconds=3))
    store.set_status(second.id, "failed", at=T0 + timedelta(seconds=4), error_message="no")
    with store.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT CAST(started_at AS TEXT) FROM deployments ORDER BY id")
        ).scalars()
        started = list(stored)
    if store.engine.dialect.name == "sqlite":
        assert started == ["2026-11-01 00:00:01.000000", "2026-11-01 00:00:03.000000"]
    rec = store.get_deployment(first.id)
    assert rec is not None and rec.started_at == T0 + timedelta(seconds=1)
    report = verify(store)
    assert report.ok, [f.line() for f in report.findings]


def test_children_are_waited_for_without_a_thread_each_in_every_loop() -> None:
    """Python 3.11's default child watcher starts a ``waitpid-<pid>`` thread per child;
    with the pidfd watcher none is started, and a second event loop (the next command,
    the next test) spawns and reaps children as well as the first."""
    import sys

    from reconciler.providers.process import use_pidfd_child_watcher

    if not use_pidfd_child_watcher():
        pytest.skip("no pidfd on this kernel")

    async def one() -> tuple[list[str], int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.stdout.write(sys.stdin.read()); sys.exit(3)",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        waiting = [t.name for t in threading.enumerate() if t.name.startswith("waitpid-")]
        out, _ = await proc.communicate(b"hello")  # the child runs until its stdin closes
        return waiting, await proc.wait(), out

    for _ in range(2):
        assert asyncio.run(one()) == ([], 3, b"hello")


def test_a_failed_write_gives_the_writer_lock_back(sqlite_url: str) -> None:
    """The in-process SQLite writer lock is released when the connection goes back to the
    pool, after a commit and after a rollback, whichever thread wrote."""
    from reconciler.store.db import sqlite_writers

    store = Store.from_url(sqlite_url)
    writers = sqlite_writers(store.engine)
    assert writers is not None
    lock = writers.lock
    ended = writers.write_transactions
    # No such sync: the insert fails, the transaction rolls back.
    new = new_deployment("staging", sync_id=12345)
    with pytest.raises(StoreError):
        store.create_deployment(new)
    assert not lock.locked()
    failed: list[BaseException] = []

    def write() -> None:
        try:
            store.create_deployment(replace(new, sync_id=None))
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == [] and not lock.locked()
    assert len(store.history()) == 4
    assert writers.write_transactions == ended + 5  # the failed one is counted too
    store.close()


def test_sqlite_statements_run_without_connection_events(sqlite_url: str) -> None:
    """No connection event listener on the store's SQLite engines: one (the old ``begin``
    hook) makes SQLAlchemy dispatch the before/after-execute events around every
    statement. Writes still take the write lock at BEGIN (IMMEDIATE), reads do not."""
    import sqlite3

    from sqlalchemy.engine import make_url

    store = Store.from_url(sqlite_url)
    assert not store.engine._has_events and not store._writer._has_events
    other = sqlite3.connect(str(make_url(sqlite_url).database), timeout=0, isolation_level=None)

    def other_can_write() -> bool:
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        other.execute("ROLLBACK")
        return True

    with store._writer.begin():
        assert not other_can_write()  # the write lock is held from BEGIN on
        assert Store(store.engine)._writer is store._writer  # one writer engine per engine
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM deployments")
        assert conn.connection.driver_connection.in_transaction  # type: ignore[union-attr]
        assert other_can_write()
    assert other_can_write()
    other.close()
    store.close()
