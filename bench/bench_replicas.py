"""Environments deployed per minute by 1, 2 and 3 replicas sharing one PostgreSQL database.

For each replica count N, in one run: a fresh schema, N real `reconciler run` processes
(each its own state directory and mirror of one local git repository, ``max_parallel =
2``, ``lease_ttl = 3s``), all live before the work arrives; then one commit brings E
environments (default 60) of one service each, deployed by a `command` provider that
sleeps ``--sleep`` seconds (default 1): the engine is measured, not the CPU. The rate is E
over the time from that commit to the last deployment's end (its ``completed_at``).

The baseline is the single replica of the same run; the target is at least 2.5x its rate
with 3 replicas (each replica brings its own ``max_parallel`` slots; rendezvous hashing
gives each about a third of the environments, not exactly one).

    RECONCILER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
      .venv/bin/python bench/bench_replicas.py [--environments 60] [--sleep 1]

Exits 1 on a missed target, 2 without a PostgreSQL URL.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import (
    RECONCILER,
    Table,
    check_alive,
    cli_env,
    commit_all,
    exit_status,
    machine,
    make_repo,
    say,
    stop_process,
    write_config,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reconciler.store import Store

TARGET = 2.5


def env_file(i: int) -> str:
    return f'environment: bench-{i:03d}\nprovider: local\nservices:\n  api:\n    version: "1.0"\n'


def measure(url: str, replicas: int, environments: int, sleep: float) -> float:
    """Environments per minute with ``replicas`` replicas on a fresh schema of ``url``."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        repo = make_repo(tmp / "desired")
        (repo / "README").write_text("no environments yet\n")
        commit_all(repo, "empty")
        Store.from_url(url).close()  # migrated once, before the replicas start
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            for n in range(replicas):
                home = tmp / f"r{n}"
                home.mkdir()
                config = write_config(
                    home,
                    ["/bin/sleep", str(sleep)],
                    repo=str(repo),
                    database_url=url,
                    max_parallel=2,
                    lease_ttl="3s",
                )
                config.write_text(config.read_text() + '\n[server]\nlisten = ""\n')
                log = home / "daemon.log"
                proc = subprocess.Popen(
                    [*RECONCILER, "--config", str(config), "run"],
                    cwd=home,
                    env=cli_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=log.open("w"),
                )
                procs.append((proc, log))
            db = create_engine(url)
            live = text("SELECT count(*) FROM replicas WHERE heartbeat_at > now() - interval '3s'")
            deadline = time.monotonic() + 60
            while True:
                with db.connect() as conn:
                    if conn.execute(live).scalar() == replicas:
                        break
                for proc, log in procs:
                    check_alive(proc, log)
                if time.monotonic() > deadline:
                    raise RuntimeError("the replicas did not all come up")
                time.sleep(0.1)
            time.sleep(1.0)  # one more lease pass: every replica sees the others live
            for i in range(environments):
                (repo / f"bench-{i:03d}.yaml").write_text(env_file(i))
            with db.connect() as conn:
                started = conn.execute(text("SELECT now()")).scalar_one()
            commit_all(repo, "the work")
            done = text(
                "SELECT count(DISTINCT environment), max(completed_at) FROM deployments"
                " WHERE status = 'completed'"
            )
            deadline = time.monotonic() + 600
            while True:
                with db.connect() as conn:
                    count, last = conn.execute(done).one()
                if count == environments:
                    break
                for proc, log in procs:
                    check_alive(proc, log)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {count} of {environments} deployed")
                time.sleep(0.1)
            db.dispose()
            elapsed = (last - started).total_seconds()
            say(f"  {replicas} replica(s): {environments} environments in {elapsed:.1f} s")
            return environments / elapsed * 60
        finally:
            for proc, _ in procs:
                stop_process(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", default=os.environ.get("RECONCILER_TEST_POSTGRES_URL"))
    parser.add_argument("--environments", type=int, default=60)
    parser.add_argument("--sleep", type=float, default=1.0)
    args = parser.parse_args()
    if not args.postgres:
        say("bench_replicas: needs --postgres URL (or RECONCILER_TEST_POSTGRES_URL)")
        return 2
    say(f"bench_replicas: {args.environments} environments, {args.sleep:g} s each; {machine()}")
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    rates: dict[int, float] = {}
    try:
        for replicas in (1, 2, 3):
            schema = f"bench_{uuid.uuid4().hex[:12]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            try:
                url = make_url(args.postgres).update_query_dict(
                    {"options": f"-csearch_path={schema}"}
                )
                rates[replicas] = measure(
                    url.render_as_string(hide_password=False),
                    replicas,
                    args.environments,
                    args.sleep,
                )
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()
    table = Table(
        f"replicas on one PostgreSQL ({args.environments} environments, deploy = sleep "
        f"{args.sleep:g} s, max_parallel 2 each); baseline: 1 replica"
    )
    one = rates[1]
    for replicas, rate in rates.items():
        gain = rate / one
        table.add(
            f"environments/min, {replicas} replica{'s' if replicas > 1 else ''}",
            f"{rate:,.1f}",
            f"{one:,.1f}",
            gain,
            f">= {TARGET:g}x" if replicas == 3 else "-",
            gain >= TARGET if replicas == 3 else None,
        )
    table.note("load average after the run: " + machine())
    table.print()
    return exit_status(table)


if __name__ == "__main__":
    sys.exit(main())
