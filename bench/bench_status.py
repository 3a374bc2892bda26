"""`reconciler status` at fleet size: 1,000 environments x 20 services = 20,000 on SQLite.

The ledger is bench_store's (two rounds of deployments per service by default, the newest
completed, so the daemon has nothing to deploy), the desired state the newest version,
except ``--suspended`` environments that want a newer one and are suspended by an
operator (so the plan shows synced and suspended services). One standalone sync records
the environments' states, as the daemon's would.

Figures, each beside its target and a baseline measured in the same run:

* the standalone read in-process (``reconciler.status.saved_status``, what `status` runs
  without a daemon: the stored decisions, reconciler/stored_status.py), CPU and wall,
  through the sqlite3 reader and the `Store`, each vs planning every service (what it did
  before), with where its time goes; the naive GROUP BY status query for reference;
* what storing the decisions costs the writer (a daemon's pass with nothing or 1 % of the
  environments changed, all of them after a full load, the write alone);
* the read in the daemon: a `status` query on the control socket of a running daemon
  (``reconciler run``), the daemon's CPU per answer and the round trip as the CLI sees
  it (ask, plan from the fleet summary, encode, parse) vs ``Store.service_states()``;
* ``reconciler status --json`` as a whole process, with and without the daemon, vs
  ``reconciler --help`` (the interpreter and the CLI starting; reported, no target).

Exits 1 when a printed target is missed.

    .venv/bin/python bench/bench_status.py            # ~2 min on 2 loaded cores
    .venv/bin/python bench/bench_status.py --profile  # and the standalone read's profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    RECONCILER,
    Table,
    check_alive,
    cli_env,
    commit_all,
    cpu_seconds,
    fleet_file,
    machine,
    make_repo,
    median,
    ms,
    percentile,
    ratio,
    say,
    sec,
    stop_process,
    timed,
    wait_for,
    write_config,
)
from bench_store import env_name, fill, naive_status, timed_cpu
from sqlalchemy import text

from desired_state import EnvironmentSpec
from reconciler import channel
from reconciler import operations as ops
from reconciler.config import Config, load_config
from reconciler.engine import Engine, open_source
from reconciler.plan import Decision
from reconciler.planning import Planner, plan_settings
from reconciler.providers import build_providers
from reconciler.status import SavedDesired, saved_status
from reconciler.store import Store
from reconciler.store.reading import open_reader
from reconciler.store.sqlite_read import SQLiteReader
from reconciler.stored_status import decode, refresh, serve

TARGET = 0.050


def prepare(tmp: Path, args: argparse.Namespace) -> tuple[Config, str]:
    """The database, the desired-state repository and one recorded sync."""
    url = f"sqlite:///{tmp / 'status.db'}"
    envs, services = args.environments, args.services
    rounds = args.rounds
    store = Store.from_url(url, migrate=True)
    try:
        say(f"  loading {rounds * envs * services:,} deployments ...")
        fill(store, rounds * envs * services, envs, services)
        newest = f"1.{rounds - 1}.0"
        with store.engine.begin() as conn:  # the newest round completed: nothing to deploy
            conn.execute(
                text("UPDATE deployments SET status = 'completed', error_message = NULL"),
            )
        store.rebuild_service_state()
        repo = make_repo(tmp / "desired")
        frozen = {env_name(i) for i in range(0, envs, max(1, envs // max(1, args.suspended)))}
        frozen = set(sorted(frozen)[: args.suspended])
        for i in range(envs):
            version = "9.0.0" if env_name(i) in frozen else newest
            repo.joinpath(f"{env_name(i)}.yaml").write_text(fleet_file(i, services, version))
        commit_all(repo, "fleet")
        for name in sorted(frozen):
            ops._suspend(store, name, True, "bench", "bench freeze")
        config = load_config(
            write_config(tmp, ["/bin/true"], repo=str(repo), database_url=url, watch=False)
        )
        engine = Engine(config, store, open_source(config), build_providers(config))
        engine.wake = lambda environments: None  # type: ignore[method-assign]  # record only
        outcome = asyncio.run(engine.sync("manual"))
        assert outcome.result == "ok", outcome
        asyncio.run(ops.store_decisions(engine))  # as a standalone sync does at its end
        engine.source.close()
    finally:
        store.close()
    return config, url


def planned_status(config: Config, store: Store | SQLiteReader) -> list[Decision]:
    """The baseline: what `saved_status` did before decisions were stored (parse every
    saved spec, plan every service)."""
    saved = store.environment_states()
    desired = SavedDesired({n: EnvironmentSpec.model_validate(s.spec) for n, s in saved.items()})
    now = datetime.now(UTC)
    return Planner(store, plan_settings(config), lambda: now).decide_now(desired, None, now)


def standalone(table: Table, config: Config, url: str, args: argparse.Namespace) -> Any:
    """`saved_status` in this process, and its parts."""
    store = Store.for_reading(url)
    reader = open_reader(url)  # what `status` reads through on SQLite (no SQLAlchemy)
    assert isinstance(reader, SQLiteReader)
    try:
        status = saved_status(config, store, None)
        assert status is not None and len(status.decisions) == args.environments * args.services
        assert status.decisions == planned_status(config, store), "stored != planned"
        for label, source in (("sqlite3 reader", reader), ("Store", store)):
            walls, cpus, served = timed_cpu(
                partial(saved_status, config, source, None), args.repeat
            )
            assert served is not None and len(served.decisions) == len(status.decisions)
            _, base_cpus, _ = timed_cpu(
                partial(planned_status, config, source), max(2, args.repeat // 3)
            )
            cpu = median(cpus)
            table.add(
                f"standalone read: saved_status() all {len(status.decisions):,}, {label}",
                f"{ms(median(walls), 1)} (cpu {ms(cpu, 1)}, p95 {ms(percentile(walls, 95), 1)})",
                f"cpu {ms(median(base_cpus), 1)} planning all",
                ratio(cpu, median(base_cpus)),
                "< 50 ms cpu",
                cpu < TARGET,
            )
        base, naive = timed(lambda: naive_status(store), max(2, args.repeat // 3))
        assert len(naive) == len(status.decisions)
        table.add("  naive GROUP BY status query (reference)", ms(median(base), 1), target="-")
        names = reader.environment_names()
        settings = plan_settings(config)
        now = datetime.now(UTC)
        parts: list[tuple[str, Callable[[], Any]]] = [
            (
                "  part: environment_changes() + stored_decisions() read",
                lambda: (reader.environment_changes(), reader.stored_decisions()),
            ),
            (
                "  part: decode 1,000 stored environments",
                lambda: [decode(n, row.decisions) for n, row in reader.stored_decisions().items()],
            ),
            ("  part: serve() (nothing stale)", lambda: serve(reader, settings, now, names, None)),
        ]
        for label, fn in parts:
            pw, pc, _ = timed_cpu(fn, args.repeat)
            table.add(label, f"{ms(median(pw), 1)} (cpu {ms(median(pc), 1)})", target="-")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(saved_status, config, reader, None)
            pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        return [d.status_json(status.commit) for d in status.decisions]
    finally:
        reader.close()
        store.close()


def writes(table: Table, config: Config, url: str, args: argparse.Namespace) -> None:
    """What storing decisions costs whoever plans (a standalone sync's end, the daemon's
    pass after a sync or deployments)."""
    store = Store.from_url(url, migrate=False)
    settings = plan_settings(config)
    try:
        names = store.environment_names()
        pw, pc, planned = timed_cpu(
            lambda: refresh(store, settings, datetime.now(UTC)), args.repeat
        )
        assert planned == 0
        table.add(
            "write: refresh() with nothing changed (a pass of the daemon)",
            f"{ms(median(pw), 1)} (cpu {ms(median(pc), 1)})",
            target="-",
        )
        frozen = store.suspended_environments()  # left as they are: the daemon compares
        one = [n for n in names if n not in frozen][: max(1, len(names) // 100)]

        pw, pc, planned_counts = [], [], []
        for _ in range(max(2, args.repeat // 3)):
            for env in one:  # a change in 1 % of the environments (their counters move)
                ops._suspend(store, env, True, "bench", None)
                ops._suspend(store, env, False, "bench", None)
            wall, cpu = time.perf_counter(), time.process_time()
            planned_counts.append(refresh(store, settings, datetime.now(UTC)))
            pc.append(time.process_time() - cpu)
            pw.append(time.perf_counter() - wall)
        assert min(planned_counts) >= len(one)  # and those that depend on them
        table.add(
            f"write: refresh() after {len(one)} environments changed "
            f"({max(planned_counts)} planned)",
            f"{ms(median(pw), 1)} (cpu {ms(median(pc), 1)})",
            target="-",
        )

        def full() -> int:
            with store.engine.begin() as conn:
                conn.execute(text("DELETE FROM environment_decisions"))
            return refresh(store, settings, datetime.now(UTC))

        pw, pc, planned = timed_cpu(full, 2)
        assert planned == len(names)
        table.add(
            f"write: refresh() of all {len(names):,} environments (after a full load)",
            f"{ms(median(pw), 1)} (cpu {ms(median(pc), 1)})",
            target="-",
        )
        rows = list(store.stored_decisions().values())
        pw, pc, _ = timed_cpu(lambda: store.save_decisions(rows, at=datetime.now(UTC)), 3)
        table.add(
            f"  part: save_decisions() of {len(rows):,} environments (one transaction)",
            f"{ms(median(pw), 1)} (cpu {ms(median(pc), 1)})",
            target="-",
        )
    finally:
        store.close()


def process(config_path: Path, *extra: str) -> float:
    started = time.perf_counter()
    out = subprocess.run(
        [*RECONCILER, "--config", str(config_path), *extra],
        cwd=config_path.parent,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"reconciler {' '.join(extra)}: {out.stderr.strip()}")
    return elapsed


def processes(table: Table, config_path: Path, label: str, repeat: int, base: float) -> None:
    walls = [process(config_path, "status", "--json") for _ in range(repeat)]
    table.add(
        f"`reconciler status --json` (process), {label}",
        f"{sec(median(walls), 3)} (p95 {sec(percentile(walls, 95), 3)})",
        f"{sec(base, 3)} --help",
        ratio(median(walls), base),
        "- (reported)",
    )


def with_daemon(
    table: Table, config: Config, url: str, expected: Any, args: argparse.Namespace, base: float
) -> None:
    config_path = config.state_dir.parent / "reconciler.toml"
    log = config_path.parent / "daemon.log"
    proc = subprocess.Popen(
        [*RECONCILER, "--config", str(config_path), "run"],
        cwd=config_path.parent,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    path = channel.socket_path(config.state_dir)
    query = channel.StatusQuery()

    def answered() -> bool:
        check_alive(proc, log)
        try:
            return isinstance(channel.ask_status(path, query), channel.StatusReport)
        except channel.ChannelError:
            return False

    try:
        wait_for(answered, 120, "the daemon's first status answer", step=0.1)
        report = channel.ask_status(path, query)
        assert isinstance(report, channel.StatusReport)
        assert report.entries() == expected, "the daemon and the store disagree"
        walls, cpus = [], []
        for _ in range(args.repeat):
            before, started = cpu_seconds(proc.pid), time.perf_counter()
            channel.ask_status(path, query)
            walls.append(time.perf_counter() - started)
            cpus.append(cpu_seconds(proc.pid) - before)
        store = Store.for_reading(url)
        try:
            base_walls, _ = timed(store.service_states, max(3, args.repeat // 3))
        finally:
            store.close()
        cpu = median(cpus)
        table.add(
            "daemon read: status query, daemon cpu per answer",
            f"{ms(cpu, 1)} (p95 {ms(percentile(cpus, 95), 1)})",
            f"{ms(median(base_walls), 1)} service_states()",
            ratio(cpu, median(base_walls)),
            "< 50 ms cpu",
            cpu < TARGET,
        )
        wall = median(walls)
        table.add(
            "daemon read: status query round trip (socket, both ends)",
            f"{ms(wall, 1)} (p95 {ms(percentile(walls, 95), 1)})",
            f"{ms(median(base_walls), 1)} service_states()",
            ratio(wall, median(base_walls)),
            "- (reported)",
        )
        processes(table, config_path, "daemon running", args.process_repeat, base)
    finally:
        stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--environments", type=int, default=1000)
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="deployments per service")
    parser.add_argument("--suspended", type=int, default=10, help="environments suspended")
    parser.add_argument("--repeat", type=int, default=15, help="timed reads per figure")
    parser.add_argument("--process-repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="profile the standalone read")
    args = parser.parse_args()
    fleet = f"{args.environments:,} x {args.services} services"
    say(f"bench_status: {fleet}; {machine()}")
    table = Table(f"status of {fleet} on SQLite ({machine()})")
    with tempfile.TemporaryDirectory(prefix="bench-status-") as name:
        tmp = Path(name)
        config, url = prepare(tmp, args)
        config_path = tmp / "reconciler.toml"
        expected = standalone(table, config, url, args)
        writes(table, config, url, args)
        base = median([process(config_path, "--help") for _ in range(args.process_repeat)])
        processes(table, config_path, "no daemon", args.process_repeat, base)
        with_daemon(table, config, url, expected, args, base)
    table.note("standalone/daemon read rows are judged on CPU time (the machine is shared).")
    table.note("the process rows include the interpreter's start; --help is that start alone.")
    table.print()
    missed = [r.metric for r in table.rows if r.met is False]
    if missed:
        say(f"bench_status: {len(missed)} target(s) missed: {', '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
