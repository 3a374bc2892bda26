"""The tables of the reconciler's database, as SQLAlchemy Core `Table`s.

The schema itself is owned by the Alembic migrations in ``migrations/versions``; these
tables must match them (a test compares the two with Alembic's autogenerate). Core, not
the ORM: every query is written against tables, and `sqlalchemy.orm` plus declarative
classes would cost each reading command ~0.1 s of start-up for nothing (bench/bench_cli.py).
A new table is one more ``name = Table("name", metadata, ...)`` here.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)

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


metadata = MetaData(naming_convention=NAMING_CONVENTION)


syncs = Table(
    "syncs",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("trigger", String(16), nullable=False),
    Column("commit_sha", String(64)),
    Column("commit_author", String(512)),
    Column("commit_time", UTCDateTime()),
    Column("commit_subject", Text),
    Column("seen_at", UTCDateTime(), nullable=False),
    Column("ended_at", UTCDateTime()),
    Column("result", String(16)),
    Column("full_load", Boolean, default=False, nullable=False),
    Column("note", Text),
    Column("environments_changed", JSON, nullable=False),
    Column("errors", JSON, nullable=False),
    Column("error_message", Text),
    # Who signed the head (allowed_signers): key fingerprint, and principal when trusted.
    Column("signer", Text),
    Index("ix_syncs_result_id", "result", "id"),
)


deployments = Table(
    "deployments",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("environment", String(63), nullable=False),
    Column("service", String(255), nullable=False),
    Column("version", String(128), nullable=False),
    Column("previous_version", String(128)),
    Column("provider", String(255), nullable=False),
    Column("provider_type", String(64), nullable=False),
    Column("strategy", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_message", Text),
    Column("trigger", String(16), nullable=False),
    Column("commit", String(64)),
    Column("commit_author", String(512)),
    Column("attempt", Integer, nullable=False),
    Column("timeout_seconds", Integer, nullable=False),
    Column("validation", JSON),
    Column("params", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime()),
    Column("completed_at", UTCDateTime()),
    Column("sync_id", BigId, ForeignKey("syncs.id")),
    Column("rollback_of", BigId, ForeignKey("deployments.id")),
    # The run's process group and its leader's start token (boot id:start ticks), so
    # that crash recovery ends a group that outlived the daemon and nothing else.
    Column("run_pgid", Integer),
    Column("run_process", String(80)),
    Index("ix_deployments_environment_id", "environment", "id"),
    Index("ix_deployments_environment_service_id", "environment", "service", "id"),
    Index("ix_deployments_status_id", "status", "id"),
    # The history filters: each combination of equality filters has an index with those
    # columns then id (migration 0008; `history_index` in deployments.py).
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
        sqlite_where=text(UNFINISHED_SQL),  # PostgreSQL's: see postgresql_options()
    ),
)


deployment_events = Table(
    "deployment_events",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("deployment_id", BigId, ForeignKey("deployments.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("percent", Integer),
    Column("details", JSON, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Index("ix_deployment_events_deployment_id_id", "deployment_id", "id"),
)


deployment_logs = Table(
    "deployment_logs",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("deployment_id", BigId, ForeignKey("deployments.id"), nullable=False),
    Column("stream", String(8), nullable=False),
    Column("line", Text, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Index("ix_deployment_logs_deployment_id_id", "deployment_id", "id"),
)


#: Derived per-service summary; see `records.ServiceState` for the semantics.
service_state = Table(
    "service_state",
    metadata,
    Column("environment", String(63), primary_key=True),
    Column("service", String(255), primary_key=True),
    Column("deployed_version", String(128)),
    Column("deployed_deployment_id", BigId),
    Column("last_deployment_id", BigId),
    Column("last_status", String(16)),
    Column("last_version", String(128)),
    Column("last_ended_at", UTCDateTime()),
    Column("running_deployment_id", BigId),
    Column("streak_version", String(128)),
    Column("streak_count", Integer, default=0, nullable=False),
    Column("streak_last_at", UTCDateTime()),
    #: Deployments with an id up to this one no longer count in the streak
    #: (set by `Store.reset_streak`); kept across `Store.rebuild_service_state`.
    Column("streak_reset_id", BigId),
)


environment_state = Table(
    "environment_state",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("spec", JSON, nullable=False),
    Column("source_path", Text, nullable=False),
    Column("commit", String(64), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)


#: One counter per environment, raised by database triggers (migration 0011) whenever a
#: row the planner reads about it changes: its `service_state` rows, its `live_versions`
#: readings, its `operator_suspended` row, its saved `environment_state`. Triggers, not
#: the store's code, so that no write path can forget it and no deployment pays one more
#: statement for it. Stored decisions name the counts they were planned from.
environment_changes = Table(
    "environment_changes",
    metadata,
    Column("environment", String(63), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)


#: Each environment's decisions as last planned (`reconciler.stored_status`): `status`
#: serves them while ``basis`` (the change counts and plan settings they were planned
#: from) still holds and ``valid_until`` (a window's edge) has not passed.
environment_decisions = Table(
    "environment_decisions",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("basis", Text, nullable=False),
    Column("valid_until", UTCDateTime()),
    Column("decisions", Text, nullable=False),  # JSON, decoded only when served
    Column("planned_at", UTCDateTime(), nullable=False),
)


operator_actions = Table(
    "operator_actions",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("environment", String(63), nullable=False),
    Column("service", String(255)),
    Column("action", String(16), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("note", Text),
    #: From where it was asked: the control socket's peer process, the HTTP client address
    #: (migration 0009; None on rows recorded before).
    Column("origin", String(255)),
    Index("ix_operator_actions_environment_id", "environment", "id"),
)


#: Environments an operator suspended (`reconciler suspend`), until resumed.
operator_suspended = Table(
    "operator_suspended",
    metadata,
    Column("environment", String(63), primary_key=True),
    Column("since", UTCDateTime(), nullable=False),
    Column("actor", String(255), nullable=False),
)


#: How far the notifier has turned the ledger into outbox rows.
notification_cursor = Table(
    "notification_cursor",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("last_event_id", BigId, nullable=False),
    Column("last_sync_id", BigId, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)


#: One notification for one target: what to send, and how its delivery went.
#:
#: No foreign keys to deployments/syncs: the payload carries the record as it was, and
#: the outbox must never stand in the way of the ledger.
notification_outbox = Table(
    "notification_outbox",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("target", String(255), nullable=False),
    Column("event", String(16), nullable=False),
    Column("environment", String(63)),
    Column("service", String(255)),
    Column("deployment_id", BigId),
    Column("sync_id", BigId),
    Column("fingerprint", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("attempts", Integer, default=0, nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("delivered_at", UTCDateTime()),
    Column("last_error", Text),
    Column("state", String(16), nullable=False),
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


#: What the drift monitor last read from a target (reconciler/drift.py), per service.
#:
#: ``version`` None: the target could not tell (an error, nothing running) — unknown,
#: not drift. ``deployment_id`` is the service's latest deployment when it was read: a
#: reading older than the latest deployment is ignored by the planner.
live_versions = Table(
    "live_versions",
    metadata,
    Column("environment", String(63), primary_key=True),
    Column("service", String(255), primary_key=True),
    Column("version", String(128)),
    Column("deployment_id", BigId),
    Column("deployed_version", String(128)),
    Column("error", Text),
    Column("observed_at", UTCDateTime(), nullable=False),
    #: Since when the live version differs from the deployed one (None: no drift).
    Column("drifted_since", UTCDateTime()),
)


#: A service found drifted, or drifted to another live version: appended by the drift
#: monitor, read by the notifier (its cursor ``drift`` in ``notification_cursor``).
drift_events = Table(
    "drift_events",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("environment", String(63), nullable=False),
    Column("service", String(255), nullable=False),
    Column("live_version", String(128), nullable=False),
    Column("deployed_version", String(128)),
    Column("at", UTCDateTime(), nullable=False),
)


#: The process holding the database's deploy lock (one row, id 1): named in the error
#: that a second daemon on the same database stops with.
daemon_holder = Table(
    "daemon_holder",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("role", String(32), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("state_dir", Text, nullable=False),
    Column("since", UTCDateTime(), nullable=False),
)


#: A running daemon on a database shared by several (PostgreSQL): its heartbeat, in the
#: database's clock, says whether it is alive (reconciler/replicas.py).
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("state_dir", Text, nullable=False),
    Column("version", String(64), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
)


#: Which replica may deploy an environment, until when (database clock); ``generation``
#: rises at every claim and fences the holder's writes (store/fence.py).
environment_leases = Table(
    "environment_leases",
    metadata,
    Column("environment", String(63), primary_key=True),
    Column("holder", String(128), index=True),
    Column("generation", BigInteger, nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)


#: A terminal result recorded by a replica that had lost the environment's lease: kept
#: beside the deployment (whose official status stays the new holder's), never dropped.
unconfirmed_results = Table(
    "unconfirmed_results",
    metadata,
    Column("id", BigId, primary_key=True),
    Column(
        "deployment_id",
        BigId,
        ForeignKey("deployments.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("replica", String(128), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("message", Text),
    Column("error_message", Text),
    Column("at", UTCDateTime(), nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
)


#: One link of the tamper-evident ledger (`chain.py`): a fact as canonical JSON, the previous
#: entry's hash and its own SHA-256 over both. Appended, never changed.
audit_ledger = Table(
    "audit_ledger",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("ref", BigId),
    Column("at", UTCDateTime(), nullable=False),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # verify's cross-check reads each kind's entries in source-row order.
    Index("ix_audit_ledger_kind_ref_seq", "kind", "ref", "seq"),
)


def postgresql_options() -> None:
    """Give the tables their PostgreSQL-only options (the partial index's ``WHERE``).

    Called by `make_engine` for a PostgreSQL URL: declaring ``postgresql_where=`` above
    would import SQLAlchemy's whole PostgreSQL dialect (~0.05-0.1 s) in every process,
    a command reading a SQLite database included."""
    for index in deployments.indexes:
        if index.name == "ix_deployments_running":
            index.dialect_options["postgresql"]["where"] = text(UNFINISHED_SQL)
