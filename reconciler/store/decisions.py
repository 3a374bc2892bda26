"""The stored-decision queries: `environment_decisions` and the change counters the
database's triggers keep in `environment_changes` (migration 0011).

A mixin of `Store`. The sqlite3 reader (`sqlite_read.py`) runs the same statements.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime

from sqlalchemy import Engine, bindparam, delete, select

from reconciler.store import models, rows
from reconciler.store.records import (
    EnvironmentStateRecord,
    StoredDecisions,
    environment_state_from,
)

_C = models.environment_changes
_SD = models.environment_decisions
_ENV = models.environment_state

#: Every environment's change count (a missing row is 0: nothing changed since 0011).
ENVIRONMENT_CHANGES = select(_C.c.environment, _C.c.seq)
#: Every environment's stored decisions, still encoded.
STORED_DECISIONS = select(_SD.c.name, _SD.c.basis, _SD.c.valid_until, _SD.c.decisions)
#: The environments with a saved desired state, in the order status lists them.
ENVIRONMENT_NAMES = select(_ENV.c.name).order_by(_ENV.c.name)
#: The saved desired state of some environments (those planned again).
ENVIRONMENT_STATES_IN = (
    select(_ENV).where(_ENV.c.name.in_(bindparam("names", expanding=True))).order_by(_ENV.c.name)
)


class DecisionQueries:
    """Stored decisions and environment change counts (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def environment_changes(self) -> dict[str, int]:
        with rows.reader(self.engine) as conn:
            return {env: int(seq) for env, seq in conn.execute(ENVIRONMENT_CHANGES)}

    def stored_decisions(self) -> dict[str, StoredDecisions]:
        with rows.reader(self.engine) as conn:
            return {
                row[0]: StoredDecisions(row[0], row[1], row[2], row[3])
                for row in conn.execute(STORED_DECISIONS)
            }

    def environment_names(self) -> list[str]:
        with rows.reader(self.engine) as conn:
            return list(conn.scalars(ENVIRONMENT_NAMES))

    def environment_states_of(self, names: Collection[str]) -> dict[str, EnvironmentStateRecord]:
        found: dict[str, EnvironmentStateRecord] = {}
        with rows.reader(self.engine) as conn:
            for chunk in rows.chunks(sorted(set(names))):
                for row in conn.execute(ENVIRONMENT_STATES_IN, {"names": list(chunk)}):
                    found[row.name] = environment_state_from(row._mapping)
        return dict(sorted(found.items()))

    def save_decisions(
        self, stored: Iterable[StoredDecisions], *, at: datetime, forget: Collection[str] = ()
    ) -> None:
        """Store (replace) environments' decisions, and drop those of ``forget``, in one
        transaction (one executemany per statement)."""
        when = rows.aware(at, "at")
        values = [
            {
                "name": s.name,
                "basis": s.basis,
                "valid_until": s.valid_until,
                "decisions": s.decisions,
                "planned_at": when,
            }
            for s in stored
        ]
        if not values and not forget:
            return
        with self._writer.begin() as conn:
            for chunk in rows.chunks(sorted(forget)):
                conn.execute(delete(_SD).where(_SD.c.name.in_(chunk)))
            if values:
                from sqlalchemy.dialects import postgresql, sqlite  # here: see rows.insert_ignore

                insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
                stmt = insert_(_SD)
                changes = {c: stmt.excluded[c] for c in ("basis", "valid_until", "decisions")}
                changes["planned_at"] = stmt.excluded.planned_at
                conn.execute(
                    stmt.on_conflict_do_update(index_elements=["name"], set_=changes), values
                )
