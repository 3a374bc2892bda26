"""Notices between the replicas of one database: who should read what again.

`open_bus(url)` gives the daemon a `Bus`: ``subscribe(topic, callback)``, ``publish(topic,
payload, conn=None)``, ``await start()``, ``await stop()``. The topics and what a notice
means are `reconciler.store.notices`' (the store's write paths send them in their own
transactions); callbacks run on the daemon's event loop and must be quick (set a flag,
request a sync).

- PostgreSQL: one dedicated psycopg connection LISTENs on every topic's channel. When it
  dies (a restarted server, ``pg_terminate_backend``) it is opened again with backoff, and
  then every subscriber hears a *resync* (``callback(None)``): notices sent while nobody
  listened are lost for good, so subscribers read the state again instead.
- SQLite: one process only; notices go to this process's subscribers after commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url

from reconciler.store import notices
from reconciler.store.notices import TOPICS

log = logging.getLogger(__name__)

#: A subscriber: the notice's payload, or None after a reconnect ("read it all again").
Callback = Callable[[str | None], None]


class Bus:
    """The in-process bus (SQLite), and what the PostgreSQL bus adds its listener to."""

    #: Other processes hear this bus's notices (PostgreSQL); else only this one does.
    shared = False

    def __init__(self, database_url: str, engine: Engine | None = None) -> None:
        self.url = database_url
        self._engine = engine
        self._own_engine = False
        self._subscribers: dict[str, list[Callback]] = {topic: [] for topic in TOPICS}
        self._wanted: set[str] = set()  # topics with subscribers (SQLite sends no others)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unlisten: Callable[[], None] | None = None

    def subscribe(self, topic: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` on the loop for each notice on ``topic``; returns the way out."""
        if topic not in self._subscribers:
            raise ValueError(f"unknown topic {topic!r} (known: {', '.join(TOPICS)})")
        callbacks = self._subscribers[topic]
        callbacks.append(callback)
        self._wanted.add(topic)

        def unsubscribe() -> None:
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._wanted.discard(topic)

        return unsubscribe

    def publish(self, topic: str, payload: str, conn: Connection | None = None) -> None:
        """Send a notice: with ``conn``'s transaction (delivered at its commit), else now.
        Blocking (a statement on PostgreSQL): call it from a worker thread."""
        if conn is not None:
            notices.notify(conn, topic, payload)
        else:
            notices.notify_now(self.engine, topic, payload)

    async def announce(self, topic: str, payload: str) -> None:
        """`publish` from the event loop; a database away is logged, not raised (a notice
        is a hint: the others find the change by their own polling)."""
        try:
            await asyncio.to_thread(self.publish, topic, payload)
        except Exception as exc:
            log.warning("event=notice_failed topic=%s error=%r", topic, _one_line(exc))

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from reconciler.store.db import make_engine

            self._engine = make_engine(self.url)
            self._own_engine = True
        return self._engine

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unlisten = notices.listen_locally(make_url(self.url), self._from_thread, self._wanted)

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._own_engine and self._engine is not None:
            self._engine.dispose()

    def _from_thread(self, topic: str, payload: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._dispatch, topic, payload)

    def _dispatch(self, topic: str, payload: str | None) -> None:
        for callback in list(self._subscribers.get(topic, ())):
            try:
                callback(payload)
            except Exception:  # one broken subscriber never silences the others
                log.exception("event=notice_subscriber_failed topic=%s", topic)

    def _resync(self) -> None:
        for topic in TOPICS:
            self._dispatch(topic, None)


class PostgresBus(Bus):
    """LISTEN on a dedicated connection, opened again (with backoff) when it dies."""

    shared = True

    def __init__(
        self,
        database_url: str,
        engine: Engine | None = None,
        *,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        check_interval: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(database_url, engine)
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.check_interval = check_interval  # an idle listener checks its connection
        self.connect_timeout = connect_timeout
        self.listening = asyncio.Event()  # set while LISTEN is in place
        self.connections = 0  # how many times LISTEN was put in place (tests, logs)
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)

    async def start(self) -> None:
        """Listen; returns once LISTEN is in place, or after the first failed attempt (the
        listener keeps trying in the background)."""
        first = asyncio.Event()
        self._task = asyncio.create_task(self._run(first), name="notice-listener")
        await first.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await super().stop()

    def backend_pid(self) -> int | None:
        """The listening session's process id (tests terminate it)."""
        conn = self._conn
        return None if conn is None or conn.closed else int(conn.info.backend_pid)

    async def _run(self, first: asyncio.Event) -> None:
        delay = self.retry_min
        said = False  # this outage was logged
        while True:
            before = self.connections
            try:
                await self._listen(first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connections > before:  # it was listening: start the backoff again
                    delay, said = self.retry_min, False
                if not said:
                    log.warning("event=notice_listener_lost error=%r", _one_line(exc))
                    said = True
            finally:
                self.listening.clear()
                first.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _listen(self, first: asyncio.Event) -> None:
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=max(1, int(self.connect_timeout)),
            application_name=f"reconciler notices, pid {os.getpid()}",  # pg_stat_activity
        ) as conn:
            self._conn = conn
            channels: dict[str, str] = {}
            for topic in TOPICS:
                cur = await conn.execute(
                    f"SELECT {notices.channel_sql('%(topic)s')}",
                    {"topic": topic},
                )
                row = await cur.fetchone()
                assert row is not None
                channels[str(row[0])] = topic
            for channel in channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.connections += 1
            self.listening.set()
            first.set()
            if self.connections > 1:
                log.info("event=notice_listener_back connections=%d", self.connections)
                self._resync()  # what was sent while nobody listened is lost: read again
            while True:
                async for notice in conn.notifies(timeout=self.check_interval):
                    heard = channels.get(notice.channel)
                    if heard is not None:
                        self._dispatch(heard, notice.payload)
                await conn.execute("SELECT 1")  # quiet a while: is the connection alive?


def open_bus(database_url: str, engine: Engine | None = None, **options: float) -> Bus:
    """The bus for ``database_url`` (``engine``: the store's, for publishing without a
    transaction of the caller's; options: `PostgresBus`' durations)."""
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresBus(database_url, engine, **options)
    return Bus(database_url, engine)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__
