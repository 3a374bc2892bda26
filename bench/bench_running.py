"""A status write on a service with a long history: the running-deployment look-up.

Every terminal `set_status` advances its service's `service_state` row, which includes the
newest unfinished deployment of the service (another one than the one ending, if any). The partial index `ix_deployments_running` (migration
0004) holds only unfinished deployments; the baseline is the same database with that index
dropped, where the look-up walks the service's whole history under SQLite's write lock.

    .venv/bin/python bench/bench_running.py [--full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import Table, machine, median, ms, ratio, say
from sqlalchemy import text

from reconciler.store import NewDeployment, Store


def new(version: str) -> NewDeployment:
    return NewDeployment(
        environment="production",
        service="api",
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


def fill(store: Store, rows: int) -> None:
    """`rows` completed deployments of one service, inserted in bulk."""
    at = datetime.now(UTC).isoformat()
    sql = (
        "INSERT INTO deployments (environment, service, version, provider, provider_type, "
        'strategy, status, "trigger", attempt, timeout_seconds, params, created_at, '
        "completed_at) VALUES ('production', 'api', ?, 'local', 'command', '{}', 'completed', "
        "'git', 1, 60, '{}', ?, ?)"
    )
    with store.engine.begin() as conn:
        conn.exec_driver_sql(sql, [(f"1.{i}", at, at) for i in range(rows)])


def status_writes(store: Store, count: int) -> list[float]:
    """Seconds per set_status: each new deployment goes in_progress, then completed."""
    out = []
    for i in range(count):
        rec = store.create_deployment(new(f"9.{i}"))
        for status in ("in_progress", "completed"):
            started = time.perf_counter()
            store.set_status(rec.id, status, at=datetime.now(UTC))
            out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="200,000 deployments")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--writes", type=int, default=20, help="deployments per side")
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.full else 50_000)
    with tempfile.TemporaryDirectory(prefix="bench-running-") as tmp:
        store = Store.from_url(f"sqlite:///{Path(tmp) / 'r.db'}", migrate=True)
        say(f"filling {rows:,} deployments of one service")
        fill(store, rows)
        mine = status_writes(store, args.writes)
        with store.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_deployments_running"))
        base = status_writes(store, args.writes)
        store.engine.dispose()
    table = Table(f"bench_running: set_status on a service with {rows:,} deployments; {machine()}")
    table.add(
        "set_status (median)",
        ms(median(mine), 2),
        ms(median(base), 2) + " no partial index",
        ratio(median(mine), median(base)),
        "< 10 ms",
        median(mine) < 0.01,
    )
    table.add("set_status (max)", ms(max(mine), 2), ms(max(base), 2), ratio(max(mine), max(base)))
    table.note(f"SQLite; {args.writes} deployments x 2 status writes per side")
    table.print()


if __name__ == "__main__":
    main()
