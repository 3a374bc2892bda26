"""The notice bus (reconciler.bus): delivered at commit and only then, per schema, heard
again after the listening connection is killed, and sent by the store's write paths."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text

from reconciler.bus import Bus, PostgresBus, open_bus
from reconciler.store import Store
from tests.conftest import POSTGRES_URL_ENV, pg_schema
from tests.test_store import new

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 10.0  # a notice arrives in milliseconds; this only bounds a failing test


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Heard:
    """What a topic's subscriber heard, in order; awaitable until a condition holds."""

    def __init__(self, bus: Bus, topic: str) -> None:
        self.items: list[str | None] = []
        self._changed = asyncio.Event()
        bus.subscribe(topic, self._hear)

    def _hear(self, payload: str | None) -> None:
        self.items.append(payload)
        self._changed.set()

    async def until(self, predicate: Callable[[list[str | None]], bool]) -> list[str | None]:
        async with asyncio.timeout(WAIT):
            while not predicate(self.items):
                self._changed.clear()
                await self._changed.wait()
        return self.items


@pytest.fixture
async def bus(db_url: str) -> AsyncIterator[Bus]:
    Store.from_url(db_url).close()  # migrated: the write paths below need the tables
    bus = open_bus(db_url, retry_min=0.05, retry_max=0.2, check_interval=1.0)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


async def test_a_notice_is_delivered_at_commit_never_for_a_rollback(bus: Bus):
    heard = Heard(bus, "head")
    engine = bus.engine
    with engine.begin() as conn:
        bus.publish("head", "a" * 40, conn)
        assert heard.items == []  # not before the commit
    with pytest.raises(RuntimeError), engine.begin() as conn:
        bus.publish("head", "b" * 40, conn)
        raise RuntimeError("the write fails")
    await asyncio.to_thread(bus.publish, "head", "c" * 40)
    assert await heard.until(lambda items: len(items) >= 2) == ["a" * 40, "c" * 40]


async def test_the_store_announces_progress_and_suspensions(bus: Bus):
    progress, env = Heard(bus, "progress"), Heard(bus, "env")
    store = Store(bus.engine)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    record = await asyncio.to_thread(store.create_deployment, new())
    await asyncio.to_thread(store.set_status, record.id, "in_progress", at=at)
    await asyncio.to_thread(
        store.add_event,
        record.id,
        status="in_progress",
        message="half way",
        percent=50,
        details=None,
        at=at,
    )
    await asyncio.to_thread(store.set_status, record.id, "completed", at=at)
    await progress.until(lambda items: len(items) >= 4)
    # The environment where the status changed (a replica's fleet summary reads it again);
    # a progress report changes no status.
    changed = f"{record.id} {record.environment}"
    assert progress.items == [changed, changed, str(record.id), changed]
    # Operator actions the environment's holder (maybe another replica) must act on.
    for environment, service, action in (
        ("production", None, "suspend"),
        ("staging", "api", "retry"),
        ("*", None, "sync"),
        ("production", "api", "deploy"),  # carried out where it was asked: no notice
        ("last", None, "resume"),
    ):
        await asyncio.to_thread(
            store.record_operator_action,
            environment=environment,
            service=service,
            action=action,
            actor="ada",
            note=None,
            at=at,
        )
    await env.until(lambda items: "last" in items)
    assert env.items == ["production", "staging", "*", "last"]


def test_a_notice_carries_ids_not_records(sqlite_url: str):
    bus = open_bus(sqlite_url)
    with pytest.raises(ValueError, match="ids, not records"):
        bus.publish("progress", "x" * 8000)
    with pytest.raises(ValueError, match="unknown notice topic"):
        bus.publish("nonsense", "1")


@pytest.mark.postgres
async def test_two_schemas_never_hear_each_other(pg_url: str):
    with pg_schema() as other_url:
        buses = [open_bus(url) for url in (pg_url, other_url)]
        for b in buses:
            await b.start()
        try:
            mine, theirs = Heard(buses[0], "env"), Heard(buses[1], "env")
            await asyncio.to_thread(buses[1].publish, "env", "theirs")
            await asyncio.to_thread(buses[0].publish, "env", "mine")
            assert await mine.until(bool) == ["mine"]  # not "theirs", published before
            assert await theirs.until(bool) == ["theirs"]
        finally:
            for b in buses:
                await b.stop()


@pytest.mark.postgres
async def test_a_killed_listener_comes_back_and_says_resync(pg_url: str):
    import os

    bus = open_bus(pg_url, retry_min=0.05, retry_max=0.2, check_interval=1.0)
    assert isinstance(bus, PostgresBus)
    await bus.start()
    try:
        heard = Heard(bus, "head")
        pid = bus.backend_pid()
        assert pid is not None
        admin = create_engine(os.environ[POSTGRES_URL_ENV])
        with admin.begin() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        admin.dispose()
        # Sent while the connection is down or coming back: maybe lost, hence the resync.
        assert await heard.until(lambda items: None in items)
        assert bus.connections == 2 and bus.backend_pid() != pid
        await asyncio.to_thread(bus.publish, "head", "d" * 40)
        assert (await heard.until(lambda items: "d" * 40 in items))[-1] == "d" * 40
    finally:
        await bus.stop()
