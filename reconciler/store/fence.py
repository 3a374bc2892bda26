"""Fencing: a replica's writes for an environment count only while it holds the lease.

Several replicas on one PostgreSQL database each deploy the environments they hold a
lease on (`environment_leases`, see leases.py). A replica that paused past its lease (a
GC pause, a network partition, a stopped VM) may wake and go on writing while another
replica has claimed the environment. Each claim raises the lease's ``generation``; the
holder's writes carry the generation they were started under (the `FENCE` context
variable, set by the runner around a job: every store call made from that task, and from
the worker threads it hands them to, sees it) and are checked in their own transaction
against the lease row, read ``FOR SHARE`` so that a claim waits for them to commit.

A write whose fence fails is refused (`LeaseLost`), except a terminal status: that one is
kept in `unconfirmed_results`, beside the deployment, never over the new holder's record.

No fence set (SQLite, a standalone command, a single daemon): no check, no cost.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from reconciler.store import models
from reconciler.store.records import StoreError

_L = models.environment_leases
_D = models.deployments
_U = models.unconfirmed_results


@dataclass(frozen=True, slots=True)
class Fence:
    """Who writes (a replica id) under which generation of an environment's lease."""

    replica: str
    environment: str
    generation: int


class LeaseLost(StoreError):
    """The writer no longer holds the environment's lease at this generation."""


#: The fence of the job the current task runs (None: unfenced).
FENCE: ContextVar[Fence | None] = ContextVar("reconciler_fence", default=None)


def _holds(conn: Connection, fence: Fence) -> bool:
    query = (
        select(_L.c.generation)
        .where(
            _L.c.environment == fence.environment,
            _L.c.holder == fence.replica,
            _L.c.generation == fence.generation,
        )
        .with_for_update(read=True)
    )
    return conn.execute(query).first() is not None


def check(conn: Connection, environment: str | None = None) -> Fence | None:
    """Raise `LeaseLost` unless the current fence (if any) still holds, in ``conn``'s
    transaction (the lease row stays share-locked until it ends). ``environment``: the one
    written for, when known (a write for another environment than the fence's is refused)."""
    fence = FENCE.get()
    if fence is None:
        return None
    if (environment is not None and environment != fence.environment) or not _holds(conn, fence):
        raise LeaseLost(
            f"lease on environment {fence.environment} (generation {fence.generation}) "
            f"is no longer held by replica {fence.replica}"
        )
    return fence


def holds(conn: Connection) -> bool:
    """Whether the current fence (if any) still holds (True when there is none)."""
    fence = FENCE.get()
    return fence is None or _holds(conn, fence)


def keep_unconfirmed(
    conn: Connection,
    deployment_id: int,
    status: str,
    *,
    at: datetime,
    message: str | None,
    error_message: str | None,
    recorded_at: datetime,
) -> None:
    """Record a fenced-off terminal result beside the deployment."""
    fence = FENCE.get()
    assert fence is not None
    conn.execute(
        insert(_U).values(
            deployment_id=deployment_id,
            replica=fence.replica,
            generation=fence.generation,
            status=status,
            message=message,
            error_message=error_message,
            at=at,
            recorded_at=recorded_at,
        )
    )


def unconfirmed_of(conn: Connection, deployment_id: int) -> list[dict[str, Any]]:
    """The unconfirmed results kept beside a deployment, oldest first."""
    rows = conn.execute(
        select(_U).where(_U.c.deployment_id == deployment_id).order_by(_U.c.id)
    ).all()
    return [
        {
            "replica": r.replica,
            "generation": r.generation,
            "status": r.status,
            "message": r.message,
            "error_message": r.error_message,
            "at": r.at,
        }
        for r in rows
    ]
