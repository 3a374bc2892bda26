"""The notification queries: the notifier's cursor over the ledger and the outbox.

A mixin of `Store`. The notifier reads the ledger after its cursor (`ledger_after`),
decides what to send, and then in ONE transaction inserts the outbox rows and moves the
cursor (`enqueue_notifications`, a compare-and-set on the cursor, so that a notice is
derived once). Delivery claims one due row at a time (`claim_next_notification`: a lease
on ``next_attempt_at``), sends it outside any transaction, and records the outcome
(`notification_delivered` / `notification_failed`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, insert, select, update

from reconciler.store import models, rows
from reconciler.store.records import (
    NOTIFICATION_STATES,
    LedgerBatch,
    LedgerEvent,
    NewNotification,
    NotificationCursorRecord,
    NotificationRecord,
    StoreError,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_CHUNK = rows.CHUNK
_aware = rows.aware
_deployment = rows.deployment_record
_event = rows.event_record
_insert_ignore = rows.insert_ignore
_sync = rows.sync_record

_D = models.deployments
_E = models.deployment_events
_S = models.syncs
_NC = models.notification_cursor
_O = models.notification_outbox

#: States that make an identical failure notice redundant (see `NewNotification`).
_SUPPRESSING = ("pending", "delivered")


def _cursor(row: Row[Any]) -> NotificationCursorRecord:
    m = row._mapping
    return NotificationCursorRecord(
        name=m["name"],
        last_event_id=m["last_event_id"],
        last_sync_id=m["last_sync_id"],
        updated_at=m["updated_at"],
    )


def _notification(row: Row[Any]) -> NotificationRecord:
    m = row._mapping
    return NotificationRecord(
        id=m["id"],
        target=m["target"],
        event=m["event"],
        environment=m["environment"],
        service=m["service"],
        deployment_id=m["deployment_id"],
        sync_id=m["sync_id"],
        fingerprint=m["fingerprint"],
        payload=m["payload"],
        occurred_at=m["occurred_at"],
        created_at=m["created_at"],
        attempts=m["attempts"],
        next_attempt_at=m["next_attempt_at"],
        delivered_at=m["delivered_at"],
        last_error=m["last_error"],
        state=m["state"],
    )


class OutboxQueries:
    """Notification cursor and outbox queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    # ------------------------------------------------------------------ the cursor

    def notification_cursor(self, name: str) -> NotificationCursorRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_NC).where(_NC.c.name == name)).one_or_none()
            return None if row is None else _cursor(row)

    def start_notification_cursor(self, name: str, *, at: datetime) -> NotificationCursorRecord:
        """The cursor ``name``, created at the current end of the ledger if it is new (a
        first start does not notify the whole history). An unfinished sync at the end is
        left ahead of the cursor, so that its outcome is still seen."""
        _aware(at, "at")
        with self._writer.begin() as conn:
            last_event = conn.execute(select(func.max(_E.c.id))).scalar() or 0
            last_sync = (
                conn.execute(select(func.max(_S.c.id)).where(_S.c.result.is_not(None))).scalar()
                or 0
            )
            _insert_ignore(
                conn,
                _NC,
                {
                    "name": name,
                    "last_event_id": last_event,
                    "last_sync_id": last_sync,
                    "updated_at": at,
                },
                ["name"],
            )
            return _cursor(conn.execute(select(_NC).where(_NC.c.name == name)).one())

    def ledger_after(
        self,
        *,
        after_event_id: int,
        after_sync_id: int,
        statuses: Collection[str],
        limit: int = 500,
    ) -> LedgerBatch:
        """Up to ``limit`` deployment events and ``limit`` syncs after the given ids.

        All event ids are returned (to tell a gap from a filtered row); the events whose
        status is in ``statuses`` come with their deployment record.
        """
        wanted_statuses = set(statuses)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_E.c.id, _E.c.status)
                .where(_E.c.id > after_event_id)
                .order_by(_E.c.id)
                .limit(limit)
            ).all()
            event_ids = [row[0] for row in rows]
            wanted = [row[0] for row in rows if row[1] in wanted_statuses]
            events: list[LedgerEvent] = []
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                found = [_event(row) for row in conn.execute(select(_E).where(_E.c.id.in_(chunk)))]
                ids = sorted({event.deployment_id for event in found})
                deployments = {
                    row.id: _deployment(row)
                    for row in conn.execute(select(_D).where(_D.c.id.in_(ids)))
                }
                events.extend(
                    LedgerEvent(event=event, deployment=deployments[event.deployment_id])
                    for event in sorted(found, key=lambda e: e.id)
                )
            syncs = [
                _sync(row)
                for row in conn.execute(
                    select(_S).where(_S.c.id > after_sync_id).order_by(_S.c.id).limit(limit)
                )
            ]
            return LedgerBatch(event_ids=event_ids, events=events, syncs=syncs)

    def enqueue_notifications(
        self,
        name: str,
        *,
        expected: tuple[int, int],
        advance_to: tuple[int, int],
        notifications: Sequence[NewNotification],
        now: datetime,
    ) -> list[NotificationRecord] | None:
        """In one transaction: move cursor ``name`` from ``expected`` to ``advance_to``
        (``(last_event_id, last_sync_id)``) and insert ``notifications``, due at ``now``.

        Returns the rows inserted (``suppressed`` ones included), or None when the cursor
        is no longer at ``expected`` (someone else derived them: nothing is written).
        """
        _aware(now, "now")
        with self._writer.begin() as conn:
            moved = conn.execute(
                update(_NC)
                .where(
                    _NC.c.name == name,
                    _NC.c.last_event_id == expected[0],
                    _NC.c.last_sync_id == expected[1],
                )
                .values(last_event_id=advance_to[0], last_sync_id=advance_to[1], updated_at=now)
            ).rowcount
            if moved != 1:
                return None
            return [self._insert_notification(conn, new, now) for new in notifications]

    @staticmethod
    def _insert_notification(
        conn: Connection, new: NewNotification, now: datetime
    ) -> NotificationRecord:
        occurred_at = _aware(new.occurred_at, "occurred_at")
        state = "pending"
        if new.suppress_for > 0:
            earlier = conn.execute(
                select(_O.c.id)
                .where(
                    _O.c.target == new.target,
                    _O.c.fingerprint == new.fingerprint,
                    _O.c.occurred_at > occurred_at - timedelta(seconds=new.suppress_for),
                    _O.c.state.in_(_SUPPRESSING),
                )
                .limit(1)
            ).first()
            if earlier is not None:
                state = "suppressed"
        row = conn.execute(
            insert(_O)
            .values(
                target=new.target,
                event=new.event,
                environment=new.environment,
                service=new.service,
                deployment_id=new.deployment_id,
                sync_id=new.sync_id,
                fingerprint=new.fingerprint,
                payload=dict(new.payload),
                occurred_at=occurred_at,
                created_at=now,
                attempts=0,
                next_attempt_at=now,
                delivered_at=None,
                last_error=None,
                state=state,
            )
            .returning(*_O.c)
        ).one()
        return _notification(row)

    # ------------------------------------------------------------------ delivery

    def claim_next_notification(
        self, target: str, *, now: datetime, lease_until: datetime
    ) -> NotificationRecord | None:
        """The oldest pending notification of ``target`` due at ``now``, leased until
        ``lease_until`` (if the process dies while sending, it is due again then)."""
        _aware(now, "now")
        _aware(lease_until, "lease_until")
        with self._writer.begin() as conn:
            row = conn.execute(
                select(_O)
                .where(
                    _O.c.state == "pending",
                    _O.c.target == target,
                    _O.c.next_attempt_at <= now,
                )
                .order_by(_O.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            claimed = conn.execute(
                update(_O)
                .where(
                    _O.c.id == row.id,
                    _O.c.state == "pending",
                    _O.c.next_attempt_at == row.next_attempt_at,
                )
                .values(next_attempt_at=lease_until)
            ).rowcount
            if claimed != 1:  # another worker took it
                return None
            return _notification(conn.execute(select(_O).where(_O.c.id == row.id)).one())

    def next_notification_due(self, target: str) -> datetime | None:
        """When the next pending notification of ``target`` is due (None: none pending)."""
        with self.engine.connect() as conn:
            due: datetime | None = conn.execute(
                select(func.min(_O.c.next_attempt_at)).where(
                    _O.c.state == "pending", _O.c.target == target
                )
            ).scalar()
            if due is not None and due.tzinfo is None:  # should an aggregate lose the type
                due = due.replace(tzinfo=UTC)
            return due

    def notification_delivered(self, notification_id: int, *, at: datetime) -> NotificationRecord:
        """Record a successful delivery (one more attempt, state ``delivered``)."""
        return self._finish(
            notification_id, {"state": "delivered", "delivered_at": _aware(at, "at")}
        )

    def notification_failed(
        self, notification_id: int, *, error: str, retry_at: datetime | None
    ) -> NotificationRecord:
        """Record a failed attempt: due again at ``retry_at``, or ``dead`` when None."""
        values: dict[str, Any] = {"last_error": error}
        if retry_at is None:
            values["state"] = "dead"
        else:
            values["next_attempt_at"] = _aware(retry_at, "retry_at")
        return self._finish(notification_id, values)

    def _finish(self, notification_id: int, values: dict[str, Any]) -> NotificationRecord:
        with self._writer.begin() as conn:
            changed = conn.execute(
                update(_O)
                .where(_O.c.id == notification_id, _O.c.state == "pending")
                .values(attempts=_O.c.attempts + 1, **values)
            ).rowcount
            if changed != 1:
                raise StoreError(f"no pending notification {notification_id}")
            return _notification(conn.execute(select(_O).where(_O.c.id == notification_id)).one())

    # ------------------------------------------------------------------ reading

    def list_notifications(
        self,
        *,
        target: str | None = None,
        state: str | None = None,
        deployment_id: int | None = None,
        limit: int = 100,
    ) -> list[NotificationRecord]:
        """Outbox rows, newest first."""
        query = select(_O)
        if target is not None:
            query = query.where(_O.c.target == target)
        if state is not None:
            if state not in NOTIFICATION_STATES:
                raise StoreError(f"unknown notification state {state!r}")
            query = query.where(_O.c.state == state)
        if deployment_id is not None:
            query = query.where(_O.c.deployment_id == deployment_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(_O.c.id.desc()).limit(limit)).all()
            return [_notification(row) for row in rows]

    def notification_counts(
        self, states: Collection[str] = ("pending", "dead")
    ) -> dict[str, dict[str, int]]:
        """``{target: {state: count}}`` for the given states (the backlog, for metrics)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_O.c.target, _O.c.state, func.count())
                .where(_O.c.state.in_(sorted(states)))
                .group_by(_O.c.target, _O.c.state)
            ).all()
        counts: dict[str, dict[str, int]] = {}
        for target, state, count in rows:
            counts.setdefault(target, {})[state] = int(count)
        return counts
