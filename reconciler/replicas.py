"""Several daemons on one PostgreSQL database: each deploys the environments it leases.

Every replica runs `Replica.rebalance` every ``[daemon] lease_renew`` (a third of
``lease_ttl`` by default), and whenever something may have changed (the integrator's
LISTEN/NOTIFY bus calls it when a replica joins or leaves). One pass:

1. heartbeat (the `replicas` row, database clock) and renew every lease it holds; a lease
   that did not renew (expired, claimed by another) is *lost*: its runner is stopped;
2. read the live replicas (heartbeat younger than ``lease_ttl``) and rank them for each
   environment of the desired state by rendezvous hashing (highest ``sha256(replica,
   environment)`` wins) with a bounded load (`assign`): every replica computes the same
   owner with no coordination, each gets its share, and a replica joining or leaving
   moves few environments besides its own;
3. claim the environments it ranks first for whose lease is free or expired (one
   conditional upsert each: no race), and recover what the previous holder left running
   there (its orphaned deployments recorded ``interrupted``), then wake them;
4. release the environments it holds but no longer ranks first for, once none of its
   deployments runs there (the environment's lock is taken for the release, so no run
   starts in between).

A replica that cannot reach the database stops treating its environments as its own
once its last successful renewal is older than LAPSE of ``lease_ttl``: before the lease
expires in the database's clock, so that the next holder never overlaps with it. Its late
writes are fenced off anyway (reconciler/store/fence.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable

from reconciler import __version__
from reconciler.engine import Engine
from reconciler.store.fence import Fence
from reconciler.store.leases import ReplicaIdentity

log = logging.getLogger(__name__)

#: Share of lease_ttl after the last successful renewal at which a replica that cannot
#: renew gives its environments up (the lease itself expires at 1.0, database clock).
LAPSE = 0.8
#: Replicas silent for this many lease_ttl are forgotten (`status --replicas` shows the
#: others, the recently gone ones included).
FORGET_AFTER_TTLS = 100


def rank(replica: str, environment: str) -> bytes:
    """The rendezvous score of a replica for an environment (higher wins)."""
    return hashlib.sha256(f"{replica}\x00{environment}".encode()).digest()


def assign(environments: Iterable[str], replicas: Collection[str]) -> dict[str, str]:
    """Which live replica should run each environment: rendezvous hashing with a bounded
    load. Environments in name order each go to the highest-ranked replica that has fewer
    than ``ceil(environments / replicas)`` yet, so that the work is shared evenly (plain
    rendezvous hashing leaves one replica a quarter more than another at 60 environments),
    while a replica joining or leaving still moves few environments. Every replica
    computes the same answer from the same names, with no coordination."""
    live = sorted(set(replicas))
    envs = sorted(set(environments))
    if not live:
        return {}
    cap = -(-len(envs) // len(live))
    load = dict.fromkeys(live, 0)
    out: dict[str, str] = {}
    for env in envs:
        for replica in sorted(live, key=lambda r: rank(r, env), reverse=True):
            if load[replica] < cap:
                out[env] = replica
                load[replica] += 1
                break
    return out


def new_identity(state_dir: str) -> ReplicaIdentity:
    host = socket.gethostname()
    pid = os.getpid()
    return ReplicaIdentity(
        id=f"{host}:{pid}:{secrets.token_hex(3)}",
        host=host,
        pid=pid,
        state_dir=state_dir,
        version=__version__,
    )


class Replica:
    """This daemon's membership and leases (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        ttl: float,
        environments: Callable[[], Iterable[str]],
        identity: ReplicaIdentity,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.ttl = ttl
        self.environments = environments
        self.me = identity
        self.held: dict[str, int] = {}  # environment -> lease generation
        self.live: list[str] = []
        self._renewed_at: float | None = None  # monotonic start of the last good renewal
        self._lock = asyncio.Lock()  # one pass at a time
        # Told of environments just claimed, once recovered, before their runners wake:
        # what this replica read of them while another held them is stale (the daemon's
        # in-memory fleet summary reads them again).
        self.on_gained: Callable[[list[str]], None] | None = None
        # Told when the others should rebalance now rather than at their next pass: this
        # replica joined ("joined"), gave environments up ("released") or left ("left").
        # The daemon announces it over the bus; a missed notice only costs a pass's wait.
        self.on_change: Callable[[str], Awaitable[None]] | None = None

    def fence(self, environment: str) -> Fence | None:
        generation = self.held.get(environment)
        if generation is None:
            return None
        return Fence(self.me.id, environment, generation)

    def holds(self, environment: str) -> bool:
        return environment in self.held

    async def rebalance(self) -> None:
        """One pass (see the module docstring); callable at any time (passes never overlap),
        never raises: what failed (the database away) is logged and tried at the next."""
        async with self._lock:
            try:
                await self._rebalance()
            except Exception as exc:
                log.error(
                    "event=rebalance_failed error=%r",
                    f"{type(exc).__name__}: {exc}".splitlines()[0],
                )

    async def _rebalance(self) -> None:
        store = self.store
        started = time.monotonic()
        try:
            await asyncio.to_thread(store.heartbeat, self.me)
            renewed = await asyncio.to_thread(store.renew_leases, self.me.id, self.ttl)
            live = await asyncio.to_thread(store.live_replicas, self.ttl)
        except Exception as exc:
            log.error(
                "event=lease_renew_failed error=%r", f"{type(exc).__name__}: {exc}".splitlines()[0]
            )
            lapsed = self._renewed_at is None or started - self._renewed_at > self.ttl * LAPSE
            if self.held and lapsed:
                await self._lose(set(self.held), "not renewed in time")
            return
        joined = self._renewed_at is None
        self._renewed_at = started
        if joined:
            await self._tell("joined")
        self.live = live if self.me.id in live else sorted([*live, self.me.id])
        lost = {env for env, gen in self.held.items() if renewed.get(env) != gen}
        if lost:
            await self._lose(lost, "renewal refused (expired or claimed)")
        adopted = {env: gen for env, gen in renewed.items() if env not in self.held}
        self.held.update(renewed)
        plan = assign(self.environments(), self.live)
        wanted = {env for env, replica in plan.items() if replica == self.me.id}
        if self.engine.stopping:
            wanted &= set(self.held)  # a stopping replica claims nothing new
        claim = wanted - set(self.held)
        won = await asyncio.to_thread(store.claim_leases, self.me.id, claim, self.ttl)
        gained = {**adopted, **won}
        if gained:
            await self._gain(gained)
        released = [env for env in sorted(set(self.held) - wanted) if await self._release(env)]
        if released:
            await self._tell("released")

    async def _tell(self, change: str) -> None:
        if self.on_change is not None:
            await self.on_change(change)

    async def _gain(self, gained: dict[str, int]) -> None:
        self.held.update(gained)
        envs = sorted(gained)
        log.info(
            "event=leases_gained environments=%s generations=%s",
            ",".join(envs),
            ",".join(str(gained[e]) for e in envs),
        )
        await self.engine.recover(envs)
        if self.on_gained is not None:
            self.on_gained(envs)
        self.engine.wake(envs)

    async def _lose(self, lost: set[str], why: str) -> None:
        for env in lost:
            self.held.pop(env, None)
        log.warning("event=leases_lost environments=%s reason=%r", ",".join(sorted(lost)), why)
        await self.engine.runners.abandon(lost)

    async def _release(self, env: str) -> bool:
        """Give up an environment another live replica ranks first for, unless it is busy;
        whether it was given up."""
        runners = self.engine.runners
        if env in runners.busy:
            return False  # a deployment runs there: at a later pass
        generation = self.held.pop(env, None)  # from now on its runner plans nothing there
        if generation is None:
            return False
        await runners.abandon([env])  # a runner waiting for a slot there stops waiting
        async with runners.env_lock(env):
            try:
                await asyncio.to_thread(self.store.release_lease, self.me.id, env, generation)
            except Exception as exc:  # it expires by itself
                log.warning("event=lease_release_failed environment=%s error=%r", env, str(exc))
        log.info("event=lease_released environment=%s", env)
        return True

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Rebalance every ``interval`` seconds until ``stop``; forget long-gone replicas."""
        while not stop.is_set():
            await self.rebalance()
            with contextlib.suppress(Exception):  # the next pass tries again
                await asyncio.to_thread(self.store.prune_replicas, self.ttl * FORGET_AFTER_TTLS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def leave(self) -> None:
        """At a clean stop (after the runners ended): free the leases at once."""
        self.held.clear()
        try:
            await asyncio.to_thread(self.store.leave, self.me.id)
        except Exception as exc:  # they expire by themselves within lease_ttl
            log.warning("event=replica_leave_failed error=%r", str(exc))
            return
        await self._tell("left")
