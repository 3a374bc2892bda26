"""Plain values the store hands to callers.

Callers never see ORM objects or sessions: every query returns these frozen dataclasses.
`DeploymentRecord.to_json` is the SPEC §5 record, key order included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

# Re-exported (callers import them from here; the CLI, to stay light, from statuses).
from reconciler.store.statuses import ACTIVE_STATUSES as ACTIVE_STATUSES
from reconciler.store.statuses import FAILURE_STATUSES as FAILURE_STATUSES
from reconciler.store.statuses import LOG_STREAMS as LOG_STREAMS
from reconciler.store.statuses import OPERATOR_ACTIONS as OPERATOR_ACTIONS
from reconciler.store.statuses import STATUSES as STATUSES
from reconciler.store.statuses import SYNC_APPLIED_RESULTS as SYNC_APPLIED_RESULTS
from reconciler.store.statuses import SYNC_RESULTS as SYNC_RESULTS
from reconciler.store.statuses import SYNC_TRIGGERS as SYNC_TRIGGERS
from reconciler.store.statuses import TERMINAL_STATUSES as TERMINAL_STATUSES
from reconciler.store.statuses import TRIGGERS as TRIGGERS
from reconciler.store.statuses import Status as Status
from reconciler.store.statuses import Trigger as Trigger


class StoreError(Exception):
    """A request the store refuses (unknown id, forbidden status change, bad value)."""


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z`` suffix, seconds precision: ``2026-11-26T10:00:00Z``."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class CommitMeta:
    sha: str
    author: str | None
    time: datetime | None
    subject: str | None


@dataclass(frozen=True, slots=True)
class StatusStep:
    """One status change of a deployment, as `Store.set_statuses` writes several at once."""

    status: str
    at: datetime
    message: str | None = None
    error_message: str | None = None
    validation: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NewDeployment:
    environment: str
    service: str
    version: str
    previous_version: str | None
    provider: str
    provider_type: str
    strategy: dict[str, Any]
    trigger: str
    commit: str | None
    commit_author: str | None
    attempt: int
    timeout_seconds: int
    params: dict[str, Any]
    sync_id: int | None = None
    rollback_of: int | None = None
    #: When the deployment was planned; None means the wall clock at insert.
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    deployment_id: int
    status: str
    message: str
    percent: int | None
    details: dict[str, Any]
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "percent": self.percent,
            "details": self.details,
            "at": format_time(self.at),
        }


@dataclass(frozen=True, slots=True)
class LogLine:
    stream: str
    line: str
    at: datetime


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    id: int
    environment: str
    service: str
    version: str
    previous_version: str | None
    provider: str
    provider_type: str
    strategy: dict[str, Any]
    status: str
    error_message: str | None
    trigger: str
    commit: str | None
    commit_author: str | None
    attempt: int
    timeout_seconds: int
    validation: dict[str, Any] | None
    started_at: datetime | None
    completed_at: datetime | None
    created_at: datetime
    params: dict[str, Any]
    sync_id: int | None = None
    rollback_of: int | None = None
    progress: list[EventRecord] | None = None
    log: list[LogLine] | None = None
    # Terminal results a replica recorded after losing the environment's lease (fence.py):
    # loaded with the progress, shown when there are any.
    unconfirmed: list[dict[str, Any]] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration_seconds(self) -> float | None:
        """Run time from start to end, rounded to milliseconds; None until both are known."""
        if self.started_at is None or self.completed_at is None:
            return None
        return round((self.completed_at - self.started_at).total_seconds(), 3)

    def to_json(self) -> dict[str, Any]:
        """The SPEC §5 record, keys in the documented order.

        ``progress`` and ``log`` are added only when they were loaded
        (``Store.get_deployment(..., with_progress=True, with_log=True)``).
        """
        out: dict[str, Any] = {
            "id": self.id,
            "environment": self.environment,
            "service": self.service,
            "version": self.version,
            "previous_version": self.previous_version,
            "provider": self.provider,
            "provider_type": self.provider_type,
            "strategy": self.strategy,
            "status": self.status,
            "error_message": self.error_message,
            "trigger": self.trigger,
            "commit": self.commit,
            "commit_author": self.commit_author,
            "attempt": self.attempt,
            "timeout_seconds": self.timeout_seconds,
            "validation": self.validation,
            "started_at": format_time(self.started_at),
            "completed_at": format_time(self.completed_at),
            "duration_seconds": self.duration_seconds,
        }
        if self.progress is not None:
            out["progress"] = [event.to_json() for event in self.progress]
        if self.log is not None:
            out["log"] = "\n".join(entry.line for entry in self.log)
        if self.unconfirmed:
            out["unconfirmed"] = [{**u, "at": format_time(u["at"])} for u in self.unconfirmed]
        return out


@dataclass(frozen=True, slots=True)
class SyncRecord:
    id: int
    trigger: str
    commit_sha: str | None
    commit_author: str | None
    commit_time: datetime | None
    commit_subject: str | None
    seen_at: datetime
    ended_at: datetime | None
    result: str | None
    full_load: bool
    note: str | None
    environments_changed: list[str]
    errors: list[dict[str, Any]]
    error_message: str | None
    signer: str | None = None  # with allowed_signers: who signed the head (fingerprint)


class ServiceState(NamedTuple):
    """Derived summary of one service's deployments (kept by the store, never by callers).

    A named tuple, not a dataclass: a whole-fleet status builds 20,000 of them, and a
    frozen dataclass costs several times more to construct.

    - ``deployed_*``: the latest (by id) ``completed`` deployment, any trigger.
    - ``last_*``: the latest deployment created, whatever its status (``last_ended_at``
      is its ``completed_at``, None while it runs).
    - ``running_deployment_id``: the latest deployment not yet terminal, if any.
    - ``streak_*``: consecutive most recent failed attempts (failed, timed_out,
      rolled_back) of one version, ignoring rollback deployments, cancelled and unfinished
      ones; reset by a completed non-rollback deployment or by `Store.reset_streak`.
      ``streak_last_at`` is when the newest failure of the streak ended.
    """

    environment: str
    service: str
    deployed_version: str | None
    deployed_deployment_id: int | None
    last_deployment_id: int | None
    last_status: str | None
    last_version: str | None
    last_ended_at: datetime | None
    running_deployment_id: int | None
    streak_version: str | None
    streak_count: int
    streak_last_at: datetime | None


@dataclass(frozen=True, slots=True)
class EnvironmentStateRecord:
    name: str
    spec: dict[str, Any]
    source_path: str
    commit: str
    updated_at: datetime


class StoredDecisions(NamedTuple):
    """An environment's decisions as last planned (`reconciler.stored_status`): valid while
    ``basis`` matches what planning would read now and ``valid_until`` has not passed."""

    name: str
    basis: str
    valid_until: datetime | None
    decisions: str  # JSON text: decoded only when served


@dataclass(frozen=True, slots=True)
class OperatorActionRecord:
    id: int
    at: datetime
    environment: str
    service: str | None
    action: str
    actor: str
    note: str | None
    origin: str | None = None  # from where it was asked (None before migration 0009)


# --------------------------------------------------------------------------- notifications

#: States of a notification in the outbox: waiting to be sent (or being retried), sent
#: (a 2xx answer), kept for audit but not sent (an identical failure notice was sent
#: recently), given up after the target's `max_attempts`.
NOTIFICATION_STATES: tuple[str, ...] = ("pending", "delivered", "suppressed", "dead")


@dataclass(frozen=True, slots=True)
class NotificationCursorRecord:
    """How far the notifier has read the ledger: the last deployment event and sync seen."""

    name: str
    last_event_id: int
    last_sync_id: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """A recorded deployment event and its deployment (as it is now), read by the notifier."""

    event: EventRecord
    deployment: DeploymentRecord


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    """What the ledger holds after a notification cursor (see `Store.ledger_after`)."""

    #: Every deployment event id after the cursor, ascending (progress events included,
    #: so that the reader can tell a gap from a filtered row).
    event_ids: list[int]
    #: The events among them whose status was asked for, ascending.
    events: list[LedgerEvent]
    #: Syncs after the cursor, ascending (unfinished ones have ``result`` None).
    syncs: list[SyncRecord]


@dataclass(frozen=True, slots=True)
class NewNotification:
    target: str
    event: str
    environment: str | None
    service: str | None
    deployment_id: int | None
    sync_id: int | None
    fingerprint: str
    payload: dict[str, Any]
    #: When the ledger recorded what is notified (the suppression window is measured on it).
    occurred_at: datetime
    #: Seconds; > 0: stored ``suppressed`` when a notification of the same target with the
    #: same fingerprint, pending or delivered, occurred less than this long before.
    suppress_for: float = 0.0


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    id: int
    target: str
    event: str
    environment: str | None
    service: str | None
    deployment_id: int | None
    sync_id: int | None
    fingerprint: str
    payload: dict[str, Any]
    occurred_at: datetime
    created_at: datetime
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_error: str | None
    state: str


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


# ---- row → record mapping, shared by the SQLAlchemy store (`rows.py`) and the plain
# sqlite3 reader (`sqlite_read.py`): both hand over a mapping of column name → value
# already converted (aware datetimes, parsed JSON).


def deployment_from(
    m: Mapping[Any, Any],
    progress: list[EventRecord] | None = None,
    log: list[LogLine] | None = None,
) -> DeploymentRecord:
    return DeploymentRecord(
        id=m["id"],
        environment=m["environment"],
        service=m["service"],
        version=m["version"],
        previous_version=m["previous_version"],
        provider=m["provider"],
        provider_type=m["provider_type"],
        strategy=m["strategy"],
        status=m["status"],
        error_message=m["error_message"],
        trigger=m["trigger"],
        commit=m["commit"],
        commit_author=m["commit_author"],
        attempt=m["attempt"],
        timeout_seconds=m["timeout_seconds"],
        validation=m["validation"],
        started_at=m["started_at"],
        completed_at=m["completed_at"],
        created_at=m["created_at"],
        params=m["params"],
        sync_id=m["sync_id"],
        rollback_of=m["rollback_of"],
        progress=progress,
        log=log,
    )


def event_from(m: Mapping[Any, Any]) -> EventRecord:
    return EventRecord(
        id=m["id"],
        deployment_id=m["deployment_id"],
        status=m["status"],
        message=m["message"],
        percent=m["percent"],
        details=m["details"] if m["details"] is not None else {},
        at=m["at"],
    )


def sync_from(m: Mapping[Any, Any]) -> SyncRecord:
    return SyncRecord(
        id=m["id"],
        trigger=m["trigger"],
        commit_sha=m["commit_sha"],
        commit_author=m["commit_author"],
        commit_time=m["commit_time"],
        commit_subject=m["commit_subject"],
        seen_at=m["seen_at"],
        ended_at=m["ended_at"],
        result=m["result"],
        full_load=bool(m["full_load"]),
        note=m["note"],
        environments_changed=list(m["environments_changed"] or []),
        errors=list(m["errors"] or []),
        error_message=m["error_message"],
        signer=m["signer"],
    )


def environment_state_from(m: Mapping[Any, Any]) -> EnvironmentStateRecord:
    return EnvironmentStateRecord(
        name=m["name"],
        spec=m["spec"],
        source_path=m["source_path"],
        commit=m["commit"],
        updated_at=m["updated_at"],
    )


def service_states_from_text(
    fetched: Iterable[Sequence[Any]],
) -> dict[tuple[str, str], ServiceState]:
    """`ServiceState`s from service_state rows as SQLite's driver returns them (times as
    naive UTC text, models.UTCDateTime), made aware in one parse each. Unpacked by
    position (the column order is ServiceState's fields); `x and f(x)` keeps None."""
    new, make, iso = tuple.__new__, ServiceState, datetime.fromisoformat
    states: dict[tuple[str, str], ServiceState] = {}
    for e, s, dv, dd, li, ls, lv, ended, ri, sv, sc, sa in fetched:
        ended = ended and iso(ended + "+00:00")
        sa = sa and iso(sa + "+00:00")
        states[e, s] = new(make, (e, s, dv, dd, li, ls, lv, ended, ri, sv, sc, sa))
    return states
