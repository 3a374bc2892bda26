"""The drift queries: live versions read from the targets (reconciler/drift.py).

A mixin of `Store`. `live_versions` has one row per service, replaced at each reading; the
planner reads them with the ledger (`Engine.recorded`), so `status` shows drift whether it
runs in the daemon or as a standalone command. `drift_events` is appended to, in the same
transaction, when a service is found drifted (or drifted to another version): the notifier
reads it after its cursor ``drift`` (a row of ``notification_cursor`` whose
``last_event_id`` counts drift events) and sends `drifted` notices.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, bindparam, func, insert, select

from reconciler.store import models
from reconciler.store.fast import Fast
from reconciler.store.records import LiveObservation as LiveObservation
from reconciler.store.records import NotificationCursorRecord, StoreError
from reconciler.store.rows import chunks, insert_ignore, reader

_L: Table = models.live_versions
_DE: Table = models.drift_events
_NC: Table = models.notification_cursor
_CHUNK = 300


@dataclass(frozen=True)
class DriftEvent:
    """A service found drifted (or drifted to another live version)."""

    environment: str
    service: str
    live_version: str
    deployed_version: str | None
    at: datetime
    id: int = 0  # set when read back


_COLUMNS = (
    "environment",
    "service",
    "version",
    "deployment_id",
    "deployed_version",
    "observed_at",
    "error",
    "drifted_since",
)


# Built once: the planner reads an environment's live versions before every deployment.
LIVE = _LIVE = select(*(_L.c[name] for name in _COLUMNS))
LIVE_IN = _LIVE_IN = _LIVE.where(_L.c.environment.in_(bindparam("envs", expanding=True)))
# One environment's, read before each of its deployments (driver-run on SQLite: fast.py).
_LIVE_ONE = Fast(_LIVE.where(_L.c.environment == bindparam("env")))


class DriftQueries:
    engine: Engine
    _writer: Engine

    def save_live_versions(
        self, observations: Sequence[LiveObservation], events: Sequence[DriftEvent] = ()
    ) -> None:
        """Replace the rows of these services and append `events` (one transaction)."""
        if not observations and not events:
            return
        rows: list[dict[str, Any]] = []
        for obs in observations:
            if obs.observed_at.tzinfo is None:
                raise StoreError("observed_at must be a timezone-aware datetime")
            rows.append({name: getattr(obs, name) for name in _COLUMNS})
        keys = ["environment", "service"]
        with self._writer.begin() as conn:
            from sqlalchemy.dialects import postgresql, sqlite  # here: see rows.insert_ignore

            for chunk in chunks(rows, _CHUNK):
                if conn.dialect.name == "postgresql":
                    pg = postgresql.insert(_L).values(chunk)
                    set_ = {c: pg.excluded[c] for c in _COLUMNS if c not in keys}
                    conn.execute(pg.on_conflict_do_update(index_elements=keys, set_=set_))
                else:
                    lite = sqlite.insert(_L).values(chunk)
                    set_ = {c: lite.excluded[c] for c in _COLUMNS if c not in keys}
                    conn.execute(lite.on_conflict_do_update(index_elements=keys, set_=set_))
            for event in events:
                if event.at.tzinfo is None:
                    raise StoreError("a drift event needs a timezone-aware time")
                conn.execute(
                    insert(_DE).values(
                        environment=event.environment,
                        service=event.service,
                        live_version=event.live_version,
                        deployed_version=event.deployed_version,
                        at=event.at,
                    )
                )

    def live_versions(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], LiveObservation]:
        rows: list[Any] = []
        with reader(self.engine) as conn:
            if environments is None:
                rows = list(conn.execute(_LIVE))
            else:
                envs = sorted(set(environments))
                if len(envs) == 1:
                    found = [r._tuple for r in _LIVE_ONE.rows(conn, {"env": envs[0]})]
                    return {(t[0], t[1]): LiveObservation(*t) for t in found}
                for i in range(0, len(envs), _CHUNK):
                    chunk = envs[i : i + _CHUNK]
                    rows.extend(conn.execute(_LIVE_IN, {"envs": chunk}))
        return {(row[0], row[1]): LiveObservation(*row) for row in rows}

    def drift_events_after(self, after_id: int, limit: int = 500) -> list[DriftEvent]:
        query = select(_DE).where(_DE.c.id > after_id).order_by(_DE.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [
                DriftEvent(
                    environment=row.environment,
                    service=row.service,
                    live_version=row.live_version,
                    deployed_version=row.deployed_version,
                    at=row.at,
                    id=row.id,
                )
                for row in conn.execute(query)
            ]

    def start_drift_cursor(self, name: str, *, at: datetime) -> NotificationCursorRecord:
        """The notifier's cursor over `drift_events`, created at their current end if new
        (a first start does not notify old drift). ``last_sync_id`` stays 0."""
        if at.tzinfo is None:
            raise StoreError("at must be a timezone-aware datetime")
        with self._writer.begin() as conn:
            last = conn.execute(select(func.max(_DE.c.id))).scalar() or 0
            insert_ignore(
                conn,
                _NC,
                {"name": name, "last_event_id": last, "last_sync_id": 0, "updated_at": at},
                ["name"],
            )
            row = conn.execute(select(_NC).where(_NC.c.name == name)).one()
            return NotificationCursorRecord(
                name=row.name,
                last_event_id=row.last_event_id,
                last_sync_id=row.last_sync_id,
                updated_at=row.updated_at,
            )
