"""SQLAlchemy models of the reconciler's database.

The schema itself is owned by the Alembic migrations in ``migrations/versions``; these
models must match them (a test compares the two with Alembic's autogenerate).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reconciler.store.records import ACTIVE_STATUSES

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: A deployment not finished yet, as SQL: the condition of the partial index
#: ix_deployments_running, and of the query that uses it (written the same way: SQLite uses
#: a partial index only when the query repeats its condition).
UNFINISHED_SQL = "status IN (" + ", ".join(f"'{s}'" for s in sorted(ACTIVE_STATUSES)) + ")"

#: 64-bit ids on PostgreSQL; on SQLite an INTEGER PRIMARY KEY is the (64-bit) rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime.

    Stored as ``timestamp with time zone`` on PostgreSQL and as naive UTC text on SQLite;
    always returned aware, in UTC. Naive datetimes are refused when binding.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware times")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Sync(Base):
    __tablename__ = "syncs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))
    commit_sha: Mapped[str | None] = mapped_column(String(64))
    commit_author: Mapped[str | None] = mapped_column(String(512))
    commit_time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    commit_subject: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result: Mapped[str | None] = mapped_column(String(16))
    full_load: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str | None] = mapped_column(Text)
    environments_changed: Mapped[list[str]] = mapped_column(JSON)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    error_message: Mapped[str | None] = mapped_column(Text)
    # Who signed the head (allowed_signers): key fingerprint, and principal when trusted.
    signer: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_syncs_result_id", "result", "id"),)


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    environment: Mapped[str] = mapped_column(String(63))
    service: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(128))
    previous_version: Mapped[str | None] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(255))
    provider_type: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    error_message: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(String(16))
    commit: Mapped[str | None] = mapped_column(String(64))
    commit_author: Mapped[str | None] = mapped_column(String(512))
    attempt: Mapped[int] = mapped_column(Integer)
    timeout_seconds: Mapped[int] = mapped_column(Integer)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sync_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("syncs.id"))
    rollback_of: Mapped[int | None] = mapped_column(BigId, ForeignKey("deployments.id"))
    # The run's process group and its leader's start token (boot id:start ticks), so
    # that crash recovery ends a group that outlived the daemon and nothing else.
    run_pgid: Mapped[int | None] = mapped_column(Integer)
    run_process: Mapped[str | None] = mapped_column(String(80))

    __table_args__ = (
        Index("ix_deployments_environment_id", "environment", "id"),
        Index("ix_deployments_environment_service_id", "environment", "service", "id"),
        Index("ix_deployments_status_id", "status", "id"),
        # The history filters: each combination of equality filters has an index with
        # those columns then id (migration 0008; `history_index` in deployments.py).
        Index("ix_deployments_service_id", "service", "id"),
        Index("ix_deployments_status_environment_id", "status", "environment", "id"),
        Index("ix_deployments_status_service_id", "status", "service", "id"),
        # completed_versions (depends_on) and previous-version lookups.
        Index(
            "ix_deployments_environment_service_version_status",
            "environment",
            "service",
            "version",
            "status",
        ),
        Index("ix_deployments_created_at", "created_at"),
        Index("ix_deployments_sync_id", "sync_id"),
        Index("ix_deployments_rollback_of", "rollback_of"),
        # The running look-up of every status write: unfinished deployments only
        # (migration 0006).
        Index(
            "ix_deployments_running",
            "environment",
            "service",
            "id",
            sqlite_where=text(UNFINISHED_SQL),
            postgresql_where=text(UNFINISHED_SQL),
        ),
    )


class DeploymentEvent(Base):
    __tablename__ = "deployment_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(BigId, ForeignKey("deployments.id"))
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    percent: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_deployment_events_deployment_id_id", "deployment_id", "id"),)


class DeploymentLog(Base):
    __tablename__ = "deployment_logs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(BigId, ForeignKey("deployments.id"))
    stream: Mapped[str] = mapped_column(String(8))
    line: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_deployment_logs_deployment_id_id", "deployment_id", "id"),)


class ServiceStateRow(Base):
    """Derived per-service summary; see `records.ServiceState` for the semantics."""

    __tablename__ = "service_state"

    environment: Mapped[str] = mapped_column(String(63), primary_key=True)
    service: Mapped[str] = mapped_column(String(255), primary_key=True)
    deployed_version: Mapped[str | None] = mapped_column(String(128))
    deployed_deployment_id: Mapped[int | None] = mapped_column(BigId)
    last_deployment_id: Mapped[int | None] = mapped_column(BigId)
    last_status: Mapped[str | None] = mapped_column(String(16))
    last_version: Mapped[str | None] = mapped_column(String(128))
    last_ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    running_deployment_id: Mapped[int | None] = mapped_column(BigId)
    streak_version: Mapped[str | None] = mapped_column(String(128))
    streak_count: Mapped[int] = mapped_column(Integer, default=0)
    streak_last_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Deployments with an id up to this one no longer count in the streak
    #: (set by `Store.reset_streak`); kept across `Store.rebuild_service_state`.
    streak_reset_id: Mapped[int | None] = mapped_column(BigId)


class EnvironmentState(Base):
    __tablename__ = "environment_state"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    source_path: Mapped[str] = mapped_column(Text)
    commit: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OperatorAction(Base):
    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    environment: Mapped[str] = mapped_column(String(63))
    service: Mapped[str | None] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(255))
    note: Mapped[str | None] = mapped_column(Text)
    #: From where it was asked: the control socket's peer process, the HTTP client address
    #: (migration 0007; None on rows recorded before).
    origin: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (Index("ix_operator_actions_environment_id", "environment", "id"),)


class OperatorSuspended(Base):
    """Environments an operator suspended (`reconciler suspend`), until resumed."""

    __tablename__ = "operator_suspended"

    environment: Mapped[str] = mapped_column(String(63), primary_key=True)
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(255))


class NotificationCursor(Base):
    """How far the notifier has turned the ledger into outbox rows."""

    __tablename__ = "notification_cursor"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(BigId)
    last_sync_id: Mapped[int] = mapped_column(BigId)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class NotificationOutbox(Base):
    """One notification for one target: what to send, and how its delivery went.

    No foreign keys to deployments/syncs: the payload carries the record as it was, and
    the outbox must never stand in the way of the ledger.
    """

    __tablename__ = "notification_outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    target: Mapped[str] = mapped_column(String(255))
    event: Mapped[str] = mapped_column(String(16))
    environment: Mapped[str | None] = mapped_column(String(63))
    service: Mapped[str | None] = mapped_column(String(255))
    deployment_id: Mapped[int | None] = mapped_column(BigId)
    sync_id: Mapped[int | None] = mapped_column(BigId)
    fingerprint: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))

    __table_args__ = (
        # The delivery worker: a target's due pending rows (and the backlog gauges).
        Index(
            "ix_notification_outbox_state_target_next_attempt_at",
            "state",
            "target",
            "next_attempt_at",
        ),
        # Suppression: the same notice for the same target, recently.
        Index(
            "ix_notification_outbox_target_fingerprint_occurred_at",
            "target",
            "fingerprint",
            "occurred_at",
        ),
    )


class LiveVersionRow(Base):
    """What the drift monitor last read from a target (reconciler/drift.py), per service.

    ``version`` None: the target could not tell (an error, nothing running) — unknown,
    not drift. ``deployment_id`` is the service's latest deployment when it was read: a
    reading older than the latest deployment is ignored by the planner.
    """

    __tablename__ = "live_versions"

    environment: Mapped[str] = mapped_column(String(63), primary_key=True)
    service: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[str | None] = mapped_column(String(128))
    deployment_id: Mapped[int | None] = mapped_column(BigId)
    deployed_version: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    observed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Since when the live version differs from the deployed one (None: no drift).
    drifted_since: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DriftEventRow(Base):
    """A service found drifted, or drifted to another live version: appended by the drift
    monitor, read by the notifier (its cursor ``drift`` in ``notification_cursor``)."""

    __tablename__ = "drift_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    environment: Mapped[str] = mapped_column(String(63))
    service: Mapped[str] = mapped_column(String(255))
    live_version: Mapped[str] = mapped_column(String(128))
    deployed_version: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class DaemonHolder(Base):
    """The process holding the database's deploy lock (one row, id 1): named in the error
    that a second daemon on the same database stops with."""

    __tablename__ = "daemon_holder"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    state_dir: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """One link of the tamper-evident ledger (`chain.py`): a fact as canonical JSON, the
    previous entry's hash and its own SHA-256 over both. Appended, never changed."""

    __tablename__ = "audit_ledger"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[int | None] = mapped_column(BigId)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    # verify's cross-check reads each kind's entries in source-row order.
    __table_args__ = (Index("ix_audit_ledger_kind_ref_seq", "kind", "ref", "seq"),)
