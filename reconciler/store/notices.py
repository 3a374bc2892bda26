"""Notices between the processes sharing one database: "this changed, read it again".

A notice is a hint, never a record: the store stays the truth, and a listener that missed
notices (a dropped connection) reads the state again. So a notice carries ids, not records
(PostgreSQL's limit is 8000 bytes), and sending one never fails a write for want of a
listener.

- PostgreSQL: ``pg_notify`` inside the writer's transaction, so it is delivered at commit
  and never for a rolled back write. The channel names carry the schema (its first 40
  characters and a hash of all of it), so two schemas on one server never hear each
  other; they are computed by the server from ``current_schema()``, for writers and the
  listener alike (`channel_sql`), so both sides cannot disagree.
- SQLite (one process): the notice goes to the listeners this process registered for the
  database (`listen_locally`), once the transaction committed; a topic no listener wants
  costs nothing.

`reconciler.bus` listens; the store's write paths call `notify`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

#: What a notice is about, and what its payload is.
#: head: a new branch head was fetched (the sha); progress: a deployment recorded events
#: (its id) or was created or changed status ("id environment"); env: an environment was
#: suspended or resumed (its name); replicas: a replica joined, released environments or
#: left ("joined|released|left replica-id").
TOPICS: tuple[str, ...] = ("head", "progress", "env", "replicas")
#: PostgreSQL refuses payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7999

Listener = Callable[[str, str], None]  # (topic, payload); called in the writer's thread


def channel_sql(topic_param: str) -> str:
    """The SQL expression of a topic's channel name (under 64 bytes, PostgreSQL's limit)."""
    schema = "coalesce(current_schema(), '')"
    return (
        f"left('reconciler:' || {schema}, 40) || ':' || left(md5({schema}), 8) "
        f"|| ':' || {topic_param}"
    )


_NOTIFY = text(f"SELECT pg_notify({channel_sql(':topic')}, :payload)")

# ---- SQLite: listeners in this process, keyed by database ------------------------------

#: Per database: each listener with the topics it wants (a live collection: it may grow).
_local: dict[str, list[tuple[Listener, Collection[str]]]] = {}
_local_lock = threading.Lock()
_PENDING = "reconciler_notices_pending"  # in the DBAPI connection's info: not committed
_READY = "reconciler_notices_ready"  # committed, delivered when the connection is back
_hooked: weakref.WeakSet[Any] = weakref.WeakSet()  # the pools whose transactions are followed


_keys: dict[int, tuple[URL, str]] = {}  # id(URL) -> (the URL, its key): one render each


def database_key(url: URL | str) -> str:
    """The database a URL names (its password kept: two users are one database anyway)."""
    if isinstance(url, str):
        from sqlalchemy.engine import make_url

        url = make_url(url)
    known = _keys.get(id(url))
    if known is not None and known[0] is url:
        return known[1]
    key = url.render_as_string(hide_password=False)
    _keys[id(url)] = (url, key)
    return key


def listen_locally(
    url: URL | str, listener: Listener, topics: Collection[str]
) -> Callable[[], None]:
    """Hear this process's notices on ``topics`` (read at each notice: it may change) on
    the database at ``url``; returns the way to stop."""
    key = database_key(url)
    entry = (listener, topics)
    with _local_lock:
        _local.setdefault(key, []).append(entry)

    def stop() -> None:
        with _local_lock:
            listeners = _local.get(key, [])
            if entry in listeners:
                listeners.remove(entry)
            if not listeners:
                _local.pop(key, None)

    return stop


def _wanted(key: str, topic: str) -> bool:
    return any(topic in topics for _listener, topics in _local.get(key, ()))


def _deliver(key: str, notices: list[tuple[str, str]]) -> None:
    with _local_lock:
        listeners = list(_local.get(key, ()))
    for topic, payload in notices:
        for listener, topics in listeners:
            if topic not in topics:
                continue
            try:
                listener(topic, payload)
            except Exception:  # a broken listener never breaks a write
                log.exception("event=notice_listener_failed topic=%s", topic)


def _hook(engine: Engine) -> None:
    """Follow the transactions of ``engine``'s pool: notices of a committed transaction
    are delivered when its connection returns to the pool (after COMMIT), those of a rolled
    back one dropped."""
    engine = getattr(engine, "_proxied", engine)  # an engine with options: its base's events
    pool = engine.pool
    if pool in _hooked:
        return
    with _local_lock:
        if pool in _hooked:
            return
        _hooked.add(pool)
    key = database_key(engine.url)

    def committed(conn: Connection) -> None:
        info = conn.connection.info
        pending = info.pop(_PENDING, None)
        if pending:
            info.setdefault(_READY, []).extend(pending)

    def rolled_back(conn: Connection) -> None:
        conn.connection.info.pop(_PENDING, None)

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is None:
            return
        record.info.pop(_PENDING, None)  # never committed (an error before COMMIT)
        ready = record.info.pop(_READY, None)
        if ready:
            _deliver(key, ready)

    event.listen(engine, "commit", committed)
    event.listen(engine, "rollback", rolled_back)
    event.listen(pool, "checkin", checkin)


def check(topic: str, payload: str) -> None:
    if topic not in TOPICS:
        raise ValueError(f"unknown notice topic {topic!r} (known: {', '.join(TOPICS)})")
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a notice carries ids, not records ({len(payload)} characters)")


def notify(conn: Connection, topic: str, payload: str) -> None:
    """Send a notice with the transaction of ``conn``: delivered at its commit, never if
    it rolls back. On SQLite, nothing is sent when no listener is registered."""
    check(topic, payload)
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY, {"topic": topic, "payload": payload})
        return
    if not _local:  # no listener in this process (a command, not the daemon)
        return
    key = database_key(conn.engine.url)
    if not _wanted(key, topic):
        return
    _hook(conn.engine)
    if not conn.in_transaction():  # autocommit use: nothing to wait for
        _deliver(key, [(topic, payload)])
        return
    conn.connection.info.setdefault(_PENDING, []).append((topic, payload))


def notify_now(engine: Engine, topic: str, payload: str) -> None:
    """Send a notice on its own (in its own transaction)."""
    check(topic, payload)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(_NOTIFY, {"topic": topic, "payload": payload})
        return
    _deliver(database_key(engine.url), [(topic, payload)])
