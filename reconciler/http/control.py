"""What the HTTP server needs from the daemon: one small protocol, implemented in daemon.py.

The server never reaches into the engine: everything it shows or does goes through here,
so tests can drive the HTTP layer with a fake control over a real store and event hub.
"""

from __future__ import annotations

from typing import Protocol

from reconciler.channel import Accepted, DeployAction, RollbackAction, SuspendAction
from reconciler.config import Config
from reconciler.events import EventHub
from reconciler.plan import Decision
from reconciler.store import LedgerCheck, Store


class Control(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def hub(self) -> EventHub: ...

    def is_ready(self) -> bool:
        """Migrations ran and the first fetch succeeded."""
        ...

    def last_fetch_error(self) -> str | None:
        """The last fetch's error, one line, or None when the last fetch worked."""
        ...

    async def status(self, environment: str | None) -> tuple[str | None, list[Decision]]:
        """(last synced commit sha, one decision per service), optionally for one environment."""
        ...

    def request_sync(self, trigger: str) -> None:
        """Ask for a sync ("manual" | "webhook"): coalesced with others, returns at once."""
        ...

    async def retry(self, environment: str, service: str, origin: str | None = None) -> None:
        """An operator asks to retry a service that gave up; KeyError if unknown."""
        ...

    async def act(
        self,
        action: DeployAction | RollbackAction | SuspendAction,
        actor: str,
        origin: str | None = None,
    ) -> Accepted:
        """Carry out an operator action (as over the control socket); `Refused` if not."""
        ...

    def queue_depth(self) -> int:
        """Environments with work due or running."""
        ...

    def lease_counts(self) -> tuple[int, int]:
        """(live replicas sharing the database, environment leases this one holds), as of
        the last lease pass; (1, 0) on SQLite (single-replica)."""
        ...

    def notification_stats(self) -> dict[str, dict[str, int]]:
        """Per notification target: delivered/failed/suppressed/dead counts since start."""
        ...

    def drifted_services(self) -> dict[str, int]:
        """Per environment: services whose live version differs from the deployed one."""
        ...

    def ledger_check(self) -> LedgerCheck | None:
        """The daemon's latest walk of the audit ledger, None before the first one."""
        ...
