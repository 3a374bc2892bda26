"""Benchmark of the store's history and status queries on a large ledger.

Fills a database with N deployments (default 1,000,000) over E environments x S services
(default 1,000 x 20) by bulk insert (executemany, not `Store.create_deployment`), rebuilds
`service_state`, then times the queries the CLI, the API and the engine run. Prints a table.

    .venv/bin/python bench/bench_store.py                       # SQLite in a temp dir
    .venv/bin/python bench/bench_store.py --deployments 100000  # quicker
    .venv/bin/python bench/bench_store.py --url postgresql+psycopg://postgres@127.0.0.1/test

PostgreSQL: use an empty database or schema (the tables are created by the migrations);
add ``?options=-csearch_path%3Dbench`` to the URL to work in a schema named ``bench``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from reconciler.store import NewDeployment, Store
from reconciler.store.models import Base

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def fill(store: Store, deployments: int, environments: int, services: int) -> float:
    table = Base.metadata.tables["deployments"]
    per_service = max(1, deployments // (environments * services))
    rng = random.Random(42)
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    count = 0
    with store.engine.begin() as conn:
        for round_ in range(per_service):
            for e in range(environments):
                for s in range(services):
                    if count >= deployments:
                        break
                    created = T0 + timedelta(minutes=count)
                    roll = rng.random()
                    status = (
                        "completed" if roll < 0.85 else "failed" if roll < 0.97 else "timed_out"
                    )
                    batch.append(
                        {
                            "environment": f"env{e:04d}",
                            "service": f"svc{s:02d}",
                            "version": f"1.{round_}.0",
                            "previous_version": f"1.{round_ - 1}.0" if round_ else None,
                            "provider": "local",
                            "provider_type": "command",
                            "strategy": {"type": "rolling"},
                            "status": status,
                            "error_message": None if status == "completed" else "exit status 1",
                            "trigger": "git",
                            "commit": f"{count:040x}",
                            "commit_author": "Bench <bench@example.com>",
                            "attempt": 1,
                            "timeout_seconds": 1800,
                            "validation": None,
                            "params": {},
                            "created_at": created,
                            "started_at": created + timedelta(seconds=1),
                            "completed_at": created + timedelta(seconds=30),
                        }
                    )
                    count += 1
                    if len(batch) >= 20_000:
                        conn.execute(insert(table), batch)
                        batch = []
        if batch:
            conn.execute(insert(table), batch)
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    times = []
    result: Any = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: SQLite in a temporary folder)")
    parser.add_argument("--deployments", type=int, default=1_000_000)
    parser.add_argument("--environments", type=int, default=1_000)
    parser.add_argument("--services", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        store = Store.from_url(url)
        rows: list[tuple[str, str]] = []

        def row(name: str, value: str) -> None:
            rows.append((name, value))
            print(f"  {name:<55} {value}", flush=True)

        print(f"database: {store.engine.url.render_as_string(hide_password=True)}")
        fill_s = fill(store, args.deployments, args.environments, args.services)
        with store.engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM deployments")).scalar_one()
        row(f"bulk insert {total:,} deployments", f"{fill_s:8.1f} s")

        started = time.perf_counter()
        store.rebuild_service_state()
        row("rebuild_service_state()", f"{time.perf_counter() - started:8.1f} s")

        rng = random.Random(7)
        envs = [f"env{rng.randrange(args.environments):04d}" for _ in range(50)]
        it = iter(envs * 10)
        med, p95, _ = timed(lambda: store.history(environment=next(it), limit=50), 50)
        row("history(environment=E, limit=50)", f"{med * 1e3:8.2f} ms median, {p95 * 1e3:.2f} p95")
        it = iter(envs * 10)
        med, p95, _ = timed(
            lambda: store.history(environment=next(it), service="svc07", limit=50), 50
        )
        row("history(environment=E, service=S, limit=50)", f"{med * 1e3:8.2f} ms median")
        med, _, _ = timed(lambda: store.history(limit=50), 20)
        row("history(limit=50)", f"{med * 1e3:8.2f} ms median")
        med, _, _ = timed(lambda: store.history(status="timed_out", limit=50), 20)
        row("history(status=timed_out, limit=50)", f"{med * 1e3:8.2f} ms median")
        med, _, states = timed(store.service_states, 5)
        row(f"service_states() all ({len(states):,} services)", f"{med * 1e3:8.1f} ms median")
        med, _, _ = timed(lambda: store.service_states(envs[:10]), 20)
        row("service_states(10 environments)", f"{med * 1e3:8.2f} ms median")
        triples = [
            (f"env{rng.randrange(args.environments):04d}", f"svc{rng.randrange(20):02d}", "1.3.0")
            for _ in range(2000)
        ]
        med, _, found = timed(lambda: store.completed_versions(triples), 5)
        row(f"completed_versions(2,000 triples) -> {len(found)}", f"{med * 1e3:8.1f} ms median")

        def one_deployment() -> None:
            record = store.create_deployment(
                NewDeployment(
                    environment=envs[0],
                    service="svc03",
                    version="9.9.9",
                    previous_version=None,
                    provider="local",
                    provider_type="command",
                    strategy={"type": "rolling"},
                    trigger="git",
                    commit="f" * 40,
                    commit_author=None,
                    attempt=1,
                    timeout_seconds=60,
                    params={},
                )
            )
            now = datetime.now(UTC)
            store.set_status(record.id, "in_progress", at=now)
            store.set_status(record.id, "failed", at=now, error_message="bench")

        med, _, _ = timed(one_deployment, 20)
        row("create + in_progress + failed (3 transactions)", f"{med * 1e3:8.2f} ms median")
        store.engine.dispose()

    width = max(len(name) for name, _ in rows)
    print()
    print(f"| {'operation':<{width}} | time |")
    print(f"| {'-' * width} | ---- |")
    for name, value in rows:
        print(f"| {name:<{width}} | {value.strip()} |")


if __name__ == "__main__":
    main()
