"""The history filters use indexes (migration 0008), on SQLite and PostgreSQL.

For every filter combination SPEC §7 offers (`history --env --service --status --since
--limit`), the query `Store.history` runs is captured and explained: no plan may read the
whole deployments table unless it reads it newest first and stops at the limit (no
equality filter). The plans are honest at test size: SQLite's planner has no statistics
(the daemon runs no ANALYZE), so a few rows plan as a million do; PostgreSQL's planner
prefers a sequential scan of a small table, so its sequential scans are switched off
(``enable_seqscan = off``): it then still picks a Seq Scan when no index can serve the
query, which is what the test looks for. Both forms of the ``since`` query (from the
recent rows, or newest first) are checked, and give the same rows as filtering in Python.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event

from reconciler.store import Store
from reconciler.store import deployments as deployment_queries
from tests.test_store import new

T0 = datetime(2026, 11, 1, tzinfo=UTC)
FILTERS = ("environment", "service", "status", "since")
VALUES: dict[str, Any] = {
    "environment": "env1",
    "service": "svc2",
    "status": "failed",
    "since": T0 + timedelta(days=5),
}


def combinations() -> Iterator[dict[str, Any]]:
    for size in range(len(FILTERS) + 1):
        for names in itertools.combinations(FILTERS, size):
            yield {name: VALUES[name] for name in names}


def fill(store: Store) -> None:
    """Deployments with created_at not in id order (an imported ledger may be so)."""
    rng = random.Random(5)
    for index in range(120):
        record = store.create_deployment(
            new(
                f"env{rng.randrange(3)}",
                f"svc{rng.randrange(4)}",
                f"1.{index}.0",
                created_at=T0 + timedelta(hours=index * 2 + rng.randrange(-30, 30)),
            )
        )
        end = T0 + timedelta(days=11)
        store.set_status(record.id, rng.choice(["completed", "failed", "timed_out"]), at=end)


class Captured:
    """The SQL statements a store runs (and their parameters), via SQLAlchemy's events."""

    def __init__(self, store: Store) -> None:
        self.statements: list[tuple[str, Any]] = []
        event.listen(store.engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        self.statements.append((statement, params))


def plan_of(store: Store, statement: str, params: Any) -> list[str]:
    with store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            return [str(row[-1]) for row in rows]
        conn.exec_driver_sql("SET enable_seqscan = off")
        return [str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + statement, params)]


def full_scans(plan: list[str], *, newest_first_ok: bool) -> list[str]:
    """Plan lines that read all of deployments (SQLite ``SCAN``; PostgreSQL ``Seq Scan``)."""
    text = " | ".join(plan)
    if newest_first_ok and "TEMP B-TREE" not in text:
        # A SCAN in rowid order (id DESC, no sort) stops after `limit` rows.
        return [line for line in plan if "Seq Scan on deployments" in line]
    return [
        line
        for line in plan
        if line.strip().startswith("SCAN deployments") or "Seq Scan on deployments" in line
    ]


def expected(records: list[Any], filters: dict[str, Any], limit: int) -> list[int]:
    def keep(record: Any) -> bool:
        for name in ("environment", "service", "status"):
            if name in filters and getattr(record, name) != filters[name]:
                return False
        return "since" not in filters or record.created_at >= filters["since"]

    return [r.id for r in records if keep(r)][:limit]


@pytest.mark.parametrize("sparse_since", [2000, 1], ids=["since-sparse", "since-dense"])
def test_every_history_filter_combination_is_served_by_an_index(
    store: Store, sparse_since: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # since-dense: every since counts as "many recent rows" (the newest-first form).
    monkeypatch.setattr(deployment_queries, "_SPARSE_SINCE", sparse_since)
    fill(store)
    everything = store.history(limit=1000)
    assert len(everything) == 120
    captured = Captured(store)
    checked = 0
    for filters in combinations():
        for limit in (5, 50):
            captured.statements.clear()
            got = [r.id for r in store.history(limit=limit, **filters)]
            assert got == expected(everything, filters, limit), filters
            statement, params = captured.statements[-1]
            plan = plan_of(store, statement, params)
            # No equality filter: reading the table newest first is the plan (it stops
            # at the limit, and "many recent rows" means the newest ones match).
            bad = full_scans(plan, newest_first_ok=not set(filters) - {"since"})
            assert not bad, f"{filters}: {plan}"
            checked += 1
    assert checked == 2 * 16


def test_a_service_with_a_status_in_one_environment_reads_that_service_only(
    store: Store,
) -> None:
    """env + service + status: through (environment, service, id), not (service, status,
    id) — which SQLite's planner would pick, reading that service in every environment."""
    fill(store)
    captured = Captured(store)
    store.history(environment="env1", service="svc2", status="failed")
    plan = " | ".join(plan_of(store, *captured.statements[-1]))
    if store.engine.dialect.name == "sqlite":
        assert "ix_deployments_environment_service_id" in plan, plan
    else:
        assert "ix_deployments_status_service_id" not in plan, plan
