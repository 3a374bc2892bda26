"""Environment leases and fencing at the store level: two stores on one PostgreSQL schema,
as two replicas would open it (real PostgreSQL; skipped without one)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection, Iterable, Iterator

import pytest
from sqlalchemy.exc import OperationalError

from reconciler.output import show_deployment
from reconciler.replicas import Replica, assign
from reconciler.store import StatusStep, Store, verify
from reconciler.store.fence import FENCE, Fence, LeaseLost
from reconciler.store.holder import DatabaseHeld, DatabaseLock
from reconciler.store.leases import ReplicaIdentity
from tests.support import wait_for
from tests.test_store import at, new

pytestmark = pytest.mark.postgres


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[Store, Store]]:
    a, b = Store.from_url(pg_url), Store.from_url(pg_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _expired(store: Store, env: str) -> bool:
    return any(lease.environment == env and lease.expired for lease in store.leases())


def test_two_replicas_claiming_at_once_one_wins(stores: tuple[Store, Store]) -> None:
    a, b = stores
    barrier = threading.Barrier(2)
    won: dict[str, dict[str, int]] = {}

    def claim(store: Store, me: str) -> None:
        barrier.wait()
        won[me] = store.claim_leases(me, [f"env{i}" for i in range(20)], 30.0)

    threads = [threading.Thread(target=claim, args=(s, me)) for s, me in ((a, "A"), (b, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each environment went to exactly one of them, at generation 1.
    assert set(won["A"]) | set(won["B"]) == {f"env{i}" for i in range(20)}
    assert not set(won["A"]) & set(won["B"])
    assert set(won["A"].values()) | set(won["B"].values()) == {1}
    # A held lease is not taken; renewing keeps what each holds.
    assert b.claim_leases("B", list(won["A"]), 30.0) == {}
    assert a.renew_leases("A", 30.0) == won["A"]


def test_an_expired_lease_is_claimed_at_the_next_generation_and_lost_by_its_holder(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    assert a.claim_leases("A", ["staging"], 0.5) == {"staging": 1}
    wait_for(lambda: _expired(b, "staging"), what="the lease to expire (database clock)")
    assert b.claim_leases("B", ["staging"], 30.0) == {"staging": 2}
    assert a.renew_leases("A", 30.0) == {}  # lost: the replica stops treating it as its own
    # Released, then claimed again: the generation still rises.
    assert b.release_lease("B", "staging", 2)
    assert not b.release_lease("B", "staging", 2)
    assert a.claim_leases("A", ["staging"], 30.0) == {"staging": 3}


def test_a_former_holder_cannot_record_over_the_new_one(
    stores: tuple[Store, Store], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = stores
    assert a.claim_leases("A", ["staging"], 0.5) == {"staging": 1}
    token = FENCE.set(Fence("A", "staging", 1))
    try:
        rec = a.create_deployment(new("staging"))
        a.set_status(rec.id, "in_progress", at=at(1))
        a.append_log(rec.id, [("stdout", "starting", at(1))])
    finally:
        FENCE.reset(token)
    wait_for(lambda: _expired(b, "staging"), what="the lease to expire")
    # B claims, and recovers what A left running.
    assert b.claim_leases("B", ["staging"], 30.0) == {"staging": 2}
    assert b.interrupt_unfinished(message="interrupted", at=at(5), environments=["staging"]) == [
        rec.id
    ]
    token = FENCE.set(Fence("A", "staging", 1))
    try:
        # A paused past its lease and wakes: its writes are refused ...
        with pytest.raises(LeaseLost):
            a.add_event(
                rec.id, status="in_progress", message="50%", percent=50, details=None, at=at(6)
            )
        with pytest.raises(LeaseLost):
            a.append_log(rec.id, [("stdout", "late line", at(6))])
        with pytest.raises(LeaseLost):
            a.create_deployment(new("staging", version="2.0"))
        with pytest.raises(LeaseLost):  # the executor's in_progress with its process group
            a.set_statuses(rec.id, [StatusStep("in_progress", at(6))], run_process=(99, "t"))
        # ... and its terminal result is kept beside the record, not over it: by itself,
        # or at the end of several steps in one transaction (a run that ended at once).
        official = a.set_status(rec.id, "completed", at=at(7), message="api is at 1.0.0")
        steps = [StatusStep("in_progress", at(8)), StatusStep("timed_out", at(8))]
        also = a.set_statuses(rec.id, steps, run_process=(99, "t"))
    finally:
        FENCE.reset(token)
    assert official.status == also.status == "failed"
    shown = b.get_deployment(rec.id, with_progress=True, with_log=True)
    assert shown is not None and shown.status == "failed"
    assert shown.unconfirmed is not None and len(shown.unconfirmed) == 2
    late = shown.unconfirmed[0]
    assert (late["replica"], late["generation"], late["status"]) == ("A", 1, "completed")
    assert shown.unconfirmed[1]["status"] == "timed_out"
    assert b.unfinished_processes() == []  # the fenced-off process group was not recorded
    assert shown.to_json()["unconfirmed"][0]["status"] == "completed"
    show_deployment(shown)  # `reconciler show`
    assert "Unconfirmed: completed at" in capsys.readouterr().out
    assert [line.line for line in shown.log or []] == ["starting"]
    # B, the holder, writes under its own fence.
    token = FENCE.set(Fence("B", "staging", 2))
    try:
        again = b.create_deployment(new("staging", version="1.0.0"))
        b.set_status(again.id, "completed", at=at(9))
    finally:
        FENCE.reset(token)
    assert b.history(environment="staging", limit=5)[0].status == "completed"
    assert verify(b).ok


def test_heartbeats_say_who_is_alive(stores: tuple[Store, Store]) -> None:
    a, b = stores
    one = ReplicaIdentity("one", "host-a", 1, "/srv/a", "0.1.0")
    two = ReplicaIdentity("two", "host-b", 2, "/srv/b", "0.1.0")
    a.heartbeat(one)
    b.heartbeat(two)
    a.claim_leases("one", ["x", "y"], 30.0)
    assert a.live_replicas(30.0) == ["one", "two"]
    rows = {r.id: r for r in b.replicas()}
    assert rows["one"].leases == 2 and rows["two"].leases == 0 and rows["one"].host == "host-a"
    wait_for(lambda: a.live_replicas(0.3) == [], what="heartbeats to age")
    b.heartbeat(two)
    assert a.live_replicas(0.3) == ["two"]
    a.leave("one")  # a clean stop frees its leases at once
    assert b.claim_leases("two", ["x"], 30.0) == {"x": 2}
    assert [r.id for r in b.replicas()] == ["two"]


def test_rendezvous_shares_evenly_and_moves_little() -> None:
    envs = [f"env{i:02d}" for i in range(30)]
    before = assign(envs, ["r1", "r2", "r3"])
    counts = {r: sum(1 for o in before.values() if o == r) for r in ("r1", "r2", "r3")}
    assert counts == {"r1": 10, "r2": 10, "r3": 10}
    after = assign(envs, ["r1", "r3"])
    assert sorted(after.values()).count("r1") == 15
    moved = {e for e in envs if before[e] != after[e]}
    left = {e for e in envs if before[e] == "r2"}
    assert left <= moved and len(moved - left) <= 5, sorted(moved - left)
    # The same answer whatever order the names come in (every replica computes it).
    assert assign(reversed(envs), ["r3", "r1", "r2"]) == before


def test_daemons_share_the_database_lock_and_a_standalone_command_is_refused(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    one, two = DatabaseLock(a.engine), DatabaseLock(b.engine)
    one.acquire(role="daemon", state_dir="/srv/one", at=at(0), shared=True)
    two.acquire(role="daemon", state_dir="/srv/two", at=at(0), shared=True)
    a.heartbeat(ReplicaIdentity("one", "host-a", 1, "/srv/one", "0.1.0"))
    command = DatabaseLock(b.engine)
    try:
        with pytest.raises(DatabaseHeld, match="replicas") as refused:
            command.acquire(role="deploy", state_dir="/srv/cmd", at=at(0))
        assert "\n" not in str(refused.value)
    finally:
        one.release()
        two.release()
    # Both gone: the command deploys alone, and a daemon waits for it to end.
    command.acquire(role="deploy", state_dir="/srv/cmd", at=at(0))
    try:
        with pytest.raises(DatabaseHeld, match="/srv/cmd"):
            one.acquire(role="daemon", state_dir="/srv/one", at=at(0), shared=True)
    finally:
        command.release()


class _Runners:
    """What `Replica` asks of the runner pool: which environments run, and stopping them."""

    def __init__(self) -> None:
        self.busy: set[str] = set()
        self.abandoned: list[str] = []
        self.locks: dict[str, asyncio.Lock] = {}

    def env_lock(self, env: str) -> asyncio.Lock:
        return self.locks.setdefault(env, asyncio.Lock())

    async def abandon(self, environments: Iterable[str]) -> None:
        self.abandoned.extend(sorted(environments))


class _Engine:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.runners = _Runners()
        self.stopping = False
        self.recovered: list[str] = []
        self.woken: list[str] = []

    async def recover(self, environments: Collection[str] | None = None) -> list[int]:
        self.recovered.extend(environments or [])
        return []

    def wake(self, environments: Iterable[str]) -> None:
        self.woken.extend(environments)


def test_a_replica_claims_shares_and_gives_up_what_it_cannot_renew(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    envs = [f"e{i}" for i in range(6)]

    def replica(store: Store, name: str) -> tuple[Replica, _Engine]:
        engine = _Engine(store)
        me = ReplicaIdentity(name, "host", 1, f"/srv/{name}", "0.1.0")
        return Replica(engine, ttl=2.0, environments=lambda: envs, identity=me), engine  # type: ignore[arg-type]

    async def scenario() -> None:
        one, engine_one = replica(a, "one")
        await one.rebalance()  # alone: it claims everything, recovers it, wakes it
        assert one.held == dict.fromkeys(envs, 1)
        assert sorted(engine_one.recovered) == envs and sorted(engine_one.woken) == envs

        two, _ = replica(b, "two")
        engine_one.runners.busy.add("e0")  # a deployment runs there: kept until it ends
        await two.rebalance()  # joins: nothing free yet
        assert two.held == {}
        await one.rebalance()  # sees two: releases its share, but not the busy one
        share = {env for env, r in assign(envs, ["one", "two"]).items() if r == "two"}
        assert len(share) == 3
        released = share - {"e0"}
        assert set(one.held) == set(envs) - released
        await two.rebalance()
        assert set(two.held) == released and set(two.held.values()) == {2}
        engine_one.runners.busy.clear()
        await one.rebalance()
        await two.rebalance()
        assert set(two.held) == share and set(one.held) == set(envs) - share

        # The database away: within the lease it keeps its environments, past LAPSE of
        # lease_ttl it gives them up (before they expire in the database's clock).
        def away(*_: object) -> None:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

        a.heartbeat = away  # type: ignore[method-assign]
        engine_one.runners.abandoned.clear()
        await one.rebalance()
        assert set(one.held) == set(envs) - share and engine_one.runners.abandoned == []
        assert one._renewed_at is not None
        one._renewed_at -= 2.0
        await one.rebalance()
        assert one.held == {} and set(engine_one.runners.abandoned) == set(envs) - share

    asyncio.run(scenario())
