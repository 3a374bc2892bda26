"""The environment queries: the last valid desired state applied per environment, and
what operators did (`operator_actions`, with suspension in `operator_suspended`).

A mixin of `Store`.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select

from reconciler.store import chain, models, notices, rows
from reconciler.store.fast import Fast
from reconciler.store.records import (
    OPERATOR_ACTIONS,
    EnvironmentStateRecord,
    environment_state_from,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_aware = rows.aware
_check = rows.check
_chunks = rows.chunks
_reader = rows.reader
_insert_ignore = rows.insert_ignore
_upsert = rows.upsert

_ENV = models.environment_state
SAVE_BATCH = 100  # environment states per statement of save_environment_states
_OA = models.operator_actions
_OS = models.operator_suspended
_SUSPENDED = select(_OS.c.environment)  # built once: read before every deployment
SUSPENDED = _SUSPENDED
_FAST_SUSPENDED = Fast(_SUSPENDED)  # driver-run on SQLite (fast.py)
#: Every environment's saved desired state (`environment_states`).
ENVIRONMENT_STATES = select(_ENV).order_by(_ENV.c.name)
#: Each suspended environment with the note of its latest `suspend` action.
_LATEST_SUSPEND = (
    select(_OA.c.environment, func.max(_OA.c.id).label("id"))
    .where(_OA.c.action == "suspend")
    .group_by(_OA.c.environment)
    .subquery()
)
SUSPENSION_REASONS = (
    select(_OS.c.environment, _OA.c.note)
    .select_from(_OS)
    .outerjoin(_LATEST_SUSPEND, _LATEST_SUSPEND.c.environment == _OS.c.environment)
    .outerjoin(_OA, _OA.c.id == _LATEST_SUSPEND.c.id)
)


class EnvironmentQueries:
    """Environment state, operator action and suspension queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def save_environment_state(
        self, name: str, *, spec: dict[str, Any], source_path: str, commit: str, at: datetime
    ) -> None:
        """Remember the last valid desired state applied for an environment."""
        with self._writer.begin() as conn:
            _upsert(
                conn,
                _ENV,
                {
                    "name": name,
                    "spec": dict(spec),
                    "source_path": source_path,
                    "commit": commit,
                    "updated_at": _aware(at, "at"),
                },
                ["name"],
            )

    def save_environment_states(
        self, states: Iterable[tuple[str, dict[str, Any], str]], *, commit: str, at: datetime
    ) -> None:
        """Several `(name, spec, source_path)` at once, in one transaction (a full load).

        ``states`` is consumed ``SAVE_BATCH`` at a time (one executemany each): a whole
        fleet's specs, dumped and encoded at once, grew the daemon's heap by 15 MB for good
        (1,000 environments x 20 services)."""
        when = _aware(at, "at")
        pending = iter(states)
        batch = list(itertools.islice(pending, SAVE_BATCH))
        if not batch:
            return
        with self._writer.begin() as conn:
            from sqlalchemy.dialects import postgresql, sqlite  # here: see rows.insert_ignore

            insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert_(_ENV)
            changes = {c: stmt.excluded[c] for c in ("spec", "source_path", "commit", "updated_at")}
            upsert = stmt.on_conflict_do_update(index_elements=["name"], set_=changes)
            while batch:
                rows = [
                    {
                        "name": n,
                        "spec": dict(spec),
                        "source_path": p,
                        "commit": commit,
                        "updated_at": when,
                    }
                    for n, spec, p in batch
                ]
                conn.execute(upsert, rows)  # one statement, many rows (executemany)
                batch = list(itertools.islice(pending, SAVE_BATCH))

    def environment_states(self) -> dict[str, EnvironmentStateRecord]:
        with self.engine.connect() as conn:
            return {
                row.name: environment_state_from(row._mapping)
                for row in conn.execute(ENVIRONMENT_STATES)
            }

    def environment_state_names(self) -> set[str]:
        """The environments with a saved state (without reading 1,000 specs to know)."""
        with self.engine.connect() as conn:
            return set(conn.scalars(select(_ENV.c.name)))

    def forget_environment_states(self, names: Collection[str]) -> None:
        """Drop the saved desired state of environments that left the repository, so that
        falling back on the saved states never brings them back."""
        if not names:
            return
        with self._writer.begin() as conn:
            for chunk in _chunks(sorted(names)):
                conn.execute(delete(_ENV).where(_ENV.c.name.in_(chunk)))

    def record_operator_action(
        self,
        *,
        environment: str,
        service: str | None,
        action: str,
        actor: str,
        note: str | None,
        at: datetime,
        origin: str | None = None,
    ) -> None:
        """Record what an operator did (``origin``: from where it was asked), and chain it
        into the audit ledger; ``suspend``/``resume`` also (un)suspend the environment."""
        _check(action, OPERATOR_ACTIONS, "operator action")
        _aware(at, "at")
        with self._writer.begin() as conn:
            action_id = conn.execute(
                insert(_OA)
                .values(
                    at=at,
                    environment=environment,
                    service=service,
                    action=action,
                    actor=actor,
                    note=note,
                    origin=origin,
                )
                .returning(_OA.c.id)
            ).scalar_one()
            chain.record_operator_action(conn, int(action_id))
            if action == "suspend":
                _insert_ignore(
                    conn,
                    _OS,
                    {"environment": environment, "since": at, "actor": actor},
                    ["environment"],
                )
            elif action == "resume":
                conn.execute(delete(_OS).where(_OS.c.environment == environment))
            if action in ("suspend", "resume", "retry", "sync"):
                # The replica that holds it (maybe another) plans it again; "*": every one.
                notices.notify(conn, "env", environment)

    def suspended_environments(self) -> set[str]:
        with _reader(self.engine) as conn:
            return {row["environment"] for row in _FAST_SUSPENDED.rows(conn)}

    def suspension_reasons(self) -> dict[str, str | None]:
        """Each environment an operator suspended: the reason given (`suspend --reason`,
        the note of the latest `suspend` action there), None when none was given."""
        with self.engine.connect() as conn:
            return {env: note for env, note in conn.execute(SUSPENSION_REASONS).all()}
