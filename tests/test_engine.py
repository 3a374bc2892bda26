"""The engine in-process, against real git repositories, a real deploy script and SQLite."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine import Engine
from reconciler.providers.process import MARKER_DEPLOYMENT, MARKER_LEDGER
from tests import support
from tests.support import World, alive, env_yaml
from tests.test_store import new

pytestmark = pytest.mark.timeout(60)


def run_engine(world: World, body: Callable[[Engine], Awaitable[Any]], **listener: Any) -> Any:
    return support.run_engine(world.config, body, **listener)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def sync_and_settle(engine: Engine, trigger: str = "watch"):
    outcome = await engine.sync(trigger)
    await engine.idle()
    return outcome


def test_commit_becomes_a_recorded_deployment_with_previous_version_and_commit(world: World):
    world.repo.set_env("staging", {"api": "1.0"})

    async def body(engine: Engine):
        first = await sync_and_settle(engine, "startup")
        sha = world.repo.set_env("staging", {"api": "1.1"}, message="Bump api to 1.1\n\nlong text")
        second = await sync_and_settle(engine)
        return first, second, sha, engine.store.history(environment="staging")

    first, second, sha, history = run_engine(world, body)
    assert first.result == "ok" and second.commit == sha
    assert second.environments_changed == ["staging"]
    assert [(d.version, d.previous_version, d.status, d.trigger) for d in history] == [
        ("1.1", "1.0", "completed", "git"),
        ("1.0", None, "completed", "git"),
    ]
    latest = history[0]
    assert latest.commit == sha and latest.commit_author == "Ada <ada@example.com>"
    assert latest.provider == "local" and latest.provider_type == "command"
    assert latest.timeout_seconds == 1800 and latest.validation == {
        "ok": True,
        "checks": latest.validation["checks"],
    }
    assert world.started() == [("staging", "api", "1.0"), ("staging", "api", "1.1")]
    # The script saw the previous version and the commit in its environment.
    assert world.runs()[2][4:] == ("1.0", sha)


def test_resync_does_nothing(world: World):
    world.repo.set_env("staging", {"api": "1.0", "worker": "2"})

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        again = await sync_and_settle(engine, "manual")
        unchanged = await sync_and_settle(engine, "poll")
        return again, unchanged, engine.store.list_syncs()

    again, unchanged, syncs = run_engine(world, body)
    assert again.result == "ok" and again.environments_changed == []
    assert unchanged.result == "unchanged"
    assert len(syncs) == 2  # a poll that found the same head is not a new sync
    assert world.started() == [("staging", "api", "1.0"), ("staging", "worker", "2")]


def test_progress_and_log_are_recorded_and_secrets_redacted(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    seen: list[tuple[int, str, Any]] = []

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        dep = engine.store.history()[0]
        return engine.store.get_deployment(dep.id, with_progress=True, with_log=True)

    rec = run_engine(
        world, body, listener=lambda ev: seen.append((ev.deployment_id, ev.status, ev.percent))
    )
    doc = rec.to_json()
    progress = [(p["status"], p["message"], p["percent"]) for p in doc["progress"]]
    assert ("in_progress", "preparing", 10) in progress
    assert ("in_progress", "done", 100) in progress
    assert [p[0] for p in progress][:3] == ["pending", "validating", "in_progress"]
    assert progress[-1][0] == "completed"
    step = next(p for p in doc["progress"] if p["message"] == "preparing")
    assert step["details"] == {"step": "prepare"}
    assert "token is ***" in doc["log"] and "hunter2-secret" not in doc["log"]
    assert (rec.id, "in_progress", 10) in seen


def test_failing_version_retries_boundedly_and_never_blocks_other_environments(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"})

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        world.repo.write("staging.yaml", env_yaml("staging", {"api": "2.0-fail"}))
        world.repo.set_env("production", {"api": "2.0"})
        await engine.sync("watch")
        # Retries come from the scheduler; drive the runner directly instead of waiting on it:
        # each drain runs what is due now, the backoff decides when the next is due.
        for _ in range(6):
            await engine.idle()
            decisions = {d.environment: d for d in await engine.decisions()}
            staging = decisions["staging"]
            if staging.not_before is not None:
                await asyncio.sleep(
                    max(0.0, (staging.not_before - engine.clock()).total_seconds()) + 0.05
                )
                engine.wake(["staging"])
        await engine.idle()
        return (
            engine.store.history(environment="staging"),
            engine.store.history(environment="production"),
            decisions,
        )

    staging, production, decisions = run_engine(world, body)
    failed = [d for d in staging if d.version == "2.0-fail"]
    assert [d.status for d in failed] == ["failed"] * 3
    assert [d.attempt for d in reversed(failed)] == [1, 2, 3]
    assert [d.trigger for d in reversed(failed)] == ["git", "retry", "retry"]
    assert (
        "exit status 3" in failed[0].error_message
        and "health check failed" in failed[0].error_message
    )
    assert "token *** rejected" in failed[0].error_message  # secrets redacted there too
    gaps = [
        (b.created_at - a.completed_at).total_seconds()
        for a, b in zip(reversed(failed), list(reversed(failed))[1:], strict=False)
    ]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0  # 1 s backoff, doubled
    assert (
        decisions["staging"].state == "failed"
        and "gave up after 3 attempts" in decisions["staging"].message
    )
    assert [d.version for d in production if d.status == "completed"] == ["2.0", "1.0"]


def test_rollback_on_failure(world: World):
    world.repo.set_env("staging", {"api": "1.0"}, on_failure="rollback")

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        world.repo.set_env("staging", {"api": "1.1-fail"}, on_failure="rollback")
        await sync_and_settle(engine)
        return engine.store.history(environment="staging")

    history = run_engine(world, body)
    rollback, failed = history[0], history[1]
    assert (failed.version, failed.status) == ("1.1-fail", "rolled_back")
    assert "exit status 3" in failed.error_message  # the error is kept
    assert (rollback.version, rollback.previous_version, rollback.trigger, rollback.status) == (
        "1.0",
        "1.1-fail",
        "rollback",
        "completed",
    )
    assert rollback.rollback_of == failed.id


def test_broken_file_blocks_only_its_environment_and_keeps_last_valid_state(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"})

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        world.repo.write(
            "staging.yaml",
            "environment: staging\nprovider: local\nservices:\n  api:\n    version: [1\n",
        )
        world.repo.set_env("production", {"api": "1.1"})
        outcome = await sync_and_settle(engine)
        decisions = await engine.decisions()
        syncs = engine.store.list_syncs()
        return outcome, decisions, syncs, engine.store.history()

    outcome, decisions, syncs, history = run_engine(world, body)
    assert outcome.result == "errors"
    assert len(outcome.errors) == 1 and outcome.errors[0].startswith("staging.yaml:")
    line = outcome.errors[0].split(":")
    assert line[1].isdigit() and line[2].isdigit()
    states = {(d.environment, d.service): d for d in decisions}
    assert states[("staging", "api")].state == "invalid"
    assert states[("staging", "api")].desired == "1.0"  # the last valid desired state
    assert states[("production", "api")].state == "synced"
    assert [(d.environment, d.version) for d in history][:1] == [("production", "1.1")]
    assert syncs[0].result == "errors" and syncs[0].errors[0]["file"] == "staging.yaml"


def test_deadline_kills_the_command_and_its_children(tmp_path: Path):
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0-trap"}, timeout="1")

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        return engine.store.history()[0]

    rec = run_engine(world, body)
    assert rec.status == "timed_out" and "deadline of 1s" in rec.error_message
    assert not any(alive(int(p)) for p in world.pids.read_text().split())
    # It ignored SIGTERM, so it took the kill grace (1 s) before SIGKILL.
    assert rec.duration_seconds is not None and rec.duration_seconds >= 2.0


def test_commit_storm_deploys_the_last_version_once(world: World):
    world.repo.set_env("staging", {"api": "0-gate"})

    async def body(engine: Engine):
        await engine.sync("startup")
        started = asyncio.Event()
        engine.executor.listener = lambda ev: started.set() if ev.status == "in_progress" else None
        await started.wait()  # 0-gate is running and blocked on the gate
        for i in range(1, 11):
            world.repo.set_env("staging", {"api": f"{i}.0"})
            await engine.sync("watch")
        await asyncio.to_thread(world.open_gate)
        await engine.idle()
        return engine.store.history()

    history = run_engine(world, body)
    assert [d.version for d in reversed(history)] == ["0-gate", "10.0"]
    assert world.started() == [("staging", "api", "0-gate"), ("staging", "api", "10.0")]


def test_depends_on_releases_production_after_staging(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"}, depends_on="[staging]")

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        return engine.store.history()

    history = run_engine(world, body)
    order = [(d.environment, d.version) for d in reversed(history)]
    assert order == [("staging", "1.0"), ("production", "1.0")]
    assert history[0].created_at >= history[1].completed_at


def test_window_holds_back_and_releases_on_schedule(world: World):
    from datetime import UTC, datetime, timedelta

    world.repo.set_env("staging", {"api": "1.0"}, windows='[{cron: "0 9 * * *", duration: 1h}]')
    clock = {"now": datetime(2026, 11, 26, 8, 59, 59, tzinfo=UTC)}

    async def body(engine: Engine):
        engine.clock = lambda: clock["now"]
        engine.executor.clock = engine.clock
        await sync_and_settle(engine, "startup")
        held = (engine.store.history(), await engine.decisions())
        clock["now"] += timedelta(seconds=2)
        engine.wake(["staging"])  # what the scheduler does at the window's opening
        await engine.idle()
        return held, engine.store.history()

    (before, decisions), after = run_engine(world, body)
    assert before == [] and decisions[0].state == "waiting"
    assert decisions[0].message == "waiting: window opens 09:00"
    assert [d.version for d in after] == ["1.0"]


def test_graceful_stop_cancels_what_outlives_the_grace(world: World):
    world.repo.set_env("staging", {"api": "1.0-hang"})

    async def body(engine: Engine):
        await engine.sync("startup")
        started = asyncio.Event()
        engine.executor.listener = lambda ev: started.set() if ev.status == "in_progress" else None
        await started.wait()
        cancelled = await engine.stop(0.2)
        return cancelled, engine.store.history()

    cancelled, history = run_engine(world, body)
    assert [d.status for d in history] == ["cancelled"] and cancelled == [history[0].id]
    assert not any(alive(int(p)) for p in world.pids.read_text().split())


def rewrite_history(world: World) -> str:
    """A force push: drop the last commit and commit something else in its place."""
    from tests.support import git

    git(world.repo.path, "reset", "-q", "--hard", "HEAD~1")
    return world.repo.set_env("staging", {"api": "3.0"}, message="rewritten")


def test_force_push_is_refused_by_default_and_recorded(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("staging", {"api": "2.0"})

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        head = rewrite_history(world)
        refused = await sync_and_settle(engine)
        again = await sync_and_settle(engine, "poll")
        return head, refused, again, engine.store.list_syncs(), engine.store.history()

    head, refused, again, syncs, history = run_engine(world, body)
    assert refused.result == "refused" and "allow_force_push" in (refused.message or "")
    assert again.result == "refused" and again.sync_id is None  # recorded once, not per poll
    assert (syncs[0].result, syncs[0].commit_sha) == ("refused", head)
    assert [d.version for d in history] == ["2.0"]


def test_force_push_is_a_recorded_full_load_when_allowed(world: World):
    world.config.write_text(
        world.config.read_text().replace("watch = true", "watch = true\nallow_force_push = true")
    )
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("staging", {"api": "2.0"})

    async def body(engine: Engine):
        await sync_and_settle(engine, "startup")
        rewrite_history(world)
        outcome = await sync_and_settle(engine)
        return outcome, engine.store.list_syncs(), engine.store.history()

    outcome, syncs, history = run_engine(world, body)
    assert outcome.result == "ok"
    assert syncs[0].full_load and "history rewritten" in (syncs[0].note or "")
    assert [d.version for d in history] == ["3.0", "2.0"]


def test_a_database_outage_delays_records_but_loses_none(world: World, monkeypatch):
    import logging
    import sqlite3

    import reconciler.store.db as db

    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 50)
    world.repo.set_env("staging", {"api": "1.0-gate"})

    async def body(engine: Engine):
        started, retried = asyncio.Event(), asyncio.Event()

        class Seen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "event=store_retry" in record.getMessage():
                    retried.set()

        handler = Seen()
        logging.getLogger("reconciler.executor").addHandler(handler)
        engine.executor.listener = lambda ev: started.set() if ev.status == "in_progress" else None
        try:
            await engine.sync("startup")
            await started.wait()
            path = engine.config.database_url.removeprefix("sqlite:///")
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")  # no writer gets in: the database is "down"
            await asyncio.to_thread(world.open_gate)
            await retried.wait()
            holder.execute("ROLLBACK")
            holder.close()
            await engine.idle()
        finally:
            logging.getLogger("reconciler.executor").removeHandler(handler)
        return engine.store.get_deployment(1, with_progress=True, with_log=True)

    rec = run_engine(world, body)
    assert rec.status == "completed"
    assert [p.message for p in rec.progress if p.status == "in_progress"][-1] == "done"
    assert any("token is ***" in line.line for line in rec.log)


def test_recovery_ends_the_marked_runs_of_the_environments_it_recovers_only(world: World):
    """Runs whose process group was never recorded (the daemon died right after the
    spawn): found by their marker, per environment as a replica recovers what it claims."""
    procs: dict[str, subprocess.Popen[bytes]] = {}

    async def body(engine: Engine):
        store = engine.store
        ledger = store.ledger_id()
        records = {}
        for env in ("staging", "production"):
            rec = store.create_deployment(new(environment=env), validating_at=engine.clock())
            records[env] = rec.id
            marker = {MARKER_LEDGER: ledger, MARKER_DEPLOYMENT: str(rec.id)}
            procs[env] = subprocess.Popen(
                ["sleep", "300"], env={**os.environ, **marker}, start_new_session=True
            )
        assert [pgid for _, pgid, _ in store.unfinished_runs()] == [None, None]
        first = await engine.recover(["staging"])
        staging_gone = not alive(procs["staging"].pid)
        production_alive = alive(procs["production"].pid)
        second = await engine.recover()
        return records, first, staging_gone, production_alive, second

    try:
        records, first, staging_gone, production_alive, second = run_engine(world, body)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert first == [records["staging"]] and staging_gone and production_alive
    assert second == [records["production"]]
    assert procs["production"].returncode == -15  # SIGTERM, as a recorded group gets
