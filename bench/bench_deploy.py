"""The cost of one deployment to the daemon: CPU per no-op deployment and deployments/s.

A real git repository of E environments x S services (default 50 x 10 = 500 services, all
new), a `command` provider running ``/bin/true``, ``max_parallel = 4``. A real Engine
in-process (real store, real mirror, real runners) syncs once (not measured), then every
environment is woken and the run lasts until the runners are idle: every service deployed
once, through the planner, the executor, the provider's process and the ledger. Measured
over that run:

* daemon CPU per deployment: ``time.process_time()`` (every thread of this process, the
  worker threads of the store included; the ``/bin/true`` children are not the daemon's
  and are reported on a row of their own from ``RUSAGE_CHILDREN``);
* deployments/s: deployments / wall time;
* write transactions per deployment: on SQLite the store's own counter
  (`reconciler.store.db.sqlite_writers`), on PostgreSQL an SQLAlchemy ``commit`` listener.

Baseline, in the same run and the same event loop: the process spawns alone (as many
``/bin/true`` through ``asyncio.create_subprocess_exec``, 4 at a time): the floor no
reconciler can go under. The first round warms up (imports, statement caches) and is not
counted; the figures are medians over ``--rounds`` rounds, each on a fresh state directory.

    .venv/bin/python bench/bench_deploy.py                 # SQLite, 50 x 10, 3 rounds
    .venv/bin/python bench/bench_deploy.py --full          # 100 x 20 = 2,000 deployments
    RECONCILER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
      .venv/bin/python bench/bench_deploy.py               # also PostgreSQL (own schema)

Exits 1 when a target it prints is missed (the PostgreSQL rows are reported, not judged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import Table, commit_all, fleet_file, machine, make_repo, median, ratio, say
from _common import write_config as _write_config
from sqlalchemy import create_engine, event, text

from reconciler.config import load_config
from reconciler.engine import Engine, open_source
from reconciler.providers import build_providers
from reconciler.store import Store
from reconciler.store.db import sqlite_writers

TARGET_CPU_MS = 5.0
TARGET_RATE = 150.0
PARALLEL = 4


@dataclass
class Round:
    deployments: int
    wall: float
    cpu: float
    children_cpu: float
    commits: int

    @property
    def cpu_ms(self) -> float:
        return self.cpu / self.deployments * 1e3

    @property
    def rate(self) -> float:
        return self.deployments / self.wall


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_fleet(tmp: Path, environments: int, services: int) -> Path:
    repo = make_repo(tmp / "desired")
    for i in range(environments):
        # No depends_on: every service is due at once, the runners never wait on another.
        repo.joinpath(f"env{i:04d}.yaml").write_text(fleet_file(i, services, depends=False))
    commit_all(repo, "fleet")
    return repo


def write_config(tmp: Path, repo: Path, database_url: str | None) -> Path:
    return _write_config(
        tmp,
        ["/bin/true"],
        repo=str(repo),
        watch=False,
        database_url=database_url,
        max_parallel=PARALLEL,
    )


async def deploy_all(config_path: Path) -> Round:
    config = load_config(config_path, environ={})
    store = Store.from_url(config.database_url, migrate=True)
    source = open_source(config)
    engine = Engine(config, store, source, build_providers(config))
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    # SQLite: the store's own count of write transactions. A "commit" listener would cost
    # what it measures: any connection event makes SQLAlchemy dispatch events around
    # every statement (the store keeps none for that reason). PostgreSQL: the listener.
    writers = sqlite_writers(store.engine)
    if writers is None:
        event.listen(store.engine, "commit", count)
    try:
        engine.runners_enabled = False  # the sync records the commit, wakes nothing
        await engine.sync("manual")
        engine.runners_enabled = True
        commits = 0
        written = writers.write_transactions if writers is not None else 0
        environments = list(engine.effective)
        cpu0, kids0, wall0 = time.process_time(), children_cpu(), time.perf_counter()
        engine.wake(environments)
        await engine.idle()
        wall = time.perf_counter() - wall0
        cpu, kids = time.process_time() - cpu0, children_cpu() - kids0
        if writers is not None:
            commits = writers.write_transactions - written
        done = len(store.history(limit=1_000_000))
        expected = sum(len(s.services) for s in engine.effective.values())
        bad = store.history(status="failed", limit=5)
        if done != expected or bad:
            raise SystemExit(f"expected {expected} completed deployments, got {done}: {bad}")
        return Round(done, wall, cpu, kids, commits)
    finally:
        if writers is None:
            event.remove(store.engine, "commit", count)
        await engine.stop(1.0)
        source.close()
        store.engine.dispose()


async def spawn_only(count: int) -> Round:
    slots = asyncio.Semaphore(PARALLEL)

    async def one() -> None:
        async with slots:
            proc = await asyncio.create_subprocess_exec(
                "/bin/true", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
            )
            await proc.communicate()

    cpu0, kids0, wall0 = time.process_time(), children_cpu(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    wall = time.perf_counter() - wall0
    return Round(count, wall, time.process_time() - cpu0, children_cpu() - kids0, 0)


def pg_database(base: str) -> tuple[str, Any]:
    """A database of its own on the shared server (dropped by the returned callable)."""
    name = f"bench_deploy_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def measure(tmp: Path, label: str, args: argparse.Namespace, pg: str | None) -> list[Round]:
    out: list[Round] = []
    for index in range(args.rounds + 1):
        work = tmp / f"{label}-{index}"
        work.mkdir()
        repo = make_fleet(work, args.environments, args.services)
        drop = None
        url = None
        if pg is not None:
            url, drop = pg_database(pg)
        try:
            result = asyncio.run(deploy_all(write_config(work, repo, url)))
        finally:
            if drop is not None:
                drop()
        say(
            f"  {label} round {index}{' (warm-up)' if index == 0 else ''}: "
            f"{result.deployments} deployments, {result.cpu_ms:.2f} ms CPU each, "
            f"{result.rate:.0f}/s, {result.commits / result.deployments:.2f} write transactions each"
        )
        if index:
            out.append(result)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100 x 20 = 2,000 deployments")
    parser.add_argument("--environments", type=int)
    parser.add_argument("--services", type=int)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median)")
    args = parser.parse_args()
    args.environments = args.environments or (100 if args.full else 50)
    args.services = args.services or (20 if args.full else 10)
    pg = os.environ.get("RECONCILER_TEST_POSTGRES_URL")
    total = args.environments * args.services
    say(f"bench_deploy: {args.environments} x {args.services} no-op deployments; {machine()}")

    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as name:
        tmp = Path(name)
        lite = measure(tmp, "sqlite", args, None)
        spawn = [asyncio.run(spawn_only(total)) for _ in range(args.rounds)]
        post = measure(tmp, "postgresql", args, pg) if pg else []

    def cpu(rounds: list[Round]) -> float:
        return median([r.cpu_ms for r in rounds])

    def rate(rounds: list[Round]) -> float:
        return median([r.rate for r in rounds])

    table = Table(
        f"bench_deploy: {total:,} no-op deployments (/bin/true), max_parallel {PARALLEL}; "
        f"{machine()}"
    )
    table.add(
        "daemon CPU per deployment, SQLite (median)",
        f"{cpu(lite):.2f} ms",
        f"{cpu(spawn):.2f} ms spawn only",
        ratio(cpu(lite), cpu(spawn)),
        f"< {TARGET_CPU_MS:g} ms",
        cpu(lite) < TARGET_CPU_MS,
    )
    table.add(
        "deployments/s, SQLite (median)",
        f"{rate(lite):.0f}/s",
        f"{rate(spawn):.0f}/s spawn only",
        ratio(rate(lite), rate(spawn)),
        f">= {TARGET_RATE:g}/s",
        rate(lite) >= TARGET_RATE,
    )
    table.add(
        "  children's CPU per deployment (/bin/true)",
        f"{median([r.children_cpu / r.deployments * 1e3 for r in lite]):.2f} ms",
        f"{median([r.children_cpu / r.deployments * 1e3 for r in spawn]):.2f} ms",
    )
    table.add(
        "  write transactions per deployment",
        f"{median([r.commits / r.deployments for r in lite]):.2f}",
    )
    if post:
        table.add(
            "daemon CPU per deployment, PostgreSQL",
            f"{cpu(post):.2f} ms",
            f"{cpu(spawn):.2f} ms spawn only",
            ratio(cpu(post), cpu(spawn)),
        )
        table.add(
            "deployments/s, PostgreSQL",
            f"{rate(post):.0f}/s",
            f"{rate(spawn):.0f}/s spawn only",
            ratio(rate(post), rate(spawn)),
        )
        table.add(
            "  write transactions per deployment",
            f"{median([r.commits / r.deployments for r in post]):.2f}",
        )
    else:
        table.note("PostgreSQL: set RECONCILER_TEST_POSTGRES_URL to measure it too.")
    table.note(
        f"{args.rounds} measured rounds after one warm-up, each a fresh state directory; "
        "CPU = time.process_time() of this process (all threads) from the wake to idle."
    )
    table.print()
    return 1 if any(row.met is False for row in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
