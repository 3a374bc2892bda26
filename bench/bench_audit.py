"""`audit verify` at scale: 1,000,000 ledger entries checked in under a minute.

Fills a migrated database (the real schema) with N ledger entries (default 1,000,000) and
the rows they cover, chained with the same code the store appends with
(`reconciler.store.chain.Appender`): 40 % deployments (each with 2 progress events and a
log line), 30 % syncs, 30 % operator actions. Then `reconciler.store.verification` is timed
(wall and CPU) against a baseline measured in the same run: reading the same rows
(ledger and sources, streamed in the same order) without hashing or comparing anything —
what any walk over the data must pay. Target: verify's CPU time under 60 s (the machine
is shared: wall time is printed with the load average, but CPU time is what the code
costs; on an idle machine wall is CPU plus the reads' I/O).

PostgreSQL runs too when ``RECONCILER_TEST_POSTGRES_URL`` is set, in a schema
``bench_<random>`` created for the run and dropped after it.

    .venv/bin/python bench/bench_audit.py                 # 1,000,000 entries
    .venv/bin/python bench/bench_audit.py --entries 100000
    .venv/bin/python bench/bench_audit.py --no-sqlite --postgres postgresql+psycopg://…
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import Table, machine, ratio, say, sec
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from reconciler.store import Store, verify
from reconciler.store import chain as ch

TARGET_SECONDS = 60.0
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def fill(store: Store, entries: int) -> None:
    """N entries (genesis included) and their source rows, in one transaction."""
    deployments = entries * 4 // 10
    syncs = entries * 3 // 10
    actions = entries - 1 - deployments - syncs
    with store._writer.begin() as conn:
        chain = ch.Appender(conn, ch.head(conn), batch=5000)
        pending: dict[Any, list[dict[str, Any]]] = {
            ch.S: [],
            ch.D: [],
            ch.E: [],
            ch.L: [],
            ch.OA: [],
        }

        def put(table: Any, row: dict[str, Any]) -> None:
            pending[table].append(row)
            if len(pending[table]) >= 5000:
                flush_sources()  # parents first: the foreign keys hold at every insert

        def flush_sources() -> None:
            for table, rows in pending.items():
                if rows:
                    conn.execute(insert(table), rows)
                    rows.clear()

        event_id = 0
        for i in range(1, syncs + 1):
            at = T0 + timedelta(seconds=i)
            row = {
                "id": i, "trigger": "poll", "commit_sha": f"{i:040x}", "commit_author": "Ada",
                "commit_time": at, "commit_subject": f"change {i}", "seen_at": at,
                "ended_at": at, "result": "ok", "full_load": False, "note": None,
                "environments_changed": ["production"], "errors": [], "error_message": None,
            }  # fmt: skip
            put(ch.S, row)
            chain.add("sync", i, ch.sync_payload(row), at)
        flush_sources()
        for i in range(1, deployments + 1):
            at = T0 + timedelta(seconds=i)
            row = {
                "id": i, "environment": f"env{i % 1000:04d}", "service": f"svc{i % 20:02d}",
                "version": f"1.{i % 50}.0", "previous_version": None, "provider": "local",
                "provider_type": "command", "strategy": {"type": "rolling"},
                "status": "completed", "error_message": None, "trigger": "git",
                "commit": f"{i:040x}", "commit_author": "Ada", "attempt": 1,
                "timeout_seconds": 1800, "validation": None, "params": {"replicas": 3},
                "created_at": at, "started_at": at, "completed_at": at,
                "sync_id": None, "rollback_of": None,
            }  # fmt: skip
            put(ch.D, {**row, "run_pgid": None, "run_process": None})
            events, log = ch.Digest(), ch.Digest()
            for status, message in (("pending", "queued"), ("completed", "done")):
                event_id += 1
                event = {"id": event_id, "deployment_id": i, "status": status,
                         "message": message, "percent": None, "details": {}, "at": at}  # fmt: skip
                put(ch.E, event)
                events.add(event, ch.EVENT_COLUMNS)
            line = {"id": i, "deployment_id": i, "stream": "stdout", "line": "ok", "at": at}
            put(ch.L, line)
            log.add(line, ch.LOG_COLUMNS)
            chain.add("deployment", i, ch.deployment_payload(row, events.pair(), log.pair()), at)
        flush_sources()
        for i in range(1, actions + 1):
            at = T0 + timedelta(seconds=i)
            row = {"id": i, "at": at, "environment": "production", "service": None,
                   "action": "suspend", "actor": "ada", "note": None, "origin": "http 10.0.0.1"}  # fmt: skip
            put(ch.OA, row)
            chain.add("operator_action", i, ch.operator_action_payload(row), at)
        flush_sources()
        chain.flush()


def read_everything(store: Store) -> int:
    """The baseline: stream the same rows verify reads, in the same order, doing nothing."""
    n = 0
    with store.engine.connect() as conn:
        conn = conn.execution_options(stream_results=True, yield_per=20_000)
        a = ch.A
        queries = [
            select(a).order_by(a.c.seq),
            select(a.c.ref, a.c.seq, a.c.payload).order_by(a.c.kind, a.c.ref, a.c.seq),
            select(ch.S).order_by(ch.S.c.id),
            select(ch.D).order_by(ch.D.c.id),
            select(ch.E).order_by(ch.E.c.deployment_id, ch.E.c.id),
            select(ch.L).order_by(ch.L.c.deployment_id, ch.L.c.id),
            select(ch.OA).order_by(ch.OA.c.id),
        ]
        for query in queries:
            for _row in conn.execute(query):
                n += 1
    return n


def measure(table: Table, label: str, url: str, entries: int) -> bool:
    store = Store.from_url(url)
    try:
        say(f"{label}: building {entries:,} entries …")
        started = time.perf_counter()
        fill(store, entries)
        if store.engine.dialect.name == "postgresql":
            with store._writer.begin() as conn:
                conn.execute(text("ANALYZE"))
        built = time.perf_counter() - started
        say(f"{label}: built in {built:.1f} s; reading baseline …")
        base_wall = time.perf_counter()
        read_everything(store)
        base_wall = time.perf_counter() - base_wall
        say(f"{label}: verifying …")
        cpu, wall = time.process_time(), time.perf_counter()
        report = verify(store)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if not report.ok or report.entries != entries:
            say(f"{label}: verify found {len(report.findings)} problems, {report.entries} entries")
            return False
        met = cpu < TARGET_SECONDS
        table.add(
            f"{label}: verify {entries:,} entries (CPU)",
            sec(cpu),
            "-",
            None,
            f"< {TARGET_SECONDS:.0f} s",
            met,
        )
        table.add(
            f"{label}: verify (wall) vs reading the rows",
            sec(wall),
            sec(base_wall),
            ratio(wall, base_wall),
        )
        table.add(f"{label}: entries per CPU second", f"{entries / cpu:,.0f}")
        table.add(f"{label}: building the data set", sec(built))
        return met
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=os.environ.get("RECONCILER_TEST_POSTGRES_URL"))
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only.")
    args = parser.parse_args()
    if args.no_sqlite and not args.postgres:
        parser.error("--no-sqlite needs --postgres URL (or RECONCILER_TEST_POSTGRES_URL)")
    say(f"bench_audit: {args.entries:,} entries; {machine()}")
    table = Table(f"audit verify ({machine()}); baseline: the same rows read, unchecked")
    ok = True
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            ok &= measure(table, "SQLite", f"sqlite:///{Path(tmp) / 'audit.db'}", args.entries)
    if args.postgres:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = make_url(args.postgres).update_query_dict({"options": f"-csearch_path={schema}"})
            ok &= measure(
                table, "PostgreSQL", url.render_as_string(hide_password=False), args.entries
            )
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()
    table.note("load average after the run: " + machine())
    table.print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
