"""Delivering the outbox: one lane per target, retry with backoff, rows marked as they go.

A lane (an asyncio task) sends its target's due rows one at a time, oldest first, outside
any transaction; a failure pauses only that lane until the row's next attempt. See the
package docstring for the rules (backoff, ``Retry-After``, final refusals, leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from reconciler import __version__
from reconciler.config import NotificationConfig
from reconciler.executor import durable, utcnow
from reconciler.notify.payloads import clip
from reconciler.notify.targets import Target
from reconciler.store import NotificationRecord, Store, is_transient

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("reconciler.notify")  # one logger for the whole notifier

#: A claimed row is due again this long after its target's timeout if never marked.
LEASE_MARGIN = 60.0
#: Longest error text kept in the outbox.
MAX_ERROR = 500


def backoff(cfg: NotificationConfig, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones."""
    return float(min(cfg.retry_backoff * 2 ** max(attempts - 1, 0), cfg.max_backoff))


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Reconciler-Signature-256`` value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Delivery:
    """The lanes: one per current target, each sending its due rows in order.

    ``targets`` returns the current targets (they change on reload); ``count`` is told of
    each outcome (``delivered``, ``failed``, ``dead``) for the notifier's statistics.
    """

    def __init__(
        self,
        store: Store,
        *,
        targets: Callable[[], Mapping[str, Target]],
        count: Callable[[str, str], None],
        clock: Callable[[], datetime] = utcnow,
        poll_interval: float = 5.0,
    ) -> None:
        self.store = store
        self._targets = targets
        self._count = count
        self.clock = clock
        self.poll_interval = poll_interval
        self._blocked: dict[str, datetime] = {}  # lane paused after a failure, until
        self._client: httpx.AsyncClient | None = None
        self._lane_wake: dict[str, asyncio.Event] = {}
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._running = False

    def start(self) -> None:
        """Start a lane per target; later targets get theirs on `retarget`."""
        self._running = True
        self._start_lanes()

    def stop(self) -> list[asyncio.Task[None]]:
        """Cancel every lane; return their tasks, for the caller to await."""
        self._running = False
        tasks = list(self._lanes.values())
        for task in tasks:
            task.cancel()
        self._lanes.clear()
        self._lane_wake.clear()
        return tasks

    def retarget(self) -> None:
        """Follow a change of targets: a removed target's pause is forgotten and, while
        running, its lane ended; a new target gets a lane."""
        targets = self._targets()
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

    def wake(self, names: Iterable[str]) -> None:
        """Have these targets' lanes look for due rows now (new rows were enqueued)."""
        for name in names:
            lane = self._lane_wake.get(name)
            if lane is not None:
                lane.set()

    async def aclose(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def lane_pass(self, target: Target) -> tuple[int, float]:
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
        while self._targets().get(name) is target:
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
                detail = clip(" ".join(response.text.split()), 200)
                error = f"HTTP {response.status_code}" + (f": {detail}" if detail else "")
                retry_after = retry_after_seconds(response, self.clock())
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
        error = clip(error.replace(cfg.url, "<url>"), MAX_ERROR)
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

    def _start_lanes(self) -> None:
        for name in self._targets():
            if name not in self._lanes:
                self._lane_wake[name] = asyncio.Event()
                self._lanes[name] = asyncio.create_task(self._lane(name), name=f"notify-{name}")

    async def _lane(self, name: str) -> None:
        wake = self._lane_wake[name]
        failures = 0
        while True:
            target = self._targets().get(name)
            if target is None:
                return
            wake.clear()
            try:
                _, delay = await self.lane_pass(target)
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(self.poll_interval * 2**failures, 60.0)
                log_error(f"event=notification_lane_error target={name}", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()


def retry_after_seconds(response: httpx.Response, now: datetime) -> float | None:
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


def log_error(prefix: str, exc: Exception) -> None:
    """Log a loop's error on one line: a warning when transient (the database went away),
    with the traceback otherwise."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if is_transient(exc):
        log.warning("%s error=%r", prefix, message)
    else:
        log.exception("%s error=%r", prefix, message)
