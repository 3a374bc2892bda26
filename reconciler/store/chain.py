"""The audit ledger's hash chain: canonical entries, appending, the head, the backfill.

Each fact (a finished sync, a deployment once terminal and again at ``failed`` →
``rolled_back``, an operator action, a retention checkpoint) becomes one `audit_ledger`
row, appended by the query that records the fact, in its transaction. The entry's
``payload`` is the source row as canonical JSON (sorted keys, no spaces, times in
microseconds UTC); a deployment's also carries the count and SHA-256 of its progress
events and of its log, so that editing either shows. ``hash`` is SHA-256 over the entry's
own canonical JSON, which holds the previous entry's hash: changing, inserting or
removing one entry breaks every link after it (`verify.py` walks them).

Appends are serialised so the chain never forks: SQLite's writers already hold the write
lock from BEGIN (``BEGIN IMMEDIATE``), PostgreSQL's take a transaction-level advisory lock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    String,
    bindparam,
    func,
    insert,
    inspect,
    select,
    text,
    type_coerce,
)
from sqlalchemy.sql.elements import ColumnElement

from reconciler.store import models
from reconciler.store.fast import Fast
from reconciler.store.models import UTCDateTime
from reconciler.store.records import TERMINAL_STATUSES

FORMAT = 1
GENESIS_PREV = "0" * 64
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
#: Key of the PostgreSQL advisory lock serialising appends ("ledger").
PG_LEDGER_LOCK = 0x6C6564676572

KINDS = ("genesis", "sync", "deployment", "operator_action", "checkpoint")

A = models.audit_ledger
S = models.syncs
D = models.deployments
E = models.deployment_events
L = models.deployment_logs
OA = models.operator_actions

#: The columns each kind's payload always holds (format 1), named once: a column added to
#: a table later is covered when it holds a value (see `row_json`), so a migration that
#: adds one never changes the payload of the rows that predate it.
SYNC_BASE = frozenset(
    ("id", "trigger", "commit_sha", "commit_author", "commit_time", "commit_subject",
     "seen_at", "ended_at", "result", "full_load", "note", "environments_changed", "errors",
     "error_message")
)  # fmt: skip
DEPLOYMENT_BASE = frozenset(
    ("id", "environment", "service", "version", "previous_version", "provider",
     "provider_type", "strategy", "status", "error_message", "trigger", "commit",
     "commit_author", "attempt", "timeout_seconds", "validation", "params", "created_at",
     "started_at", "completed_at", "sync_id", "rollback_of")
)  # fmt: skip
OPERATOR_ACTION_BASE = frozenset(
    ("id", "at", "environment", "service", "action", "actor", "note", "origin")
)
#: Bookkeeping, not record: a deployment's run process (crash recovery).
NOT_COVERED = frozenset(("run_pgid", "run_process"))


def _covered(table: Any) -> tuple[str, ...]:
    return tuple(c.name for c in table.columns if c.name not in NOT_COVERED)


SYNC_COLUMNS = _covered(S)
DEPLOYMENT_COLUMNS = _covered(D)
OPERATOR_ACTION_COLUMNS = _covered(OA)
EVENT_COLUMNS = ("id", "status", "message", "percent", "details", "at")
LOG_COLUMNS = ("id", "stream", "line", "at")


@dataclass(frozen=True, slots=True)
class Head:
    """The newest entry: what the daemon publishes so that a cut tail shows."""

    seq: int
    hash: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "at": iso(self.at)}


#: Built once: `json.dumps` with options builds a new encoder at every call, which is most
#: of the cost of verifying a million entries.
canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not UTC:  # the store hands out UTC already: skip the conversion
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")


def _plain(value: Any) -> Any:
    return iso(value) if isinstance(value, datetime) else value


def row_json(row: Mapping[Any, Any], names: Iterable[str], base: frozenset[str]) -> dict[str, Any]:
    """The row's ``base`` columns, and its other ``names`` that hold a value."""
    body = {}
    for name in names:
        value = row.get(name)
        if value is not None or name in base:
            body[name] = _plain(value)
    return body


def entry_hash(seq: int, kind: str, ref: int | None, at: str, payload: str, prev: str) -> str:
    """SHA-256 of the entry's canonical JSON (keys sorted; the payload is canonical already,
    so it is spliced in as it is stored: verifying never parses it)."""
    message = (
        f'{{"at":"{at}","kind":"{kind}","payload":{payload},"prev":"{prev}",'
        f'"ref":{"null" if ref is None else int(ref)},"seq":{int(seq)}}}'
    )
    return hashlib.sha256(message.encode()).hexdigest()


class Digest:
    """Count and SHA-256 of a deployment's progress events or log lines, in id order."""

    __slots__ = ("_sha", "count")

    def __init__(self) -> None:
        self.count = 0
        self._sha = hashlib.sha256()

    def add(self, row: Mapping[Any, Any], columns: Iterable[str]) -> None:
        self.count += 1
        self._sha.update(canonical([_plain(row[c]) for c in columns]).encode())
        self._sha.update(b"\n")

    def pair(self) -> list[Any]:
        return [self.count, self._sha.hexdigest()]


def deployment_payload(
    row: Mapping[Any, Any], events: list[Any] | None, log: list[Any] | None
) -> str:
    """A deployment's entry payload: its record, and [count, digest] of events and log."""
    body = row_json(row, DEPLOYMENT_COLUMNS, DEPLOYMENT_BASE)
    body["events"] = events if events is not None else [0, EMPTY_DIGEST]
    body["log"] = log if log is not None else [0, EMPTY_DIGEST]
    return canonical(body)


def sync_payload(row: Mapping[Any, Any]) -> str:
    return canonical(row_json(row, SYNC_COLUMNS, SYNC_BASE))


def operator_action_payload(row: Mapping[Any, Any]) -> str:
    return canonical(row_json(row, OPERATOR_ACTION_COLUMNS, OPERATOR_ACTION_BASE))


def columns(
    conn: Connection, table: Any, names: tuple[str, ...], present: set[str] | None = None
) -> list[ColumnElement[Any]]:
    """``names`` of ``table`` as payloads are made from them. On SQLite, times come as text
    made by SQLite from the stored text (``2026-11-29 10:00:00.000000`` →
    ``2026-11-29T10:00:00.000000+00:00``, what `iso` makes of the time the store wrote):
    parsing a million datetimes only to format them again is a good part of a verify."""
    return dialect_columns(conn.dialect.name, table, names, present)


def dialect_columns(
    dialect: str, table: Any, names: tuple[str, ...], present: set[str] | None = None
) -> list[ColumnElement[Any]]:
    """`columns` for a dialect named (statements built once per dialect)."""
    out: list[ColumnElement[Any]] = []
    for name in names:
        if present is not None and name not in present:
            continue  # a later migration adds it: None until then, left out of payloads
        column: Column[Any] = table.c[name]
        if dialect == "sqlite" and isinstance(column.type, UTCDateTime):
            raw = type_coerce(column, String)
            out.append(type_coerce(func.replace(raw, " ", "T") + "+00:00", String).label(name))
        else:
            out.append(column)
    return out


# Statements of the append path, built once: building and keying a statement per call
# costs more than running it (issue 12).
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
# Run through the driver on SQLite (fast.py): one of each per deployment.
_HEAD = Fast(select(A.c.seq, A.c.hash, A.c.at).order_by(A.c.seq.desc()).limit(1))
_INSERT = Fast(insert(A))


def lock(conn: Connection) -> None:
    """Serialise appends until the transaction ends (SQLite writers hold the lock already)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK, {"key": PG_LEDGER_LOCK})


def head(conn: Connection) -> Head | None:
    found = _HEAD.rows(conn)
    if not found:
        return None
    row = found[0]
    return Head(int(row["seq"]), str(row["hash"]), row["at"])


class Appender:
    """Entries chained in memory and inserted in batches: one append, a backfill, a bench."""

    def __init__(self, conn: Connection, after: Head | None, batch: int = 2000) -> None:
        self.conn = conn
        self.seq = after.seq if after else 0
        self.prev = after.hash if after else GENESIS_PREV
        self.batch = batch
        self._rows: list[dict[str, Any]] = []

    def add(self, kind: str, ref: int | None, payload: str, at: datetime) -> Head:
        prev = self.prev
        self.seq += 1
        self.prev = entry_hash(self.seq, kind, ref, iso(at) or "", payload, prev)
        self._rows.append(
            {
                "seq": self.seq,
                "kind": kind,
                "ref": ref,
                "at": at,
                "payload": payload,
                "prev_hash": prev,
                "hash": self.prev,
            }
        )
        if len(self._rows) >= self.batch:
            self.flush()
        return Head(self.seq, self.prev, at)

    def flush(self) -> None:
        if self._rows:
            _INSERT.execute_many(self.conn, self._rows)
            self._rows = []


def append(conn: Connection, kind: str, ref: int | None, payload: str) -> Head:
    """Append one entry after the head, in the caller's transaction."""
    lock(conn)
    after = head(conn)
    now = datetime.now(UTC)
    chain = Appender(conn, after)
    if after is None:  # an offline-migrated database: the chain starts here
        _genesis(chain, now)
    entry = chain.add(kind, ref, payload, now)
    chain.flush()
    return entry


def _genesis(chain: Appender, now: datetime) -> Head:
    return chain.add("genesis", None, canonical({"format": FORMAT, "backfilled": None}), now)


def begin(conn: Connection) -> str:
    """The genesis entry's hash, the entry written first if the chain has not begun."""
    lock(conn)
    first = conn.execute(select(A.c.hash).where(A.c.seq == 1)).scalar()
    if first is not None:
        return str(first)
    chain = Appender(conn, None)
    entry = _genesis(chain, datetime.now(UTC))
    chain.flush()
    return entry.hash


@lru_cache(maxsize=8)
def _digest_query(dialect: str, table: Any, names: tuple[str, ...]) -> Fast:
    """One deployment's rows of ``table`` (bound as ``did``), in id order, as digested."""
    return Fast(
        select(*dialect_columns(dialect, table, names))
        .where(table.c.deployment_id == bindparam("did"))
        .order_by(table.c.id)
    )


def digest_of(conn: Connection, table: Any, names: tuple[str, ...], deployment_id: int) -> Digest:
    digest = Digest()
    query = _digest_query(conn.dialect.name, table, names)
    for row in query.rows(conn, {"did": deployment_id}):
        digest.add(row, names)
    return digest


def deployment_entry(
    conn: Connection,
    deployment_id: int,
    present: set[str] | None = None,
    row: Mapping[Any, Any] | None = None,
) -> str:
    """The deployment's payload; ``row``: its record as the write that ended it returned
    it (times as aware datetimes, which `iso` turns into the text the stored form gives),
    so that it is not read again."""
    if row is None:
        query = select(*columns(conn, D, DEPLOYMENT_COLUMNS, present))
        row = conn.execute(query.where(D.c.id == deployment_id)).one()._mapping
    events = digest_of(conn, E, EVENT_COLUMNS, deployment_id).pair()
    log = digest_of(conn, L, LOG_COLUMNS, deployment_id).pair()
    return deployment_payload(row, events, log)


def record_sync(conn: Connection, sync_id: int) -> Head:
    row = conn.execute(select(*columns(conn, S, SYNC_COLUMNS)).where(S.c.id == sync_id)).one()
    return append(conn, "sync", sync_id, sync_payload(row._mapping))


def record_deployment(
    conn: Connection, deployment_id: int, row: Mapping[Any, Any] | None = None
) -> Head:
    """A deployment that reached a terminal status (or went ``failed`` → ``rolled_back``);
    ``row``: its whole record, as the UPDATE ... RETURNING that ended it gave it."""
    payload = deployment_entry(conn, deployment_id, row=row)
    return append(conn, "deployment", deployment_id, payload)


def record_operator_action(conn: Connection, action_id: int) -> Head:
    query = select(*columns(conn, OA, OPERATOR_ACTION_COLUMNS)).where(OA.c.id == action_id)
    row = conn.execute(query).one()
    return append(conn, "operator_action", action_id, operator_action_payload(row._mapping))


def backfill(conn: Connection) -> int:
    """Chain the rows of a database that had no ledger: a genesis entry with the counts,
    then every finished sync, terminal deployment and operator action. Returns the
    entries written (0 when the ledger has begun already)."""
    lock(conn)
    if head(conn) is not None:
        return 0
    terminal = sorted(TERMINAL_STATUSES)
    finished_syncs = S.c.result.is_not(None)
    counts = {
        "syncs": conn.execute(select(func.count()).where(finished_syncs)).scalar_one(),
        "deployments": conn.execute(
            select(func.count()).where(D.c.status.in_(terminal))
        ).scalar_one(),
        "operator_actions": conn.execute(select(func.count()).select_from(OA)).scalar_one(),
    }
    now = datetime.now(UTC)
    chain = Appender(conn, None)
    # Run by migration 0007: columns that later migrations add are not there yet.
    have = {t.name: {c["name"] for c in inspect(conn).get_columns(t.name)} for t in (S, D, OA)}
    chain.add("genesis", None, canonical({"format": FORMAT, "backfilled": counts}), now)
    syncs = (
        select(*columns(conn, S, SYNC_COLUMNS, have[S.name])).where(finished_syncs).order_by(S.c.id)
    )
    for row in conn.execute(syncs).all():
        chain.add("sync", row.id, sync_payload(row._mapping), now)
    ids = conn.execute(select(D.c.id).where(D.c.status.in_(terminal)).order_by(D.c.id))
    for deployment_id in ids.scalars().all():
        payload = deployment_entry(conn, deployment_id, have[D.name])
        chain.add("deployment", deployment_id, payload, now)
    actions = select(*columns(conn, OA, OPERATOR_ACTION_COLUMNS, have[OA.name])).order_by(OA.c.id)
    for row in conn.execute(actions).all():
        chain.add("operator_action", row.id, operator_action_payload(row._mapping), now)
    chain.flush()
    return chain.seq
