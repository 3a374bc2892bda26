"""Server-sent events of one deployment's progress, exact and live, at no cost to it.

The store is the source of every event sent, and the hub only says *when* to look; but all
viewers of a deployment share one `DeploymentFeed`: one reader task that reads what the
deployment recorded (one store read per burst of events, however many watch), formats each
event once, and keeps the latest ones in memory. Each viewer only keeps a cursor into that
buffer, so the deployment's own writes never queue behind viewers' reads, and a viewer never
holds up the feed or the deployment: one that falls behind the buffer skips ahead (told by a
comment), and one that stops reading is dropped by the server's write timeout.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from reconciler.bus import Bus
from reconciler.events import EventHub, Watch
from reconciler.store import DeploymentRecord, EventRecord, Store

log = logging.getLogger("reconciler.http")

PING = b": ping\n\n"

#: Events kept in memory per watched deployment (older ones: read by nobody who is live).
BUFFER_EVENTS = 10_000
#: Events per store read (a long history is read in pages, as fast as viewers take it).
PAGE_EVENTS = 1_000
#: After a wake-up, the feed waits this long so that a burst of events costs one read.
BATCH_SECONDS = 0.05
#: Messages per write to one viewer.
CHUNK_MESSAGES = 500


def format_event(data: Any, *, event: str | None = None, event_id: int | None = None) -> bytes:
    """One SSE message. JSON never contains a raw newline, so `data` is a single line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n\n").encode()


def _read(
    store: Store, deployment_id: int, after: int, limit: int
) -> tuple[DeploymentRecord | None, list[EventRecord]]:
    # The record first: a status change and its event are written in one transaction, so
    # events read after a terminal record include the terminal event.
    record = store.get_deployment(deployment_id)
    return record, store.events_after(deployment_id, after, limit=limit)


class DeploymentFeed:
    """One deployment's events, read once for all its viewers."""

    def __init__(
        self,
        feeds: LiveFeeds,
        deployment_id: int,
    ) -> None:
        self.feeds = feeds
        self.deployment_id = deployment_id
        self.ids: list[int] = []  # event ids in the buffer, ascending
        self.messages: list[bytes] = []  # the formatted message of each
        self.dropped_upto = 0  # the last event id no longer in the buffer (0: none dropped)
        self.end: bytes | None = None  # the `end` message, once the deployment is terminal
        self.finished = False  # nothing more will come (terminal, gone, or stopping)
        self.viewers = 0
        self._updated = asyncio.Event()
        self._demand = asyncio.Event()  # a viewer has sent all there is
        self._task: asyncio.Task[None] | None = None
        self._watch: Watch | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sse-feed-{self.deployment_id}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.finished = True
        self._notify()

    def noticed(self, resync: bool) -> None:
        """Another process recorded events of this deployment (``resync``: it may have,
        notices were lost): read them. A deployment this process runs publishes its events
        on the hub already, which wakes the feed first."""
        watch = self._watch
        if watch is not None and (resync or not watch.local):
            watch.changed.set()

    @property
    def updated(self) -> asyncio.Event:
        """Set at the next change; take it *before* looking at the buffer."""
        return self._updated

    def _notify(self) -> None:
        updated, self._updated = self._updated, asyncio.Event()
        updated.set()

    def after(self, cursor: int, limit: int = CHUNK_MESSAGES) -> tuple[bytes, int, bool]:
        """(messages after ``cursor`` joined, the new cursor, whether events were skipped)."""
        skipped = cursor < self.dropped_upto
        if skipped:
            cursor = self.dropped_upto
        start = bisect.bisect_right(self.ids, cursor)
        stop = min(len(self.ids), start + limit)
        if start == stop:
            if not skipped:
                self._demand.set()
            return b"", cursor, skipped
        return b"".join(self.messages[start:stop]), self.ids[stop - 1], skipped

    def caught_up(self, cursor: int) -> bool:
        return not self.ids or cursor >= self.ids[-1]

    def _append(self, events: list[EventRecord]) -> None:
        for ev in events:
            self.ids.append(ev.id)
            self.messages.append(format_event(ev.to_json(), event="progress", event_id=ev.id))
        excess = len(self.ids) - self.feeds.buffer_events
        if excess > self.feeds.buffer_events // 2:  # trim in steps: amortised O(1) per event
            self.dropped_upto = self.ids[excess - 1]
            del self.ids[:excess], self.messages[:excess]

    async def _run(self) -> None:
        feeds = self.feeds
        watch = self._watch = feeds.hub.watch(self.deployment_id)
        last = 0
        failing = False
        try:
            while True:
                watch.changed.clear()
                try:
                    record, events = await feeds.read(
                        _read, feeds.store, self.deployment_id, last, feeds.page_events
                    )
                except Exception as exc:  # the database away: viewers wait, ping, retry
                    if not failing:
                        log.warning(
                            "event=sse_read_failed deployment=%d error=%r",
                            self.deployment_id,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        )
                    failing = True
                    await asyncio.sleep(feeds.ping_interval)
                    continue
                failing = False
                if events:
                    last = events[-1].id
                    self._append(events)
                    self._notify()
                if len(events) == feeds.page_events:
                    # More is recorded: read on once a viewer has taken what there is.
                    self._demand.clear()
                    await self._demand.wait()
                    continue
                if record is None or record.terminal:
                    if record is not None:
                        self.end = format_event(record.to_json(), event="end")
                    self.finished = True
                    self._notify()
                    return
                # Until this deployment publishes something (or, as a safety net, a while).
                try:
                    async with asyncio.timeout(feeds.ping_interval):
                        await watch.changed.wait()
                except TimeoutError:
                    continue
                await asyncio.sleep(feeds.batch_seconds)
        finally:
            self._watch = None
            watch.close()


class LiveFeeds:
    """The feeds of the deployments being watched, one each, gone with their last viewer."""

    def __init__(
        self,
        store: Callable[[], Store],
        hub: EventHub,
        *,
        read: Callable[..., Awaitable[Any]] = asyncio.to_thread,
        ping_interval: float = 15.0,
        batch_seconds: float = BATCH_SECONDS,
        buffer_events: int = BUFFER_EVENTS,
        page_events: int = PAGE_EVENTS,
    ) -> None:
        self._store = store
        self.hub = hub
        self.read = read
        self.ping_interval = ping_interval
        self.batch_seconds = batch_seconds
        self.buffer_events = buffer_events
        self.page_events = page_events
        self.stopping = False
        self._feeds: dict[int, DeploymentFeed] = {}

    @property
    def store(self) -> Store:
        return self._store()

    def __len__(self) -> int:
        return len(self._feeds)

    def viewers(self) -> int:
        return sum(feed.viewers for feed in self._feeds.values())

    def listen(self, bus: Bus) -> None:
        """Follow deployments run by other processes too: their events reach this one
        through the store, and the bus says when to look (any time on a resync)."""
        bus.subscribe("progress", self._noticed)

    def _noticed(self, payload: str | None) -> None:
        if payload is None:
            for feed in self._feeds.values():
                feed.noticed(resync=True)
            return
        with contextlib.suppress(ValueError):  # "id" or "id environment"
            following = self._feeds.get(int(payload.split(" ", 1)[0]))
            if following is not None:
                following.noticed(resync=False)

    def open(self, deployment_id: int) -> DeploymentFeed:
        feed = self._feeds.get(deployment_id)
        if feed is None:
            feed = self._feeds[deployment_id] = DeploymentFeed(self, deployment_id)
            if self.stopping:
                feed.finished = True
            else:
                feed.start()
        feed.viewers += 1
        return feed

    def release(self, feed: DeploymentFeed) -> None:
        feed.viewers -= 1
        if feed.viewers == 0 and self._feeds.get(feed.deployment_id) is feed:
            del self._feeds[feed.deployment_id]
            feed.stop()

    def stop(self) -> None:
        """The server is stopping: every stream ends now."""
        self.stopping = True
        for feed in self._feeds.values():
            feed.stop()


async def deployment_events(
    feeds: LiveFeeds, deployment_id: int, *, last_event_id: int = 0
) -> AsyncIterator[bytes]:
    """Recorded events after ``last_event_id``, then live ones, then ``end``.

    The viewer's feed is opened when the stream starts and released however the stream
    ends: finished, server stopping, or client gone.
    """
    feed = feeds.open(deployment_id)
    cursor = last_event_id
    try:
        while not feeds.stopping:
            updated = feed.updated
            chunk, cursor, skipped = feed.after(cursor)
            if skipped:
                yield f": skipped to after event {cursor}: this viewer fell behind\n\n".encode()
            if chunk:
                yield chunk
                continue
            if feed.finished and feed.caught_up(cursor):
                if feed.end is not None:
                    yield feed.end
                return
            try:
                async with asyncio.timeout(feeds.ping_interval):
                    await updated.wait()
            except TimeoutError:
                yield PING
    finally:
        feeds.release(feed)
