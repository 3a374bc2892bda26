"""Deriving notices: the ledger and the drift events after their cursors → outbox rows.

Each pass reads after a cursor (a row of ``notification_cursor``), maps what it finds to
notices for the targets that want them, and inserts them with the cursor's move in ONE
transaction (`Store.enqueue_notifications`, a compare-and-set). See the package docstring
for the mapping and for the wait on gaps in the event ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from reconciler.executor import utcnow
from reconciler.notify.payloads import FAILURE_EVENTS, as_of_event, render, sync_error_text
from reconciler.notify.targets import Target
from reconciler.store import (
    LedgerBatch,
    LedgerEvent,
    NewNotification,
    NotificationRecord,
    Store,
    SyncRecord,
)

log = logging.getLogger("reconciler.notify")  # one logger for the whole notifier

CURSOR_NAME = "notifications"
#: The cursor over `drift_events` (reconciler/drift.py): `drifted` notices.
DRIFT_CURSOR = "drift"
#: Ledger status of a deployment event -> the notice it makes.
EVENT_OF_STATUS: dict[str, str] = {
    "validating": "started",
    "completed": "completed",
    "failed": "failed",
    "timed_out": "timed_out",
    "rolled_back": "rolled_back",
}
SYNC_ERROR_RESULTS = frozenset({"errors", "failed", "refused"})
#: Rows read from the ledger per derive pass.
BATCH = 500
#: Seconds the cursor waits for a gap in the event ids to fill (see the package doc).
GAP_GRACE = 15.0


def fingerprint(*parts: str | None) -> str:
    return hashlib.sha256("\x1f".join(part or "" for part in parts).encode()).hexdigest()


class Deriver:
    """Turns the ledger and the drift events into outbox rows, one pass at a time.

    ``targets`` returns the current targets (they change on reload). After a pass, `more`
    says it stopped early (a full batch, a gap, a lost compare-and-set): pass again soon.
    """

    def __init__(
        self,
        store: Store,
        *,
        targets: Callable[[], Mapping[str, Target]],
        clock: Callable[[], datetime] = utcnow,
        gap_grace: float = GAP_GRACE,
    ) -> None:
        self.store = store
        self._targets = targets
        self.clock = clock
        self.gap_grace = gap_grace
        self.more = False  # the last pass stopped early: derive again soon
        self._gaps: dict[int, float] = {}  # first missing event id -> when first seen

    @property
    def waiting_on_gap(self) -> bool:
        """The cursor stopped before a gap in the event ids that may still fill."""
        return bool(self._gaps)

    async def drift(self) -> list[NotificationRecord]:
        """`drift_events` after the cursor ``drift`` → `drifted` notices, in one transaction
        with the cursor's move (the same compare-and-set as the ledger's); return the rows
        inserted."""
        store = self.store
        cursor = await asyncio.to_thread(store.notification_cursor, DRIFT_CURSOR)
        if cursor is None:
            cursor = await asyncio.to_thread(
                store.start_drift_cursor, DRIFT_CURSOR, at=self.clock()
            )
        events = await asyncio.to_thread(store.drift_events_after, cursor.last_event_id, BATCH)
        if not events:
            return []
        notices = [
            NewNotification(
                target=target.name,
                event="drifted",
                environment=event.environment,
                service=event.service,
                deployment_id=None,
                sync_id=None,
                fingerprint=fingerprint(
                    target.name, "drifted", event.environment, event.service, event.live_version
                ),
                payload=render(
                    target,
                    "drifted",
                    environment=event.environment,
                    service=event.service,
                    deployment=None,
                    sync=None,
                    at=event.at,
                    drift=event,
                ),
                occurred_at=event.at,
                suppress_for=0.0,
            )
            for event in events
            for target in self._targets().values()
            if target.wants("drifted", event.environment)
        ]
        created = await asyncio.to_thread(
            store.enqueue_notifications,
            DRIFT_CURSOR,
            expected=(cursor.last_event_id, cursor.last_sync_id),
            advance_to=(events[-1].id, cursor.last_sync_id),
            notifications=notices,
            now=self.clock(),
        )
        if created is None or len(events) >= BATCH:
            self.more = True
        return created or []

    async def ledger(self) -> list[NotificationRecord]:
        """Deployment events and syncs after the cursor ``notifications`` → notices, in one
        transaction with the cursor's move; return the rows inserted."""
        store = self.store
        cursor = await asyncio.to_thread(store.notification_cursor, CURSOR_NAME)
        if cursor is None:
            cursor = await asyncio.to_thread(
                store.start_notification_cursor, CURSOR_NAME, at=self.clock()
            )
            log.info(
                "event=notifications_cursor_started event_id=%d sync_id=%d",
                cursor.last_event_id,
                cursor.last_sync_id,
            )
        batch = await asyncio.to_thread(
            store.ledger_after,
            after_event_id=cursor.last_event_id,
            after_sync_id=cursor.last_sync_id,
            statuses=tuple(EVENT_OF_STATUS),
            limit=BATCH,
        )
        targets = list(self._targets().values())
        notices, last_event, last_sync, gap = self._plan(
            batch, cursor.last_event_id, cursor.last_sync_id, targets
        )
        self.more = gap or len(batch.event_ids) >= BATCH or len(batch.syncs) >= BATCH
        if (last_event, last_sync) == (cursor.last_event_id, cursor.last_sync_id):
            return []
        created = await asyncio.to_thread(
            store.enqueue_notifications,
            CURSOR_NAME,
            expected=(cursor.last_event_id, cursor.last_sync_id),
            advance_to=(last_event, last_sync),
            notifications=notices,
            now=self.clock(),
        )
        if created is None:  # another process moved the cursor: read again
            self.more = True
            return []
        return created

    def _plan(
        self,
        batch: LedgerBatch,
        last_event: int,
        last_sync: int,
        targets: list[Target],
    ) -> tuple[list[NewNotification], int, int, bool]:
        notices: list[NewNotification] = []
        by_id = {entry.event.id: entry for entry in batch.events}
        now = time.monotonic()
        gap = False
        for ident in batch.event_ids:
            if ident != last_event + 1:
                first_seen = self._gaps.setdefault(last_event + 1, now)
                if now - first_seen < self.gap_grace:
                    gap = True  # an insert with a lower id may not be committed yet
                    break
                log.warning(
                    "event=notification_gap_skipped from=%d to=%d", last_event + 1, ident - 1
                )
            entry = by_id.get(ident)
            if entry is not None:
                notices.extend(self._deployment_notices(entry, targets))
            last_event = ident
        self._gaps = {key: seen for key, seen in self._gaps.items() if key > last_event}
        for index, sync in enumerate(batch.syncs):
            if sync.result is None:
                if index == len(batch.syncs) - 1:
                    break  # still running: its outcome is not known yet
                last_sync = sync.id  # abandoned (the process died during it)
                continue
            if sync.result in SYNC_ERROR_RESULTS:
                notices.extend(self._sync_notices(sync, targets))
            last_sync = sync.id
        return notices, last_event, last_sync, gap

    def _deployment_notices(
        self, entry: LedgerEvent, targets: Iterable[Target]
    ) -> Iterable[NewNotification]:
        event = EVENT_OF_STATUS[entry.event.status]
        dep = as_of_event(entry.deployment, entry.event.status)
        error = dep.error_message or entry.event.message
        for target in targets:
            if not target.wants(event, dep.environment):
                continue
            yield NewNotification(
                target=target.name,
                event=event,
                environment=dep.environment,
                service=dep.service,
                deployment_id=dep.id,
                sync_id=None,
                fingerprint=fingerprint(
                    target.name, event, dep.environment, dep.service, dep.version, error
                ),
                payload=render(
                    target,
                    event,
                    environment=dep.environment,
                    service=dep.service,
                    deployment=dep,
                    sync=None,
                    at=entry.event.at,
                ),
                occurred_at=entry.event.at,
                suppress_for=target.config.suppress_repeats if event in FAILURE_EVENTS else 0.0,
            )

    def _sync_notices(
        self, sync: SyncRecord, targets: Iterable[Target]
    ) -> Iterable[NewNotification]:
        at = sync.ended_at or sync.seen_at
        error = sync_error_text(sync)
        for target in targets:
            if not target.wants("sync_error", None):
                continue
            yield NewNotification(
                target=target.name,
                event="sync_error",
                environment=None,
                service=None,
                deployment_id=None,
                sync_id=sync.id,
                fingerprint=fingerprint(target.name, "sync_error", None, None, None, error),
                payload=render(
                    target,
                    "sync_error",
                    environment=None,
                    service=None,
                    deployment=None,
                    sync=sync,
                    at=at,
                ),
                occurred_at=at,
                suppress_for=target.config.suppress_repeats,
            )
