"""`verify`: walk the audit ledger's hash chain and match it against the rows it covers.

Three passes, each one streaming read in id order (bounded memory whatever the size):

1. the chain: sequence numbers without gaps, each entry linked to the previous hash, each
   hash recomputed — names the first entry altered, inserted or deleted;
2. the source rows against their entries (merge on id): a row altered, deleted, or
   inserted without an entry;
3. the published head, if given: an entry missing at the tail (the tail cut).

Retention checkpoints stand in for the events and logs they pruned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, select

from reconciler.store import chain
from reconciler.store.records import TERMINAL_STATUSES

if TYPE_CHECKING:
    from reconciler.store.store import Store

#: Rows fetched per round trip while streaming.
FETCH = 20_000
#: How often (in entries or rows) progress is reported.
PROGRESS_EVERY = 100_000

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong: the entry (seq) and/or source row (kind, ref) it concerns."""

    seq: int | None
    kind: str
    ref: int | None
    problem: str

    def line(self) -> str:
        what = f"{self.kind} {self.ref}" if self.ref is not None else self.kind
        if self.seq is None:
            return f"{what}: {self.problem}"
        return f"entry {self.seq} ({what}): {self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "ref": self.ref, "problem": self.problem}


@dataclass
class VerifyReport:
    """What `verify` found: ``ok`` when the chain and every row it covers are intact."""

    entries: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # entries per kind
    findings: list[Finding] = field(default_factory=list)
    head: chain.Head | None = None
    published: dict[str, Any] | None = None  # the head checked against, as published
    more: int = 0  # findings beyond those kept

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "counts": dict(sorted(self.counts.items())),
            "head": self.head.to_json() if self.head else None,
            "published_head": self.published,
            "findings": [f.to_json() for f in self.findings],
            "more_findings": self.more,
        }


@dataclass(frozen=True)
class LedgerCheck:
    """A walk of the ledger that the daemon made (every ``[audit] verify_interval``): what
    the dashboard's badge shows and the daemon logs."""

    at: datetime
    report: VerifyReport


class _Findings:
    def __init__(self, report: VerifyReport, limit: int) -> None:
        self.report, self.limit = report, limit

    def add(self, seq: int | None, kind: str, ref: int | None, problem: str) -> None:
        if len(self.report.findings) < self.limit:
            self.report.findings.append(Finding(seq, kind, ref, problem))
        else:
            self.report.more += 1


def verify(
    store: Store,
    *,
    published: dict[str, Any] | None = None,
    progress: Progress | None = None,
    limit: int = 1000,
) -> VerifyReport:
    """Check the ledger of ``store``; ``published``: a head as the daemon published it
    (``{"seq", "hash", "at"}``), read before calling (a head published later may be
    newer than what this reads). At most ``limit`` findings are kept (the rest counted)."""
    report = VerifyReport(published=published)
    found = _Findings(report, limit)
    with store.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # One snapshot for every pass, while the daemon appends (SQLite's read
            # transaction is one already): no row and entry seen at different times.
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        conn = conn.execution_options(stream_results=True, yield_per=FETCH)
        total = int(conn.execute(select(func.count()).select_from(chain.A)).scalar_one())
        pruned = _walk(conn, report, found, total, progress)
        report.head = chain.head(conn)
        _cross_syncs(conn, found)
        _cross_deployments(conn, found, pruned, progress)
        _cross_actions(conn, found)
    if published is not None:
        _check_published(report, found, published, store)
    return report


def _walk(
    conn: Connection,
    report: VerifyReport,
    found: _Findings,
    total: int,
    progress: Progress | None,
) -> dict[int, list[Any]]:
    """Pass 1. Returns the pruned deployments' [events, log] pairs from the checkpoints."""
    a = chain.A
    names = ("seq", "kind", "ref", "at", "payload", "prev_hash", "hash")
    query = select(*chain.columns(conn, a, names))
    expected, prev = 1, chain.GENESIS_PREV
    counts: dict[str, int] = {}
    pruned: dict[int, list[Any]] = {}
    entry_hash, iso = chain.entry_hash, chain.iso
    for seq, kind, ref, at, payload, prev_hash, stored in conn.execute(query.order_by(a.c.seq)):
        counts[kind] = counts.get(kind, 0) + 1
        if seq != expected:
            span = f"entry {expected}" if seq == expected + 1 else f"entries {expected}..{seq - 1}"
            found.add(seq, kind, ref, f"{span} missing before it — deleted")
        elif prev_hash != prev:
            found.add(
                seq,
                kind,
                ref,
                f"does not follow entry {seq - 1} (previous hash differs) — inserted,"
                " or the entry before it altered",
            )
        when = at if isinstance(at, str) else iso(at) or ""
        if entry_hash(seq, kind, ref, when, payload, prev_hash) != stored:
            found.add(seq, kind, ref, "hash mismatch — altered")
        if seq == 1 and kind != "genesis":
            found.add(seq, kind, ref, "the chain does not start with its genesis entry")
        if kind == "checkpoint":
            try:
                for deployment_id, events, log in json.loads(payload)["deployments"]:
                    pruned[int(deployment_id)] = [events, log]
            except (ValueError, KeyError, TypeError):
                found.add(seq, kind, ref, "checkpoint payload unreadable — altered")
        expected, prev = seq + 1, stored
        report.entries += 1
        if progress is not None and report.entries % PROGRESS_EVERY == 0:
            progress("chain", report.entries, total)
    report.counts = counts
    return pruned


def _entries(conn: Connection, kind: str) -> Iterator[tuple[int, int, str]]:
    """(ref, seq, payload) of the latest entry per source row of ``kind``, by ref."""
    a = chain.A
    query = (
        select(a.c.ref, a.c.seq, a.c.payload)
        .where(a.c.kind == kind)
        .order_by(a.c.kind, a.c.ref, a.c.seq)
    )
    last: tuple[int, int, str] | None = None
    for ref, seq, payload in conn.execute(query):
        if last is not None and last[0] != ref:
            yield last
        last = (ref, seq, payload)
    if last is not None:
        yield last


_END = (1 << 63, 0, "")


def _merge(
    found: _Findings,
    kind: str,
    rows: Iterator[tuple[int, str | None]],
    entries: Iterator[tuple[int, int, str]],
) -> None:
    """Match source rows ``(id, expected payload or None when it needs no entry yet)``
    with ``kind``'s entries; both in id order."""
    entry = next(entries, _END)
    for row_id, expected in rows:
        while entry[0] < row_id:
            _gone(found, kind, entry)
            entry = next(entries, _END)
        if entry[0] == row_id:
            if expected != entry[2]:
                found.add(None, kind, row_id, f"differs from its entry {entry[1]} — altered")
            entry = next(entries, _END)
        elif expected is not None:
            found.add(None, kind, row_id, "has no ledger entry — inserted outside the reconciler")
    while entry is not _END:
        _gone(found, kind, entry)
        entry = next(entries, _END)


def _gone(found: _Findings, kind: str, entry: tuple[int, int, str]) -> None:
    problem = f"no {kind} row {entry[0]} — the row was deleted, or the entry inserted"
    found.add(entry[1], kind, entry[0], problem)


def _cross_syncs(conn: Connection, found: _Findings) -> None:
    s = chain.S

    def rows() -> Iterator[tuple[int, str | None]]:
        for row in conn.execute(
            select(*chain.columns(conn, s, chain.SYNC_COLUMNS)).order_by(s.c.id)
        ):
            m = row._mapping
            yield m["id"], (chain.sync_payload(m) if m["result"] is not None else None)

    _merge(found, "sync", rows(), _entries(conn, "sync"))


def _cross_actions(conn: Connection, found: _Findings) -> None:
    oa = chain.OA
    query = select(*chain.columns(conn, oa, chain.OPERATOR_ACTION_COLUMNS)).order_by(oa.c.id)
    rows = ((r.id, chain.operator_action_payload(r._mapping)) for r in conn.execute(query))
    _merge(found, "operator_action", rows, _entries(conn, "operator_action"))


class _Details:
    """Streams a detail table (events or log lines) in (deployment, id) order and digests
    one deployment's rows at a time."""

    def __init__(self, conn: Connection, table: Any, columns: tuple[str, ...]) -> None:
        query = select(table.c.deployment_id, *chain.columns(conn, table, columns)).order_by(
            table.c.deployment_id, table.c.id
        )
        self.columns = columns
        self._rows = iter(conn.execute(query))
        self._next = next(self._rows, None)

    def digest(self, deployment_id: int, keep: bool) -> chain.Digest:
        digest = chain.Digest()
        while self._next is not None and self._next[0] <= deployment_id:
            if keep and self._next[0] == deployment_id:
                digest.add(self._next._mapping, self.columns)
            self._next = next(self._rows, None)
        return digest


def _cross_deployments(
    conn: Connection,
    found: _Findings,
    pruned: dict[int, list[Any]],
    progress: Progress | None,
) -> None:
    d = chain.D
    events = _Details(conn, chain.E, chain.EVENT_COLUMNS)
    logs = _Details(conn, chain.L, chain.LOG_COLUMNS)
    total = int(conn.execute(select(func.count()).select_from(d)).scalar_one())
    terminal = TERMINAL_STATUSES

    def rows() -> Iterator[tuple[int, str | None]]:
        query = select(*chain.columns(conn, d, chain.DEPLOYMENT_COLUMNS)).order_by(d.c.id)
        for done, row in enumerate(conn.execute(query), 1):
            m = row._mapping
            deployment_id = m["id"]
            ended = m["status"] in terminal
            ev = events.digest(deployment_id, ended).pair()
            log = logs.digest(deployment_id, ended).pair()
            if not ended:
                yield deployment_id, None
                continue
            gone = pruned.get(deployment_id)
            if gone is not None:  # pruned by retention: the checkpoint has what was there
                ev = gone[0] if ev[0] == 0 else ev
                log = gone[1] if log[0] == 0 else log
            yield deployment_id, chain.deployment_payload(m, ev, log)
            if progress is not None and done % PROGRESS_EVERY == 0:
                progress("deployments", done, total)

    _merge(found, "deployment", rows(), _entries(conn, "deployment"))


def _check_published(
    report: VerifyReport, found: _Findings, published: dict[str, Any], store: Store
) -> None:
    try:
        seq, digest = int(published["seq"]), str(published["hash"])
    except (KeyError, TypeError, ValueError):
        found.add(None, "head", None, "the published head is not {seq, hash, at}")
        return
    last = report.head.seq if report.head else 0
    if seq > last:
        found.add(
            seq,
            "head",
            None,
            f"published as the head, but the ledger ends at entry {last} — its tail was cut",
        )
        return
    a = chain.A
    with store.engine.connect() as conn:
        stored = conn.execute(select(a.c.hash).where(a.c.seq == seq)).scalar()
    if stored != digest:
        found.add(
            seq, "head", None, "hash differs from the published head — the chain was rewritten"
        )
