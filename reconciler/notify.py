"""Notifications out: `[[notifications]]` targets fed from a durable outbox.

The ledger is the source, never the in-process events::

    deployment_events, syncs ──(cursor)──► notification_outbox ──(one lane per target)──► HTTP
                          derive: one transaction          deliver: no transaction held

- **Derive.** Woken by the `EventHub` (or every `poll_interval` seconds), the notifier
  reads the ledger after its cursor (table ``notification_cursor``), maps what it finds
  to notices, and in ONE transaction inserts an outbox row per matching target and moves
  the cursor. A crash before that commit derives the same rows again; after it, nothing
  is lost. On a first start the cursor begins at the current end (no flood of history).

  ========================================  =============
  ledger                                    notice
  ========================================  =============
  deployment event, status ``validating``   ``started``
  ``completed`` / ``failed`` /               same name
  ``timed_out`` / ``rolled_back``
  a sync with result errors/failed/refused  ``sync_error``
  ========================================  =============

  Only status changes carry these statuses (`Store.set_status`); progress reports
  (`Store.add_event`) are ``in_progress`` and never notify. A ``sync_error`` has no
  environment and goes to every target that asks for ``sync_error``.

  PostgreSQL hands out ids before commit, so a row with a lower id can become visible
  after a higher one: the cursor stops before a gap in the event ids and waits up to
  `GAP_GRACE` seconds for it to fill (a rolled-back insert leaves a gap forever).

- **Suppress.** A failure notice (failed, timed_out, rolled_back, sync_error) whose
  fingerprint (target, event, environment, service, version, error text) equals one
  pending or delivered less than the target's ``suppress_repeats`` before is stored
  ``suppressed``: kept for audit, never sent.

- **Deliver.** One lane (an asyncio task) per target sends that target's due rows one at
  a time, oldest first, with the target's ``timeout``. A 2xx marks the row delivered in
  a transaction right away. A failure records ``attempts``, ``last_error`` and
  ``next_attempt_at`` (``retry_backoff`` doubled per attempt, at most ``max_backoff``;
  a ``Retry-After`` answer is honoured within that cap) and pauses the lane until then, so
  a target that is down gets one probe per backoff, not a storm; a 4xx refusal (not
  408/409/425/429) is final at once; after ``max_attempts``
  the row is ``dead``. Lanes are independent: a target that hangs delays only itself,
  and nothing here runs on a deployment's path (deployments only write the ledger).

  Delivery is exactly once in the normal case, at least once at the edge: if the process
  dies after the target answered 2xx but before the row is marked, the row's lease
  expires and it is sent again. Receivers that must not see a duplicate dedupe on the
  ``X-Reconciler-Delivery`` header (the outbox id, stable across retries).

Generic webhooks get ``{"event", "environment", "service", "deployment", "sync",
"message", "at"}`` (``deployment`` is the SPEC §5 record as of the event), with
``X-Reconciler-Event``, ``X-Reconciler-Delivery`` and, when ``secret_file`` is set,
``X-Reconciler-Signature-256: sha256=<hex HMAC-SHA256 of the body>``. Slack targets get an
incoming-webhook message: a ``text`` fallback and ``blocks`` (mrkdwn section + context).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from reconciler import __version__
from reconciler.config import Config, ConfigError, NotificationConfig
from reconciler.engine import SyncOutcome
from reconciler.events import EventHub, Subscription
from reconciler.executor import DeploymentEvent, durable, utcnow
from reconciler.store import (
    DeploymentRecord,
    DriftEvent,
    LedgerBatch,
    LedgerEvent,
    NewNotification,
    NotificationRecord,
    Store,
    SyncRecord,
    format_time,
    is_transient,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

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
#: Notices subject to suppression of identical repeats.
FAILURE_EVENTS = frozenset({"failed", "timed_out", "rolled_back", "sync_error"})
#: Rows read from the ledger per derive pass.
BATCH = 500
#: Seconds the cursor waits for a gap in the event ids to fill (see the module doc).
GAP_GRACE = 15.0
#: A claimed row is due again this long after its target's timeout if never marked.
LEASE_MARGIN = 60.0
#: Longest error text kept in the outbox.
MAX_ERROR = 500

_EMOJI = {
    "started": "🚀",
    "completed": "✅",
    "failed": "❌",
    "timed_out": "⏱️",
    "rolled_back": "↩️",
    "sync_error": "⚠️",
    "drifted": "🔀",
}
_STATS_KEYS = ("delivered", "failed", "suppressed", "dead")


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One configured notification target, its secret read."""

    name: str
    config: NotificationConfig
    secret: bytes | None

    def wants(self, event: str, environment: str | None) -> bool:
        if event not in self.config.events:
            return False
        envs = self.config.environments
        return environment is None or not envs or environment in envs


def default_target_name(cfg: NotificationConfig) -> str:
    """``type:host:hash``: stable across reloads, and never the URL (Slack's path is a secret)."""
    host = urlsplit(cfg.url).hostname or "unknown"
    digest = hashlib.sha256(cfg.url.encode()).hexdigest()[:6]
    return f"{cfg.type}:{host}:{digest}"


def build_targets(config: Config) -> dict[str, Target]:
    """The targets of ``config``; a `ConfigError` for a bad URL, secret or duplicate name."""
    targets: dict[str, Target] = {}
    for index, cfg in enumerate(config.notifications):
        where = f"notifications[{index}]"
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL")
        name = cfg.name or default_target_name(cfg)
        if name in targets:
            raise ConfigError(f"{where}: a second notification target named '{name}'")
        if len(name) > 255:
            raise ConfigError(f"{where}.name: at most 255 characters")
        secret = None
        if cfg.secret_file is not None:
            secret = config.read_secret(cfg.secret_file).encode()
        targets[name] = Target(name=name, config=cfg, secret=secret)
    return targets


def backoff(cfg: NotificationConfig, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones."""
    return float(min(cfg.retry_backoff * 2 ** max(attempts - 1, 0), cfg.max_backoff))


def fingerprint(*parts: str | None) -> str:
    return hashlib.sha256("\x1f".join(part or "" for part in parts).encode()).hexdigest()


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Reconciler-Signature-256`` value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- rendering


def _short_author(author: str | None) -> str | None:
    if not author:
        return None
    name = author.split("<", 1)[0].strip()
    return name or author.strip("<> ")


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def as_of_event(deployment: DeploymentRecord, status: str) -> DeploymentRecord:
    """The deployment record as it was when it took ``status`` (the ledger row may have
    moved on by the time the notice is derived, e.g. a ``started`` read after the end)."""
    rec = dataclasses.replace(deployment, status=status, progress=None, log=None)
    if status not in ("completed", "failed", "timed_out", "rolled_back", "cancelled"):
        rec = dataclasses.replace(rec, completed_at=None, error_message=None)
    return rec


def _verb(event: str) -> str:
    return event.replace("_", " ")


def deployment_summary(event: str, dep: DeploymentRecord) -> tuple[str, str | None, str]:
    """``(headline, error, footer)`` of a deployment notice, plain text."""
    head = f"{dep.environment}/{dep.service} {dep.version} {_verb(event)}"
    if dep.previous_version and dep.previous_version != dep.version:
        head += f" (was {dep.previous_version})"
    error = dep.error_message if event in FAILURE_EVENTS else None
    footer = []
    if dep.commit:
        by = _short_author(dep.commit_author)
        footer.append(f"commit {dep.commit[:7]}" + (f" by {by}" if by else ""))
    footer.append(f"trigger {dep.trigger}")
    if dep.attempt > 1:
        footer.append(f"attempt {dep.attempt}")
    footer.append(f"deployment #{dep.id}")
    if dep.duration_seconds is not None and event != "started":
        footer.append(f"{dep.duration_seconds:g}s")
    return head, error, " · ".join(footer)


def sync_error_text(sync: SyncRecord) -> str:
    if sync.error_message:
        return sync.error_message
    lines = [
        f"{e.get('file')}:{e.get('line')}:{e.get('col')}: {e.get('path')}: {e.get('message')}"
        for e in sync.errors
    ]
    return "\n".join(lines) or f"sync {sync.result}"


def sync_summary(sync: SyncRecord) -> tuple[str, str, str]:
    commit = f" of {sync.commit_sha[:7]}" if sync.commit_sha else ""
    if sync.result == "errors":
        count = len(sync.errors)
        head = f"sync{commit}: {count} invalid file{'s' if count != 1 else ''}"
    else:
        head = f"sync{commit} {sync.result}"
    footer = [f"trigger {sync.trigger}", f"sync #{sync.id}"]
    by = _short_author(sync.commit_author)
    if by:
        footer.insert(0, f"by {by}")
    return head, sync_error_text(sync), " · ".join(footer)


def sync_json(sync: SyncRecord) -> dict[str, Any]:
    return {
        "id": sync.id,
        "trigger": sync.trigger,
        "result": sync.result,
        "commit": sync.commit_sha,
        "commit_author": sync.commit_author,
        "commit_subject": sync.commit_subject,
        "seen_at": format_time(sync.seen_at),
        "ended_at": format_time(sync.ended_at),
        "environments_changed": list(sync.environments_changed),
        "errors": list(sync.errors),
        "error_message": sync.error_message,
    }


def drift_summary(drift: DriftEvent) -> tuple[str, None, str]:
    head = (
        f"{drift.environment}/{drift.service} drifted: live version is {drift.live_version},"
        f" deployed {drift.deployed_version}"
    )
    return head, None, "found by the drift monitor"


def render(
    target: Target,
    event: str,
    *,
    environment: str | None,
    service: str | None,
    deployment: DeploymentRecord | None,
    sync: SyncRecord | None,
    at: datetime,
    drift: DriftEvent | None = None,
) -> dict[str, Any]:
    """The JSON body sent to ``target`` for one notice."""
    if deployment is not None:
        head, error, footer = deployment_summary(event, deployment)
    elif sync is not None:
        head, error, footer = sync_summary(sync)
    elif drift is not None:
        head, error, footer = drift_summary(drift)
    else:  # pragma: no cover - a notice is about a deployment or a sync
        raise ValueError("a notice needs a deployment or a sync")
    plain = head + (f": {_clip(error, 300)}" if error else "")
    if target.config.type == "slack":
        return slack_message(event, head, error, footer, plain)
    body = {
        "event": event,
        "environment": environment,
        "service": service,
        "deployment": deployment.to_json() if deployment is not None else None,
        "sync": sync_json(sync) if sync is not None else None,
        "message": plain + (f" — {footer}" if footer else ""),
        "at": format_time(at),
    }
    if drift is not None:
        body["drift"] = {
            "live_version": drift.live_version,
            "deployed_version": drift.deployed_version,
        }
    return body


def slack_message(
    event: str, head: str, error: str | None, footer: str, plain: str
) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` (the notification fallback) and blocks."""
    emoji = _EMOJI.get(event, "")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} *{_slack_escape(head)}*"}}
    ]
    if error:
        code = _slack_escape(_clip(error, 2500)).replace("```", "'''")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"```{code}```"}})
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(footer)}]}
    )
    short_footer = footer.split(" · ", 1)[0] if footer.startswith("commit ") else ""
    text = f"{emoji} {plain}" + (f" — {short_footer}" if short_footer else "")
    return {"text": _slack_escape(text), "blocks": blocks}


# --------------------------------------------------------------------------- the notifier


class Notifier:
    """Derives notices from the ledger into the outbox and delivers them.

    `run` until cancelled in the daemon; `run_once` in tests; `reload` on SIGHUP.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        hub: EventHub | None,
        *,
        clock: Callable[[], datetime] = utcnow,
        poll_interval: float = 5.0,
        gap_grace: float = GAP_GRACE,
    ) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.clock = clock
        self.poll_interval = poll_interval
        self.gap_grace = gap_grace
        self.targets: dict[str, Target] = build_targets(config)
        self._stats: dict[str, dict[str, int]] = {}
        self._gaps: dict[int, float] = {}  # first missing event id -> when first seen
        self._more = False  # the last derive stopped early: derive again soon
        self._blocked: dict[str, datetime] = {}  # lane paused after a failure, until
        self._client: httpx.AsyncClient | None = None
        self._wake: asyncio.Event | None = None
        self._lane_wake: dict[str, asyncio.Event] = {}
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._running = False

    # ------------------------------------------------------------------ public API

    def reload(self, config: Config) -> None:
        """Take the targets of a new configuration; raises `ConfigError` (keeping the old
        targets) when one is bad. Rows of removed targets stay pending in the outbox."""
        targets = build_targets(config)
        self.config, self.targets = config, targets
        for name in list(self._blocked):
            if name not in targets:
                del self._blocked[name]
        if self._running:
            for name, task in list(self._lanes.items()):
                if name not in targets:
                    task.cancel()
                    del self._lanes[name]
                    self._lane_wake.pop(name, None)
            self._start_lanes()
        log.info("event=notifications_reloaded targets=%s", ",".join(targets) or "-")

    def stats(self) -> dict[str, dict[str, int]]:
        """Counts since start per target: delivered, failed (attempts), suppressed, dead."""
        out = {name: dict.fromkeys(_STATS_KEYS, 0) for name in self.targets}
        for name, counts in self._stats.items():
            out.setdefault(name, dict.fromkeys(_STATS_KEYS, 0)).update(counts)
        return out

    async def run_once(self) -> int:
        """Derive everything new, then send what is due to every target (concurrently);
        return how many notifications were delivered."""
        for _ in range(1000):  # a bounded catch-up: BATCH rows per pass
            await self.derive()
            if not self._more or self._gaps:
                break
        results = await asyncio.gather(
            *(self._lane_pass(target) for target in list(self.targets.values()))
        )
        return sum(delivered for delivered, _ in results)

    async def run(self) -> None:
        """Derive and deliver until cancelled. Errors (a database outage, a bug) are
        logged and retried; they never end this coroutine."""
        self._wake = asyncio.Event()
        self._running = True
        subscription = self.hub.subscribe(maxsize=64) if self.hub is not None else None
        listener = (
            asyncio.create_task(self._listen(subscription), name="notify-listen")
            if subscription is not None
            else None
        )
        self._start_lanes()
        try:
            await self._derive_loop()
        finally:
            self._running = False
            tasks = [*self._lanes.values(), *([listener] if listener else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._lanes.clear()
            self._lane_wake.clear()
            if subscription is not None:
                subscription.close()
            await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client (after `run_once`; `run` does it itself)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def wake(self) -> None:
        """Look at the ledger now (the hub does this; a caller may too)."""
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ deriving

    async def derive(self) -> int:
        """Turn new ledger rows, then new drift events, into outbox rows; return rows
        inserted."""
        return await self._derive_ledger() + await self._derive_drift()

    async def _derive_drift(self) -> int:
        """`drift_events` after the cursor ``drift`` → `drifted` notices, in one transaction
        with the cursor's move (the same compare-and-set as the ledger's)."""
        store = self.store
        cursor = await asyncio.to_thread(store.notification_cursor, DRIFT_CURSOR)
        if cursor is None:
            cursor = await asyncio.to_thread(
                store.start_drift_cursor, DRIFT_CURSOR, at=self.clock()
            )
        events = await asyncio.to_thread(store.drift_events_after, cursor.last_event_id, BATCH)
        if not events:
            return 0
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
            for target in self.targets.values()
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
            self._more = True
        for name in {rec.target for rec in created or () if rec.state != "suppressed"}:
            lane = self._lane_wake.get(name)
            if lane is not None:
                lane.set()
        return len(created or ())

    async def _derive_ledger(self) -> int:
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
        targets = list(self.targets.values())
        notices, last_event, last_sync, gap = self._plan(
            batch, cursor.last_event_id, cursor.last_sync_id, targets
        )
        self._more = gap or len(batch.event_ids) >= BATCH or len(batch.syncs) >= BATCH
        if (last_event, last_sync) == (cursor.last_event_id, cursor.last_sync_id):
            return 0
        created = await asyncio.to_thread(
            store.enqueue_notifications,
            CURSOR_NAME,
            expected=(cursor.last_event_id, cursor.last_sync_id),
            advance_to=(last_event, last_sync),
            notifications=notices,
            now=self.clock(),
        )
        if created is None:  # another process moved the cursor: read again
            self._more = True
            return 0
        woken: set[str] = set()
        for rec in created:
            if rec.state == "suppressed":
                self._count(rec.target, "suppressed")
                log.info(
                    "event=notification_suppressed target=%s id=%d notice=%s environment=%s service=%s",
                    rec.target,
                    rec.id,
                    rec.event,
                    rec.environment or "-",
                    rec.service or "-",
                )
            else:
                woken.add(rec.target)
        for name in woken:
            lane = self._lane_wake.get(name)
            if lane is not None:
                lane.set()
        return len(created)

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

    # ------------------------------------------------------------------ delivering

    async def _lane_pass(self, target: Target) -> tuple[int, float]:
        """Send ``target``'s due rows in order until none is due or one fails; return
        ``(delivered, seconds until the lane should look again)``."""
        name = target.name
        blocked = self._blocked.get(name)
        if blocked is not None:
            wait = (blocked - self.clock()).total_seconds()
            if wait > 0:
                return 0, min(wait, self.poll_interval)
            del self._blocked[name]
        delivered = 0
        while self.targets.get(name) is target:
            # Read first: an idle lane costs one read, never a write transaction.
            due = await asyncio.to_thread(self.store.next_notification_due, name)
            now = self.clock()
            if due is None:
                break
            if due > now:
                return delivered, min((due - now).total_seconds(), self.poll_interval)
            lease = now + timedelta(seconds=target.config.timeout + LEASE_MARGIN)
            rec = await asyncio.to_thread(
                self.store.claim_next_notification, name, now=now, lease_until=lease
            )
            if rec is None:  # taken by another worker meanwhile
                return delivered, min(1.0, self.poll_interval)
            ok, retry_at = await self._send(target, rec)
            if ok:
                delivered += 1
            elif retry_at is not None:
                self._blocked[name] = retry_at
                return delivered, min(
                    max((retry_at - self.clock()).total_seconds(), 0.0), self.poll_interval
                )
        return delivered, self.poll_interval

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx  # only a daemon with notification targets pays for it (~9 MB)

            self._client = httpx.AsyncClient(
                follow_redirects=False,
                headers={"User-Agent": f"reconciler/{__version__}"},
            )
        return self._client

    async def _send(self, target: Target, rec: NotificationRecord) -> tuple[bool, datetime | None]:
        """One attempt. Returns ``(delivered, retry_at)``; ``retry_at`` None when the row
        was delivered or is now dead."""
        cfg = target.config
        body = json.dumps(rec.payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"reconciler/{__version__}",
            "X-Reconciler-Event": rec.event,
            "X-Reconciler-Delivery": str(rec.id),
        }
        if target.secret is not None:
            headers["X-Reconciler-Signature-256"] = signature(target.secret, body)
        error: str | None = None
        retry_after: float | None = None
        permanent = False
        try:
            async with asyncio.timeout(cfg.timeout):
                response = await self._http().post(
                    cfg.url, content=body, headers=headers, timeout=cfg.timeout
                )
            if not 200 <= response.status_code < 300:
                detail = _clip(" ".join(response.text.split()), 200)
                error = f"HTTP {response.status_code}" + (f": {detail}" if detail else "")
                retry_after = _retry_after(response, self.clock())
                # The receiver refuses this request as such (gone, forbidden, malformed):
                # asking again cannot help. Timeouts, conflicts and rate limits can.
                permanent = 400 <= response.status_code < 500 and response.status_code not in (
                    408,
                    409,
                    425,
                    429,
                )
        except TimeoutError:
            error = f"timed out after {cfg.timeout:g}s"
        except Exception as exc:  # refused, reset, TLS, a bad URL...: all retried
            error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        if error is None:
            await durable(self.store.notification_delivered, rec.id, at=self.clock())
            self._count(target.name, "delivered")
            log.info(
                "event=notification_delivered target=%s id=%d notice=%s attempts=%d",
                target.name,
                rec.id,
                rec.event,
                rec.attempts + 1,
            )
            return True, None
        error = _clip(error.replace(cfg.url, "<url>"), MAX_ERROR)
        attempts = rec.attempts + 1
        if attempts >= cfg.max_attempts or permanent:
            await durable(self.store.notification_failed, rec.id, error=error, retry_at=None)
            self._count(target.name, "failed")
            self._count(target.name, "dead")
            log.error(
                "event=notification_dead target=%s id=%d notice=%s attempts=%d error=%r",
                target.name,
                rec.id,
                rec.event,
                attempts,
                error,
            )
            return False, None
        delay = backoff(cfg, attempts)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.max_backoff))
        retry_at = self.clock() + timedelta(seconds=delay)
        await durable(self.store.notification_failed, rec.id, error=error, retry_at=retry_at)
        self._count(target.name, "failed")
        log.warning(
            "event=notification_failed target=%s id=%d notice=%s attempts=%d retry_in=%gs error=%r",
            target.name,
            rec.id,
            rec.event,
            attempts,
            delay,
            error,
        )
        return False, retry_at

    def _count(self, target: str, key: str) -> None:
        counts = self._stats.setdefault(target, dict.fromkeys(_STATS_KEYS, 0))
        counts[key] += 1

    # ------------------------------------------------------------------ the loops

    def _start_lanes(self) -> None:
        for name in self.targets:
            if name not in self._lanes:
                self._lane_wake[name] = asyncio.Event()
                self._lanes[name] = asyncio.create_task(self._lane(name), name=f"notify-{name}")

    async def _lane(self, name: str) -> None:
        wake = self._lane_wake[name]
        failures = 0
        while True:
            target = self.targets.get(name)
            if target is None:
                return
            wake.clear()
            try:
                _, delay = await self._lane_pass(target)
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(self.poll_interval * 2**failures, 60.0)
                _log_error(f"event=notification_lane_error target={name}", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()

    async def _derive_loop(self) -> None:
        assert self._wake is not None
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.derive()
                failures = 0
                delay = (0.0 if not self._gaps else 0.2) if self._more else self.poll_interval
            except Exception as exc:
                failures += 1
                delay = min(self.poll_interval * 2**failures, 60.0)
                _log_error("event=notification_derive_error", exc)
            if delay <= 0:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _listen(self, subscription: Subscription) -> None:
        async for event in subscription:
            if isinstance(event, DeploymentEvent):
                relevant = event.status in EVENT_OF_STATUS
            else:
                relevant = isinstance(event, SyncOutcome) and event.result in SYNC_ERROR_RESULTS
            if relevant:
                self.wake()


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    """Seconds asked by a 429/503 ``Retry-After`` (delta-seconds or an HTTP date)."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - now).total_seconds(), 0.0)


def _log_error(prefix: str, exc: Exception) -> None:
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if is_transient(exc):
        log.warning("%s error=%r", prefix, message)
    else:
        log.exception("%s error=%r", prefix, message)
