"""Server-sent events of one deployment's progress, exact and live.

The store is the source of every event sent: the hub only says *when* to look. Each wake-up
reads the events recorded after the last one sent, so event ids are the store's, nothing is
sent twice, and an event the hub dropped (a slow subscriber) is still read from the store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from reconciler.events import Event, EventHub
from reconciler.executor import DeploymentEvent
from reconciler.store import DeploymentRecord, EventRecord, Store

PING = b": ping\n\n"


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
    store: Store, deployment_id: int, after: int
) -> tuple[DeploymentRecord | None, list[EventRecord]]:
    # The record first: a status change and its event are written in one transaction, so
    # events read after a terminal record include the terminal event.
    record = store.get_deployment(deployment_id)
    return record, store.events_after(deployment_id, after)


async def deployment_events(
    store: Store,
    hub: EventHub,
    deployment_id: int,
    *,
    last_event_id: int = 0,
    ping_interval: float = 15.0,
    stopping: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """Recorded events after ``last_event_id``, then live ones, then ``end``.

    The hub subscription is taken when the stream starts, before the first read (so nothing
    recorded in between is missed), and closed however the stream ends: finished, server
    stopping, or client gone.
    """
    sub = hub.subscribe()
    get_task: asyncio.Task[Event] | None = None
    stop_task: asyncio.Task[Any] | None = None
    last = last_event_id
    try:
        stop_task = asyncio.create_task((stopping or asyncio.Event()).wait())
        waits: set[asyncio.Task[Any]]
        while True:
            record, events = await asyncio.to_thread(_read, store, deployment_id, last)
            for ev in events:
                yield format_event(ev.to_json(), event="progress", event_id=ev.id)
                last = ev.id
            if record is None or record.terminal:
                if record is not None:
                    yield format_event(record.to_json(), event="end")
                return
            # Sleep until this deployment records something, a ping is due, or the server stops.
            dropped = sub.dropped
            while True:
                if get_task is None:
                    get_task = asyncio.create_task(sub.get())
                waits = {get_task, stop_task}
                done, _ = await asyncio.wait(
                    waits, timeout=ping_interval, return_when="FIRST_COMPLETED"
                )
                if stop_task in done:
                    return
                if get_task not in done:
                    yield PING
                    break  # and look at the store again: a safety net, never the main path
                relevant = _ours(get_task.result(), deployment_id)
                get_task = None
                # Coalesce a burst: everything queued now is answered by one read.
                while (pending := sub.get_nowait()) is not None:
                    relevant = relevant or _ours(pending, deployment_id)
                if relevant or sub.dropped != dropped:
                    break
    finally:
        for task in (get_task, stop_task):
            if task is not None:
                task.cancel()
        sub.close()


def _ours(event: Any, deployment_id: int) -> bool:
    return isinstance(event, DeploymentEvent) and event.deployment_id == deployment_id
