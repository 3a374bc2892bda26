"""Replicas and environment leases (PostgreSQL): who is alive, who deploys what.

A mixin of `Store`. Every time is the database's clock (``now()``), never a host's: the
replicas' clocks may disagree, the database's is the one they share. Leases are rows,
not advisory locks: an advisory lock has no number that rises at every change of hands,
and fencing (fence.py) needs one, the ``generation``, to tell a late write of a former
holder from the current holder's. A claim is one conditional ``INSERT ... ON CONFLICT DO
UPDATE ... WHERE`` (free or expired only): two replicas claiming at once cannot both win,
there is no check-then-act gap.

On SQLite (single-replica) none of this is used: `replicas` and `leases` answer empty.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select, text

from reconciler.store import models
from reconciler.store.records import format_time

_R = models.replicas
_L = models.environment_leases

_TTL = "(CAST(:ttl AS double precision) * interval '1 second')"

_CLAIM = text(
    "INSERT INTO environment_leases AS l (environment, holder, generation, expires_at)"
    f" VALUES (:e, :me, 1, now() + {_TTL})"
    " ON CONFLICT (environment) DO UPDATE"
    " SET holder = EXCLUDED.holder, generation = l.generation + 1,"
    " expires_at = EXCLUDED.expires_at"
    " WHERE l.holder IS NULL OR l.expires_at <= now()"
    " RETURNING l.generation"
)
_RENEW = text(
    f"UPDATE environment_leases SET expires_at = now() + {_TTL}"
    " WHERE holder = :me AND expires_at > now() RETURNING environment, generation"
)
_RELEASE = text(
    "UPDATE environment_leases SET holder = NULL, expires_at = now()"
    " WHERE environment = :e AND holder = :me AND generation = :g"
)
_RELEASE_ALL = text(
    "UPDATE environment_leases SET holder = NULL, expires_at = now() WHERE holder = :me"
)
_HEARTBEAT = text(
    "INSERT INTO replicas AS r (id, host, pid, state_dir, version, started_at, heartbeat_at)"
    " VALUES (:id, :host, :pid, :state_dir, :version, now(), now())"
    " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()"
)
_LIVE = text(f"SELECT id FROM replicas WHERE heartbeat_at > now() - {_TTL} ORDER BY id")
_PRUNE = text(f"DELETE FROM replicas WHERE heartbeat_at < now() - {_TTL}")


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    id: str
    host: str
    pid: int
    state_dir: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    age_seconds: float  # since the last heartbeat, by the database's clock
    leases: int  # environments it holds (unexpired)

    def to_json(self, ttl: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "state_dir": self.state_dir,
            "version": self.version,
            "started_at": format_time(self.started_at),
            "heartbeat_at": format_time(self.heartbeat_at),
            "heartbeat_age_seconds": round(self.age_seconds, 3),
            "live": self.age_seconds < ttl,
            "leases": self.leases,
        }


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    environment: str
    holder: str | None
    generation: int
    expires_at: datetime
    expired: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "holder": self.holder,
            "generation": self.generation,
            "expires_at": format_time(self.expires_at),
            "expired": self.expired,
        }


@dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    id: str
    host: str
    pid: int
    state_dir: str
    version: str


class LeaseQueries:
    """Replica heartbeats and environment leases (mixed into `Store`; PostgreSQL)."""

    engine: Engine
    _writer: Engine

    def _pg(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def heartbeat(self, me: ReplicaIdentity) -> None:
        """Say this replica is alive (its row is made the first time, or again if pruned)."""
        with self._writer.begin() as conn:
            conn.execute(
                _HEARTBEAT,
                {
                    "id": me.id,
                    "host": me.host,
                    "pid": me.pid,
                    "state_dir": me.state_dir,
                    "version": me.version,
                },
            )

    def live_replicas(self, ttl: float) -> list[str]:
        """The ids of the replicas whose heartbeat is younger than ``ttl`` seconds."""
        if not self._pg():
            return []
        with self.engine.connect() as conn:
            return [str(r) for r in conn.execute(_LIVE, {"ttl": ttl}).scalars()]

    def claim_leases(self, me: str, environments: Collection[str], ttl: float) -> dict[str, int]:
        """Claim each environment whose lease is free or expired: {environment: generation}
        of those won (each generation one above the last holder's)."""
        won: dict[str, int] = {}
        if not environments:
            return won
        with self._writer.begin() as conn:
            for env in sorted(environments):
                generation = conn.execute(_CLAIM, {"e": env, "me": me, "ttl": ttl}).scalar()
                if generation is not None:
                    won[env] = int(generation)
        return won

    def renew_leases(self, me: str, ttl: float) -> dict[str, int]:
        """Extend every unexpired lease this replica holds: {environment: generation} of
        those it still holds (an expired one may have been claimed by another: lost)."""
        with self._writer.begin() as conn:
            rows = conn.execute(_RENEW, {"me": me, "ttl": ttl}).all()
        return {str(r.environment): int(r.generation) for r in rows}

    def release_lease(self, me: str, environment: str, generation: int) -> bool:
        """Give an environment up (the generation stays: the next claim raises it)."""
        with self._writer.begin() as conn:
            done = conn.execute(_RELEASE, {"e": environment, "me": me, "g": generation})
            return bool(done.rowcount)

    def leave(self, me: str) -> None:
        """A replica that stops: its leases freed at once, its row removed."""
        with self._writer.begin() as conn:
            conn.execute(_RELEASE_ALL, {"me": me})
            conn.execute(delete(_R).where(_R.c.id == me))

    def prune_replicas(self, older_than: float) -> int:
        """Forget replicas silent for ``older_than`` seconds (killed ones; their leases
        have long expired and are claimed by others)."""
        with self._writer.begin() as conn:
            return int(conn.execute(_PRUNE, {"ttl": older_than}).rowcount or 0)

    def replicas(self) -> list[ReplicaRecord]:
        """Every known replica, oldest first, with its heartbeat's age and lease count."""
        if not self._pg():
            return []
        held = (
            select(func.count())
            .where(_L.c.holder == _R.c.id, _L.c.expires_at > func.now())
            .scalar_subquery()
        )
        age = func.extract("epoch", func.now() - _R.c.heartbeat_at)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_R, age.label("age"), held.label("held")).order_by(_R.c.started_at, _R.c.id)
            ).all()
        return [
            ReplicaRecord(
                id=r.id,
                host=r.host,
                pid=r.pid,
                state_dir=r.state_dir,
                version=r.version,
                started_at=r.started_at,
                heartbeat_at=r.heartbeat_at,
                age_seconds=float(r.age),
                leases=int(r.held),
            )
            for r in rows
        ]

    def replicas_report(self, ttl: float) -> dict[str, Any]:
        """`reconciler status --replicas --json` and ``GET /api/v1/replicas``: the replicas
        (live: a heartbeat younger than ``ttl``) and every environment's lease."""
        return {
            "replicated": self._pg(),
            "lease_ttl_seconds": ttl,
            "replicas": [r.to_json(ttl) for r in self.replicas()],
            "leases": [lease.to_json() for lease in self.leases()],
        }

    def leases(self) -> list[LeaseRecord]:
        """Every environment lease, by environment."""
        if not self._pg():
            return []
        expired = (_L.c.expires_at <= func.now()).label("expired")
        with self.engine.connect() as conn:
            rows = conn.execute(select(_L, expired).order_by(_L.c.environment)).all()
        return [
            LeaseRecord(r.environment, r.holder, int(r.generation), r.expires_at, bool(r.expired))
            for r in rows
        ]
