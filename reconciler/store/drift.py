"""The drift queries: live versions read from the targets (reconciler/drift.py).

A mixin of `Store`. One row per service, replaced at each reading; the planner reads
them with the ledger (`Engine.recorded`), so `status` shows drift whether it runs in the
daemon or as a standalone command.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from reconciler.store.models import Base, LiveVersionRow
from reconciler.store.records import StoreError

_L: Table = Base.metadata.tables[LiveVersionRow.__tablename__]
_CHUNK = 300


@dataclass(frozen=True)
class LiveObservation:
    environment: str
    service: str
    version: str | None  # None: unknown (the provider could not tell, or failed)
    deployment_id: int | None  # the service's latest deployment when read
    deployed_version: str | None  # the ledger's deployed version when read
    observed_at: datetime
    error: str | None = None
    drifted_since: datetime | None = None

    @property
    def drifted(self) -> bool:
        return (
            self.version is not None
            and self.deployed_version is not None
            and self.version != self.deployed_version
        )


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


class DriftQueries:
    engine: Engine
    _writer: Engine

    def save_live_versions(self, observations: Sequence[LiveObservation]) -> None:
        """Replace the rows of these services (one transaction)."""
        if not observations:
            return
        rows: list[dict[str, Any]] = []
        for obs in observations:
            if obs.observed_at.tzinfo is None:
                raise StoreError("observed_at must be a timezone-aware datetime")
            rows.append({name: getattr(obs, name) for name in _COLUMNS})
        keys = ["environment", "service"]
        with self._writer.begin() as conn:
            for chunk in (rows[i : i + _CHUNK] for i in range(0, len(rows), _CHUNK)):
                if conn.dialect.name == "postgresql":
                    pg = postgresql.insert(_L).values(chunk)
                    set_ = {c: pg.excluded[c] for c in _COLUMNS if c not in keys}
                    conn.execute(pg.on_conflict_do_update(index_elements=keys, set_=set_))
                else:
                    lite = sqlite.insert(_L).values(chunk)
                    set_ = {c: lite.excluded[c] for c in _COLUMNS if c not in keys}
                    conn.execute(lite.on_conflict_do_update(index_elements=keys, set_=set_))

    def live_versions(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], LiveObservation]:
        query = select(*(_L.c[name] for name in _COLUMNS))
        rows: list[Any] = []
        with self.engine.connect() as conn:
            if environments is None:
                rows = list(conn.execute(query))
            else:
                envs = sorted(set(environments))
                for i in range(0, len(envs), _CHUNK):
                    chunk = envs[i : i + _CHUNK]
                    rows.extend(conn.execute(query.where(_L.c.environment.in_(chunk))))
        return {(row[0], row[1]): LiveObservation(*row) for row in rows}
