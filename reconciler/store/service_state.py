"""The service-state queries: `service_state`, one derived row per service.

It is kept up to date in the same transaction as every deployment insert or status change
(`refresh_service_state`, called by the deployment queries); `rebuild_service_state`
recomputes the table from the deployments with the same rules (`ServiceFold`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, text, update

from reconciler.store import models, rows
from reconciler.store.models import UNFINISHED_SQL
from reconciler.store.records import (
    ACTIVE_STATUSES,
    FAILURE_STATUSES,
    TERMINAL_STATUSES,
    ServiceState,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_chunks = rows.chunks
_insert_ignore = rows.insert_ignore

#: Rows fetched at a time when scanning one service's deployments backwards.
_SCAN_PAGE = 64

_D = models.deployments
_SS = models.service_state

_TERMINAL = tuple(sorted(TERMINAL_STATUSES))

# Columns the service-state fold reads, newest deployment first.
_FOLD_COLUMNS = (_D.c.id, _D.c.version, _D.c.status, _D.c.trigger, _D.c.completed_at)

#: service_state columns in the order of `ServiceState`'s fields.
_SERVICE_STATE_COLUMNS = tuple(_SS.c[name] for name in ServiceState._fields)


@dataclass
class ServiceFold:
    """Derives one service's `service_state` from its deployments, newest first.

    The single definition of the rules, used by the incremental update (which stops
    reading as soon as `done`) and by `Store.rebuild_service_state` (which feeds all).
    """

    reset_id: int | None
    track_running: bool
    seen: int = 0
    last_deployment_id: int | None = None
    last_status: str | None = None
    last_version: str | None = None
    last_ended_at: datetime | None = None
    deployed_version: str | None = None
    deployed_deployment_id: int | None = None
    deployed_done: bool = False
    running_deployment_id: int | None = None
    running_done: bool = False
    streak_version: str | None = None
    streak_count: int = 0
    streak_last_at: datetime | None = None
    streak_done: bool = False

    @property
    def done(self) -> bool:
        return (
            self.deployed_done
            and self.streak_done
            and (self.running_done or not self.track_running)
        )

    def feed(self, row: Sequence[Any]) -> None:
        ident, version, status, trigger, completed_at = row
        if self.seen == 0:
            self.last_deployment_id = ident
            self.last_status = status
            self.last_version = version
            self.last_ended_at = completed_at
        self.seen += 1
        if not self.deployed_done and status == "completed":
            self.deployed_version = version
            self.deployed_deployment_id = ident
            self.deployed_done = True
        if self.track_running and not self.running_done and status in ACTIVE_STATUSES:
            self.running_deployment_id = ident
            self.running_done = True
        if self.streak_done:
            return
        if self.reset_id is not None and ident <= self.reset_id:
            self.streak_done = True
            return
        if trigger == "rollback" or status == "cancelled" or status in ACTIVE_STATUSES:
            return
        if status in FAILURE_STATUSES:
            if self.streak_count == 0:
                self.streak_version = version
                self.streak_count = 1
                self.streak_last_at = completed_at
            elif version == self.streak_version:
                self.streak_count += 1
            else:
                self.streak_done = True
        else:  # completed
            self.streak_done = True

    def values(self) -> dict[str, Any]:
        return {
            "deployed_version": self.deployed_version,
            "deployed_deployment_id": self.deployed_deployment_id,
            "last_deployment_id": self.last_deployment_id,
            "last_status": self.last_status,
            "last_version": self.last_version,
            "last_ended_at": self.last_ended_at,
            "running_deployment_id": self.running_deployment_id,
            "streak_version": self.streak_version,
            "streak_count": self.streak_count,
            "streak_last_at": self.streak_last_at,
        }


def refresh_service_state(conn: Connection, environment: str, service: str) -> None:
    """Recompute one service's row from its deployments, inside the caller's transaction."""
    key = (_SS.c.environment == environment, _SS.c.service == service)
    # Make sure the row exists, then lock it: concurrent refreshes of one service
    # serialise here (PostgreSQL; SQLite writers are serialised by BEGIN IMMEDIATE).
    _insert_ignore(
        conn,
        _SS,
        {"environment": environment, "service": service, "streak_count": 0},
        ["environment", "service"],
    )
    reset_id = conn.execute(select(_SS.c.streak_reset_id).where(*key).with_for_update()).scalar()

    fold = ServiceFold(reset_id=reset_id, track_running=False)
    where = (_D.c.environment == environment, _D.c.service == service)
    before: int | None = None
    while not fold.done:
        query = select(*_FOLD_COLUMNS).where(*where).order_by(_D.c.id.desc()).limit(_SCAN_PAGE)
        if before is not None:
            query = query.where(_D.c.id < before)
        rows = conn.execute(query).all()
        for row in rows:
            fold.feed(row)
            if fold.done:
                break
        if len(rows) < _SCAN_PAGE:
            break
        before = rows[-1][0]
    # The condition is inlined as the partial index states it (not bound parameters), so
    # both databases search ix_deployments_running instead of the whole history.
    fold.running_deployment_id = conn.execute(
        select(func.max(_D.c.id)).where(*where, text(UNFINISHED_SQL))
    ).scalar()
    conn.execute(update(_SS).where(*key).values(**fold.values()))


class ServiceStateQueries:
    """Service-state queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def service_states(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], ServiceState]:
        query = select(*_SERVICE_STATE_COLUMNS)
        rows: list[Any] = []
        with self.engine.connect() as conn:
            if environments is None:
                rows = list(conn.execute(query).all())
            else:
                for chunk in _chunks(sorted(set(environments))):
                    rows.extend(conn.execute(query.where(_SS.c.environment.in_(chunk))).all())
        # Positional construction: this runs for every service of every status query.
        make = ServiceState._make
        return {(row[0], row[1]): make(row) for row in rows}

    def reset_streak(self, environment: str, service: str) -> None:
        """Forget the service's failed attempts so far (an operator asked for a retry)."""
        with self._writer.begin() as conn:
            marker = conn.execute(
                select(func.max(_D.c.id)).where(
                    _D.c.environment == environment,
                    _D.c.service == service,
                    _D.c.status.in_(_TERMINAL),
                )
            ).scalar()
            if marker is None:
                return
            refresh_service_state(conn, environment, service)  # ensures the row exists
            conn.execute(
                update(_SS)
                .where(_SS.c.environment == environment, _SS.c.service == service)
                .values(streak_reset_id=marker)
            )
            refresh_service_state(conn, environment, service)

    def rebuild_service_state(self) -> None:
        """Recompute the whole `service_state` table from the deployments (repairs)."""
        with self._writer.begin() as conn:
            resets = {
                (row.environment, row.service): row.streak_reset_id
                for row in conn.execute(
                    select(_SS.c.environment, _SS.c.service, _SS.c.streak_reset_id).where(
                        _SS.c.streak_reset_id.is_not(None)
                    )
                )
            }
            conn.execute(delete(_SS))
            rows = conn.execute(
                select(_D.c.environment, _D.c.service, *_FOLD_COLUMNS)
                .order_by(_D.c.environment, _D.c.service, _D.c.id.desc())
                .execution_options(yield_per=10_000)
            )
            batch: list[dict[str, Any]] = []
            for (environment, service), group in groupby(rows, key=lambda r: (r[0], r[1])):
                fold = ServiceFold(reset_id=resets.get((environment, service)), track_running=True)
                for row in group:
                    if not fold.done:
                        fold.feed(row[2:])
                batch.append(
                    {
                        "environment": environment,
                        "service": service,
                        "streak_reset_id": fold.reset_id,
                        **fold.values(),
                    }
                )
                if len(batch) >= 5000:
                    conn.execute(insert(_SS), batch)
                    batch = []
            rows.close()
            if batch:
                conn.execute(insert(_SS), batch)
