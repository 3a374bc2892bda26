"""The store: SQLAlchemy models, migrations and every query (the only place with SQL).

Names load on first use (PEP 562): `from reconciler.store import STATUSES` (a CLI option's
choices) costs the plain records module, not SQLAlchemy and the models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reconciler.store.db import (
        SchemaTooNew,
        WouldWait,
        check_schema,
        current_revision,
        head_revision,
        inline,
        is_transient,
        make_engine,
        needs_upgrade,
        schema_current,
        upgrade,
    )
    from reconciler.store.drift import DriftEvent
    from reconciler.store.holder import DatabaseHeld, DatabaseLock, Holder
    from reconciler.store.records import (
        ACTIVE_STATUSES,
        FAILURE_STATUSES,
        LOG_STREAMS,
        NOTIFICATION_STATES,
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
        LedgerBatch,
        LedgerEvent,
        LiveObservation,
        LogLine,
        NewDeployment,
        NewNotification,
        NotificationCursorRecord,
        NotificationRecord,
        ServiceState,
        StatusStep,
        StoreError,
        SyncRecord,
        format_time,
    )
    from reconciler.store.store import Store
    from reconciler.store.verification import Finding, LedgerCheck, VerifyReport, verify

_WHERE = {
    "SchemaTooNew": "reconciler.store.db",
    "check_schema": "reconciler.store.db",
    "current_revision": "reconciler.store.db",
    "head_revision": "reconciler.store.db",
    "is_transient": "reconciler.store.db",
    "inline": "reconciler.store.db",
    "WouldWait": "reconciler.store.db",
    "make_engine": "reconciler.store.db",
    "needs_upgrade": "reconciler.store.db",
    "schema_current": "reconciler.store.db",
    "upgrade": "reconciler.store.db",
    "DriftEvent": "reconciler.store.drift",
    "LiveObservation": "reconciler.store.records",
    "DatabaseHeld": "reconciler.store.holder",
    "DatabaseLock": "reconciler.store.holder",
    "Holder": "reconciler.store.holder",
    "ACTIVE_STATUSES": "reconciler.store.statuses",
    "FAILURE_STATUSES": "reconciler.store.statuses",
    "LOG_STREAMS": "reconciler.store.statuses",
    "OPERATOR_ACTIONS": "reconciler.store.statuses",
    "STATUSES": "reconciler.store.statuses",
    "SYNC_RESULTS": "reconciler.store.statuses",
    "SYNC_TRIGGERS": "reconciler.store.statuses",
    "TERMINAL_STATUSES": "reconciler.store.statuses",
    "TRIGGERS": "reconciler.store.statuses",
    "CommitMeta": "reconciler.store.records",
    "StatusStep": "reconciler.store.records",
    "DeploymentRecord": "reconciler.store.records",
    "EnvironmentStateRecord": "reconciler.store.records",
    "EventRecord": "reconciler.store.records",
    "LogLine": "reconciler.store.records",
    "NewDeployment": "reconciler.store.records",
    "ServiceState": "reconciler.store.records",
    "StoreError": "reconciler.store.records",
    "SyncRecord": "reconciler.store.records",
    "format_time": "reconciler.store.records",
    "Store": "reconciler.store.store",
    "Finding": "reconciler.store.verification",
    "LedgerCheck": "reconciler.store.verification",
    "VerifyReport": "reconciler.store.verification",
    "verify": "reconciler.store.verification",
    "NOTIFICATION_STATES": "reconciler.store.records",
    "LedgerBatch": "reconciler.store.records",
    "LedgerEvent": "reconciler.store.records",
    "NewNotification": "reconciler.store.records",
    "NotificationCursorRecord": "reconciler.store.records",
    "NotificationRecord": "reconciler.store.records",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


__all__ = [
    "ACTIVE_STATUSES",
    "FAILURE_STATUSES",
    "LOG_STREAMS",
    "NOTIFICATION_STATES",
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
    "Finding",
    "Holder",
    "LedgerBatch",
    "LedgerCheck",
    "LedgerEvent",
    "LiveObservation",
    "LogLine",
    "NewDeployment",
    "NewNotification",
    "NotificationCursorRecord",
    "NotificationRecord",
    "SchemaTooNew",
    "ServiceState",
    "StatusStep",
    "Store",
    "StoreError",
    "SyncRecord",
    "VerifyReport",
    "WouldWait",
    "check_schema",
    "current_revision",
    "format_time",
    "head_revision",
    "inline",
    "is_transient",
    "make_engine",
    "needs_upgrade",
    "schema_current",
    "upgrade",
    "verify",
]
