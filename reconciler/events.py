"""In-process fan-out of what happens: deployment events and sync outcomes.

The engine publishes; the HTTP server (live progress), the metrics and the notifier listen.
Publishing never blocks and never fails: a subscriber that falls behind loses its oldest
events (and is told how many), because the ledger, not this hub, is the record. Watching
one deployment costs a publish one flag set, however many watch other deployments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from reconciler.engine import SyncOutcome
from reconciler.executor import DeploymentEvent

log = logging.getLogger(__name__)

Event = DeploymentEvent | SyncOutcome


class Subscription:
    def __init__(self, hub: EventHub, maxsize: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _put(self, event: Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()

    def get_nowait(self) -> Event | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        self._hub._subs.discard(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            yield await self._queue.get()


class Watch:
    """Raised (``changed`` set) whenever one deployment publishes; the watcher clears it."""

    def __init__(self, hub: EventHub, deployment_id: int) -> None:
        self._hub = hub
        self.deployment_id = deployment_id
        self.changed = asyncio.Event()
        self.local = False  # this process published for the deployment (it runs it)

    def close(self) -> None:
        watches = self._hub._watches.get(self.deployment_id)
        if watches is not None:
            watches.discard(self)
            if not watches:
                del self._hub._watches[self.deployment_id]


class EventHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._watches: dict[int, set[Watch]] = {}
        self._callbacks: list[Callable[[Event], None]] = []

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subs.add(sub)
        return sub

    def watch(self, deployment_id: int) -> Watch:
        """A flag raised by every event of one deployment (``close()`` it when done)."""
        watch = Watch(self, deployment_id)
        self._watches.setdefault(deployment_id, set()).add(watch)
        return watch

    def watching(self) -> int:
        """How many watches are open (for tests and metrics)."""
        return sum(len(w) for w in self._watches.values())

    def on_event(self, callback: Callable[[Event], None]) -> None:
        """Call `callback` synchronously for every event (cheap work only: counters)."""
        self._callbacks.append(callback)

    def publish(self, event: Event) -> None:
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:  # a broken listener never breaks a deployment
                log.exception("event listener failed")
        for sub in list(self._subs):
            sub._put(event)
        if isinstance(event, DeploymentEvent):
            for watch in self._watches.get(event.deployment_id, ()):
                watch.local = True
                watch.changed.set()

    # The executor's listener and the engine's on_sync hook.
    def deployment(self, event: DeploymentEvent) -> None:
        self.publish(event)

    def sync(self, outcome: SyncOutcome) -> None:
        self.publish(outcome)
