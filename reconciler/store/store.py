"""`Store`: every read and write of the reconciler's records, one class.

Each public method runs in its own short transaction and returns plain records
(`reconciler.store.records`), so a `Store` can be shared by threads (the engine's pool
gives each call its own connection; callers use ``asyncio.to_thread``).

The queries live in one mixin per table or job, all mixed in here: `syncs.py`,
`deployments.py` (with `service_state.py`, the derived per-service row it keeps up to
date), `deployment_logs.py`, `environments.py`, `outbox.py`, `drift.py`, `export.py` (the audit
export), `blame.py`, `ledger.py` (the audit ledger's head and retention; its entries are
appended by the others through `chain.py`). They share
helpers only through `rows.py`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from sqlalchemy import Engine, literal, select

from reconciler.store.blame import BlameQueries
from reconciler.store.db import (
    HEAD_REVISION,
    SQLiteFile,
    check_schema,
    current_revision,
    make_engine,
    upgrade,
    write_engine,
)
from reconciler.store.decisions import DecisionQueries
from reconciler.store.deployment_logs import LogQueries
from reconciler.store.deployments import DeploymentQueries
from reconciler.store.drift import DriftQueries
from reconciler.store.environments import EnvironmentQueries
from reconciler.store.export import ExportQueries
from reconciler.store.leases import LeaseQueries
from reconciler.store.ledger import LedgerQueries
from reconciler.store.outbox import OutboxQueries
from reconciler.store.records import StoreError
from reconciler.store.rows import pinned_reads
from reconciler.store.service_state import ServiceStateQueries
from reconciler.store.syncs import SyncQueries


class Store(
    SyncQueries,
    DeploymentQueries,
    ServiceStateQueries,
    LogQueries,
    EnvironmentQueries,
    OutboxQueries,
    DriftQueries,
    ExportQueries,
    BlameQueries,
    LedgerQueries,
    LeaseQueries,
    DecisionQueries,
):
    """All reads and writes of the reconciler's records."""

    engine: Engine

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = write_engine(engine)
        self._file = SQLiteFile.of(engine)

    def reading(self) -> AbstractContextManager[None]:
        """The reads made by this thread inside the block (those the planner makes before
        every deployment: service states, completed versions, live versions, suspensions)
        share one connection and transaction: one consistent view, one checkout."""
        return pinned_reads(self.engine)

    @classmethod
    def from_url(cls, url: str, *, migrate: bool = True) -> Store:
        engine = make_engine(url)
        if migrate:
            upgrade(engine)
        return cls(engine)

    @classmethod
    def for_reading(cls, url: str) -> Store:
        """The store for a command that only reads (`history`, `show`, `status`): it creates
        a new database, but never upgrades an existing one behind the operator's back (that
        is `db upgrade`'s or the daemon's job). A database at this release's head is
        recognised without importing Alembic (most of a reading command's start-up)."""
        engine = make_engine(url)
        current = current_revision(engine)
        if current is None:
            upgrade(engine)
        elif current != HEAD_REVISION:
            try:
                check_schema(engine)  # a newer release's database says so
            finally:
                engine.dispose()
            raise StoreError(
                f"the database is at schema revision {current} and this reconciler needs "
                f"{HEAD_REVISION}: run `reconciler db upgrade` (the daemon does it at start)"
            )
        return cls(engine)

    def ping(self) -> None:
        """Raise if the database does not answer, or is no longer the file it was (a
        SQLite file deleted or replaced underneath: readiness checks)."""
        problem = self.file_problem()
        if problem is not None:
            raise StoreError(problem)
        with self.engine.connect() as conn:
            conn.execute(select(literal(1))).scalar_one()

    def file_problem(self) -> str | None:
        """Why the SQLite file written to is not the database any more (deleted or replaced
        under the process), or None; always None on PostgreSQL. One ``stat``: cheap."""
        return self._file.problem() if self._file is not None else None

    def close(self) -> None:
        """Close the pooled connections (the store can still be used afterwards)."""
        self.engine.dispose()
