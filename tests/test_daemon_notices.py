"""A real daemon on PostgreSQL hears what other processes announce on the database: a new
head (it fetches without polling), another process's deployment events (its SSE clients
get them live), a suspension or resumption (its status and deployments follow).

The other process is this test, writing through the same store and bus code a replica
uses. The read timeouts are shorter than every fallback (the SSE feed's safety-net read
every 15 s, a poll that is disabled): only a notice can make these tests pass."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from reconciler.bus import open_bus
from reconciler.store import Store
from tests.conftest import POSTGRES_URL_ENV
from tests.support import World, git, wait_for
from tests.test_bus import Heard
from tests.test_http_daemon import TOKEN, Served, read_sse
from tests.test_store import new

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

NOTICE_WAIT = 8.0  # far above a notice's milliseconds, far below the 15 s fallbacks


@pytest.fixture
def world(tmp_path: Path, pg_url: str) -> World:
    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + f'\n[database]\nurl = "{pg_url}"\n')
    world.repo.set_env("staging", {"api": "1.0"})
    return world


@pytest.fixture
def served(world: World) -> Iterator[Served]:
    served = Served(world, watch=False)  # and poll_interval = 0: nothing looks by itself
    try:
        wait_for(lambda: completed(served, "1.0"), what="the first deployment")
        yield served
    finally:
        served.close()
    assert "Traceback" not in served.stderr.read_text()


def completed(served: Served, version: str) -> bool:
    return any(
        d["version"] == version and d["status"] == "completed"
        for d in served.deployments(env="staging")
    )


def test_a_head_announced_elsewhere_wakes_a_daemon_that_neither_polls_nor_watches(
    world: World, pg_url: str
):
    async def scenario() -> None:
        listener = open_bus(pg_url)
        await listener.start()
        heads = Heard(listener, "head")
        try:
            served = await asyncio.to_thread(Served, world, watch=False)
            try:
                # The daemon announces the head it fetched at start.
                sha = git(world.repo.path, "rev-parse", "HEAD")
                await heads.until(lambda items: sha in items)
                # A commit nobody tells the daemon about; another replica fetched it.
                new_sha = await asyncio.to_thread(world.repo.set_env, "staging", {"api": "2.0"})
                await asyncio.to_thread(listener.publish, "head", new_sha)
                await asyncio.to_thread(
                    wait_for, lambda: completed(served, "2.0"), NOTICE_WAIT, "2.0 deployed"
                )
            finally:
                await asyncio.to_thread(served.close)
        finally:
            await listener.stop()

    asyncio.run(scenario())
    store = Store.from_url(pg_url, migrate=False)
    try:
        latest = store.list_syncs(limit=1)[0]
        assert latest.trigger == "notice" and latest.result == "ok"
    finally:
        store.close()


def test_sse_follows_a_deployment_another_process_runs(served: Served, pg_url: str):
    store = Store.from_url(pg_url, migrate=False)  # the other replica's store
    at = datetime(2026, 1, 1, tzinfo=UTC)
    record = store.create_deployment(new(environment="elsewhere"), validating_at=at)
    url = f"/api/v1/deployments/{record.id}/events"
    timeout = httpx.Timeout(10, read=NOTICE_WAIT)
    try:
        with served.client.stream("GET", url, timeout=timeout) as response:
            assert response.status_code == 200
            messages = read_sse(response)
            got = [next(messages), next(messages)]  # recorded before the client came
            for step in range(1, 6):
                if step == 2:  # notices sent meanwhile are lost: the resync reads them
                    _terminate_listener(served)
                if step == 3:
                    store.set_status(record.id, "in_progress", at=at, message="running")
                    got.append(next(messages))
                store.add_event(
                    record.id,
                    status="validating" if step < 3 else "in_progress",
                    message=f"step {step}",
                    percent=step * 20,
                    details=None,
                    at=at,
                )
                got.append(next(messages))  # each within NOTICE_WAIT, or ReadTimeout
            store.set_status(record.id, "completed", at=at)
            got += [next(messages), next(messages)]
    finally:
        store.close()
    assert [m["event"] for m in got] == ["progress"] * 9 + ["end"]
    texts = [json.loads(m["data"])["message"] for m in got[:-1]]
    assert texts[2:8] == ["step 1", "step 2", "running", "step 3", "step 4", "step 5"]
    ids = [int(m["id"]) for m in got[:-1]]
    assert ids == sorted(set(ids))  # in order, no duplicates
    assert json.loads(got[-1]["data"])["status"] == "completed"
    assert "event=notice_listener_back" in served.stderr.read_text()


def _terminate_listener(served: Served) -> None:
    """End the daemon's listening session, as a database restart would."""
    engine = create_engine(os.environ[POSTGRES_URL_ENV])
    try:
        with engine.begin() as conn:
            ended = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name"
                ),
                {"name": f"reconciler notices, pid {served.proc.pid}"},
            ).all()
    finally:
        engine.dispose()
    assert ended


def test_a_suspension_elsewhere_reaches_the_daemons_status_and_plans(
    served: Served, world: World, pg_url: str
):
    store = Store.from_url(pg_url, migrate=False)
    at = datetime.now(UTC)

    def state() -> str:
        [entry] = served.client.get("/api/v1/status").json()
        return str(entry["state"])

    def operator(action: str) -> None:
        store.record_operator_action(
            environment="staging", service=None, action=action, actor="ada", note=None, at=at
        )

    try:
        assert state() == "synced"  # and kept: the status is planned from memory
        operator("suspend")
        wait_for(lambda: state() == "suspended", NOTICE_WAIT, "the suspension in the status")
        world.repo.set_env("staging", {"api": "2.0"})
        synced = served.client.post("/api/v1/sync", headers={"Authorization": f"Bearer {TOKEN}"})
        assert synced.status_code == 202
        wait_for(lambda: "wants 2.0" in _message(served), NOTICE_WAIT, "2.0 held back")
        operator("resume")  # another replica resumed: this one deploys what it held back
        wait_for(lambda: completed(served, "2.0"), NOTICE_WAIT, "2.0 deployed")
    finally:
        store.close()


def _message(served: Served) -> str:
    [entry] = served.client.get("/api/v1/status").json()
    return str(entry.get("message") or "")
