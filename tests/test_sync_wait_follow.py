"""`sync --wait` through the daemon (`operations.handle`): a run's last events can reach the
follower after the store already says its scope is quiet (they are published once the
record is written). The follower must pass them on, not stop at "quiet"."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

import reconciler.operations as ops
from reconciler.channel import Progress, SyncAction, SyncResult
from reconciler.events import EventHub
from reconciler.executor import DeploymentEvent
from reconciler.store import DeploymentRecord, Store
from reconciler.sync import SyncOutcome


def _event(status: str) -> DeploymentEvent:
    return DeploymentEvent(7, "staging", "api", "2.0", "git", status, status)


class _Host:
    """A daemon whose poll started a run just before the operator's sync: the run's first
    event, the sync's outcome, then the run's last events all arrive in one go."""

    def __init__(self, store: Store) -> None:
        self.hub = EventHub()
        self.engine: Any = SimpleNamespace(store=store, deploying={}, commit=None)

    def request_sync(self, trigger: str) -> None:
        self.hub.publish(_event("pending"))
        self.hub.publish(SyncOutcome(1, "abc", "ok", trigger=trigger))
        self.hub.publish(_event("in_progress"))
        self.hub.publish(_event("failed"))

    def service_state_changed(self, environment: str) -> None:
        pass

    def start(
        self, work: Coroutine[Any, Any, list[DeploymentRecord]], name: str
    ) -> asyncio.Task[list[DeploymentRecord]]:
        raise AssertionError("a sync starts no deployment itself")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sync_wait_passes_on_a_runs_last_events_after_the_store_is_quiet(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def quiet(engine: Any, started: Any) -> bool:
        return True  # the store has the run's terminal status already

    monkeypatch.setattr(ops, "_quiet", quiet)

    async def body() -> list[Any]:
        host = _Host(store)
        events = host.hub.subscribe()
        return [a async for a in ops.handle(host, SyncAction(wait=True), "alice", events)]

    answers = asyncio.run(body())
    assert isinstance(answers[2], SyncResult)
    statuses = [a.status for a in answers if isinstance(a, Progress)]
    assert statuses == ["pending", "in_progress", "failed"]
