"""`Notifier`: derives notices into the outbox and delivers them, until cancelled.

It ties `derive.Deriver` (ledger → outbox) to `delivery.Delivery` (outbox → targets): the
event hub or a poll wakes the derive loop, each pass wakes the lanes of the targets that
got rows, and the counts of outcomes are kept here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from reconciler.config import Config
from reconciler.engine import SyncOutcome
from reconciler.events import EventHub, Subscription
from reconciler.executor import DeploymentEvent, utcnow
from reconciler.notify.delivery import Delivery, log_error
from reconciler.notify.derive import EVENT_OF_STATUS, GAP_GRACE, SYNC_ERROR_RESULTS, Deriver
from reconciler.notify.targets import Target, build_targets
from reconciler.store import NotificationRecord, Store

log = logging.getLogger("reconciler.notify")  # one logger for the whole notifier

_STATS_KEYS = ("delivered", "failed", "suppressed", "dead")


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
        self._wake: asyncio.Event | None = None
        self._deriver = Deriver(
            store, targets=lambda: self.targets, clock=clock, gap_grace=gap_grace
        )
        self._delivery = Delivery(
            store,
            targets=lambda: self.targets,
            count=self._count,
            clock=clock,
            poll_interval=poll_interval,
        )

    # ------------------------------------------------------------------ public API

    def reload(self, config: Config) -> None:
        """Take the targets of a new configuration; raises `ConfigError` (keeping the old
        targets) when one is bad. Rows of removed targets stay pending in the outbox."""
        targets = build_targets(config)
        self.config, self.targets = config, targets
        self._delivery.retarget()
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
            if not self._deriver.more or self._deriver.waiting_on_gap:
                break
        results = await asyncio.gather(
            *(self._delivery.lane_pass(target) for target in list(self.targets.values()))
        )
        return sum(delivered for delivered, _ in results)

    async def run(self) -> None:
        """Derive and deliver until cancelled. Errors (a database outage, a bug) are
        logged and retried; they never end this coroutine."""
        self._wake = asyncio.Event()
        subscription = self.hub.subscribe(maxsize=64) if self.hub is not None else None
        listener = (
            asyncio.create_task(self._listen(subscription), name="notify-listen")
            if subscription is not None
            else None
        )
        self._delivery.start()
        try:
            await self._derive_loop()
        finally:
            tasks = [*self._delivery.stop(), *([listener] if listener else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if subscription is not None:
                subscription.close()
            await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client (after `run_once`; `run` does it itself)."""
        await self._delivery.aclose()

    def wake(self) -> None:
        """Look at the ledger now (the hub does this; a caller may too)."""
        if self._wake is not None:
            self._wake.set()

    async def derive(self) -> int:
        """Turn new ledger rows, then new drift events, into outbox rows; return rows
        inserted."""
        inserted = self._enqueued(await self._deriver.ledger())
        return inserted + self._enqueued(await self._deriver.drift())

    # ------------------------------------------------------------------ internals

    def _enqueued(self, created: Sequence[NotificationRecord]) -> int:
        """Count and log the rows stored suppressed; wake the lanes of the others."""
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
        self._delivery.wake(woken)
        return len(created)

    def _count(self, target: str, key: str) -> None:
        counts = self._stats.setdefault(target, dict.fromkeys(_STATS_KEYS, 0))
        counts[key] += 1

    async def _derive_loop(self) -> None:
        assert self._wake is not None
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.derive()
                failures = 0
                more, waiting = self._deriver.more, self._deriver.waiting_on_gap
                delay = (0.0 if not waiting else 0.2) if more else self.poll_interval
            except Exception as exc:
                failures += 1
                delay = min(self.poll_interval * 2**failures, 60.0)
                log_error("event=notification_derive_error", exc)
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
