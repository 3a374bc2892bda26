"""Notices between replicas (reconciler.bus): what they cost a deployment's writes, and
how soon another process hears them.

* ``Store.add_event`` (a provider's progress report: one transaction) with its ``progress``
  notice vs the same write without, interleaved in one run: wall time and this process's
  CPU per write. SQLite: with a started in-process bus subscribed as the daemon's vs
  none; PostgreSQL: with the ``pg_notify`` vs ``notices.notify`` switched off;
* PostgreSQL: the delay from a write's commit to a `PostgresBus` subscriber's callback, in
  the same process but through the server (the listener is its own connection, as on a
  replica).

Needs PostgreSQL: ``RECONCILER_TEST_POSTGRES_URL`` or ``--postgres URL`` (a schema
``bench_<random>`` is created for the run and dropped after it). Exits 1 on a missed target.

    .venv/bin/python bench/bench_notices.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from _common import Table, cpu_now, machine, median, ms, percentile, ratio, say
from bench_store import postgres_schema

from reconciler.bus import PostgresBus, open_bus
from reconciler.store import NewDeployment, Store, notices

#: Per write, the notice may add at most this share of the write's CPU time (PostgreSQL:
#: one more statement in the transaction; SQLite: handing it to the loop after commit).
MAX_OVERHEAD = 0.35
MAX_SQLITE = 0.15
#: A subscriber hears a committed write within this (95th percentile).
MAX_DELAY_P95 = 0.050


def _deployment(store: Store) -> int:
    return store.create_deployment(
        NewDeployment(
            environment="bench",
            service="api",
            version="1.0",
            previous_version=None,
            provider="local",
            provider_type="command",
            strategy={},
            trigger="manual",
            commit=None,
            commit_author=None,
            attempt=1,
            timeout_seconds=60,
            params={},
        )
    ).id


def _writes(store: Store, deployment_id: int, n: int) -> tuple[list[float], float]:
    """n progress events: each write's wall time, and the CPU of all of them."""
    at = datetime.now(UTC)
    times = []
    cpu = cpu_now()
    for i in range(n):
        started = time.perf_counter()
        store.add_event(
            deployment_id,
            status="in_progress",
            message=f"step {i}",
            percent=None,
            details=None,
            at=at,
        )
        times.append(time.perf_counter() - started)
    return times, cpu_now() - cpu


def write_cost(
    table: Table,
    label: str,
    store: Store,
    n: int,
    rounds: int,
    switch: Callable[[bool], None],
    target: float,
) -> None:
    """``Store.add_event`` with notices (``switch(True)``) and without, interleaved so
    that the machine's load hits both alike."""
    deployment_id = _deployment(store)
    _writes(store, deployment_id, 50)  # warm the pool and the statement caches
    with_notice: list[float] = []
    without: list[float] = []
    cpu_with = cpu_without = 0.0
    for _ in range(rounds):
        switch(True)
        times, cpu = _writes(store, deployment_id, n)
        with_notice += times
        cpu_with += cpu
        switch(False)
        times, cpu = _writes(store, deployment_id, n)
        without += times
        cpu_without += cpu
    a, b = median(with_notice), median(without)
    table.add(f"{label}: add_event wall, median", ms(a, 3), ms(b, 3) + " (no notice)", ratio(a, b))
    count = n * rounds
    cpu_ratio = ratio(cpu_with, cpu_without)
    table.add(  # the target is on CPU: wall times follow the machine's load
        f"{label}: add_event CPU per write",
        ms(cpu_with / count, 3),
        ms(cpu_without / count, 3) + " (no notice)",
        cpu_ratio,
        f"<= +{target:.0%}",
        cpu_ratio - 1 <= target,
    )


def postgres_switch() -> Callable[[bool], None]:
    """Notices on: the store's ``pg_notify``; off: none sent."""
    real = notices.notify

    def switch(on: bool) -> None:
        notices.notify = real if on else (lambda *_args, **_kw: None)  # type: ignore[assignment]

    return switch


def sqlite_switch(url: str, engine: Any) -> Callable[[bool], None]:
    """Notices on: a started in-process `Bus` subscribed as the daemon's is (``head``,
    ``env``; on SQLite nobody else runs deployments, so no ``progress``), its loop in a
    thread; off: the bus stopped (the store then sends nothing)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    bus = open_bus(url, engine)
    for topic in ("head", "env"):
        bus.subscribe(topic, lambda _payload: None)

    def switch(on: bool) -> None:
        asyncio.run_coroutine_threadsafe(bus.start() if on else bus.stop(), loop).result()

    return switch


async def _delays(url: str, store: Store, n: int) -> list[float]:
    bus = open_bus(url)
    assert isinstance(bus, PostgresBus)
    await bus.start()
    heard: asyncio.Queue[float] = asyncio.Queue()
    bus.subscribe("progress", lambda _payload: heard.put_nowait(time.perf_counter()))
    deployment_id = await asyncio.to_thread(_deployment, store)
    await heard.get()
    at = datetime.now(UTC)
    delays = []
    try:
        for i in range(n):
            committed = await asyncio.to_thread(_timed_write, store, deployment_id, i, at)
            delays.append(await heard.get() - committed)
    finally:
        await bus.stop()
    return delays


def _timed_write(store: Store, deployment_id: int, i: int, at: datetime) -> float:
    store.add_event(
        deployment_id, status="in_progress", message=f"d{i}", percent=None, details=None, at=at
    )
    return time.perf_counter()  # after COMMIT returned: the earliest a notice can leave


def delay(table: Table, url: str, store: Store, n: int) -> None:
    delays = asyncio.run(_delays(url, store, n))
    p95 = percentile(delays, 95)
    table.add("commit -> subscriber, median", ms(median(delays), 2))
    table.add(
        "commit -> subscriber, p95",
        ms(p95, 2),
        target=f"<= {ms(MAX_DELAY_P95, 0)}",
        met=p95 <= MAX_DELAY_P95,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("RECONCILER_TEST_POSTGRES_URL"))
    parser.add_argument("--writes", type=int, default=300, help="writes per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delays", type=int, default=300, help="notices timed end to end")
    args = parser.parse_args()
    if not args.postgres:
        say("bench_notices: needs PostgreSQL (RECONCILER_TEST_POSTGRES_URL or --postgres)")
        sys.exit(2)
    table = Table(f"Notices between replicas ({machine()})")
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.sqlite"
        store = Store.from_url(url)
        try:
            switch = sqlite_switch(url, store.engine)
            write_cost(table, "SQLite", store, args.writes, args.rounds, switch, MAX_SQLITE)
        finally:
            store.close()
    with postgres_schema(args.postgres) as url:
        store = Store.from_url(url)
        try:
            switch = postgres_switch()
            write_cost(table, "PostgreSQL", store, args.writes, args.rounds, switch, MAX_OVERHEAD)
            switch(True)  # the notices back on, for the delays
            delay(table, url, store, args.delays)
        finally:
            store.close()
    table.print()
    sys.exit(0 if all(r.met is not False for r in table.rows) else 1)


if __name__ == "__main__":
    main()
