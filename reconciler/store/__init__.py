"""The store: SQLAlchemy models, migrations and every query (the only place with SQL)."""

from reconciler.store.db import (
    SchemaTooNew,
    check_schema,
    current_revision,
    head_revision,
    is_transient,
    make_engine,
    needs_upgrade,
    schema_current,
    upgrade,
)
from reconciler.store.drift import DriftEvent, LiveObservation
from reconciler.store.holder import DatabaseHeld, DatabaseLock, Holder
from reconciler.store.records import (
    ACTIVE_STATUSES,
    FAILURE_STATUSES,
    LOG_STREAMS,
    OPERATOR_ACTIONS,
    STATUSES,
    SYNC_RESULTS,
    SYNC_TRIGGERS,
    TERMINAL_STATUSES,
    TRIGGERS,
    CommitMeta,
    DeploymentRecord,
    EnvironmentStateRecord,
    EventRecord,
    LogLine,
    NewDeployment,
    ServiceState,
    StoreError,
    SyncRecord,
    format_time,
)
from reconciler.store.store import Store

__all__ = [
    "ACTIVE_STATUSES",
    "FAILURE_STATUSES",
    "LOG_STREAMS",
    "OPERATOR_ACTIONS",
    "STATUSES",
    "SYNC_RESULTS",
    "SYNC_TRIGGERS",
    "TERMINAL_STATUSES",
    "TRIGGERS",
    "CommitMeta",
    "DatabaseHeld",
    "DatabaseLock",
    "DeploymentRecord",
    "DriftEvent",
    "EnvironmentStateRecord",
    "EventRecord",
    "Holder",
    "LiveObservation",
    "LogLine",
    "NewDeployment",
    "SchemaTooNew",
    "ServiceState",
    "Store",
    "StoreError",
    "SyncRecord",
    "check_schema",
    "current_revision",
    "format_time",
    "head_revision",
    "is_transient",
    "make_engine",
    "needs_upgrade",
    "schema_current",
    "upgrade",
]

# Notifications (the outbox): appended.
from reconciler.store.records import (
    NOTIFICATION_STATES,
    LedgerBatch,
    LedgerEvent,
    NewNotification,
    NotificationCursorRecord,
    NotificationRecord,
)

__all__ += [
    "NOTIFICATION_STATES",
    "LedgerBatch",
    "LedgerEvent",
    "NewNotification",
    "NotificationCursorRecord",
    "NotificationRecord",
]
