"""The store at scale: history and status queries over a large deployment ledger.

Fills a migrated database (``Store.from_url(url, migrate=True)``: the real schema) with N
recorded deployments over E environments x S services (default 100,000 = 1,000 x 20 x 5;
``--full`` 1,000,000 = 1,000 x 20 x 50), newest round last, 85 % completed, 12 % failed,
3 % timed out. Then ``Store.rebuild_service_state()``, and the queries are timed against
a baseline measured in the same run:

* ``Store.history(environment=E, limit=50)`` (and with ``service=S``) vs the same SQL with
  the indexes off (SQLite ``NOT INDEXED``; PostgreSQL ``SET LOCAL enable_indexscan/
  bitmapscan/indexonlyscan = off``);
* status: ``Store.service_states()`` (all 20,000 services, and one environment) vs a naive
  GROUP BY over ``deployments`` (latest and latest-completed deployment per service),
  i.e. the query a store without the ``service_state`` helper table would run;
* ``Engine.decisions()`` for all environments on a loaded desired state (the status path
  minus reading git) and ``completed_versions`` vs one query per triple;
* the full ``reconciler status --json`` command (a subprocess; SQLite only) vs the bare
  start of the CLI (``reconciler --help``).

Bulk load: SQLAlchemy Core ``executemany`` of pre-serialised rows through the driver
(``Connection.exec_driver_sql``) on SQLite, ``COPY`` on PostgreSQL, with the table's
indexes dropped during the load and re-created after it (timed together). PostgreSQL gets
an ``ANALYZE`` after the load (autovacuum would); SQLite none (the daemon runs none).

Then every filter combination of ``reconciler history`` (SPEC §7: env, service, status,
since, and together; plus an unknown service and "since" everything) against the same
filters with the indexes off, and the daemon's in-memory fleet summary (`FleetSummary`)
against ``Store.service_states()``. The run exits 1 when a printed target is missed.

The database is generated afresh in a temporary folder each run unless ``--cache DIR`` is
given (then the SQLite file, as loaded, before any query adds to it, is kept there and
reused by the next run with the same size).
PostgreSQL runs too when ``RECONCILER_TEST_POSTGRES_URL`` is set (or ``--postgres URL``):
in a schema ``bench_<random>`` created for the run and dropped after it.

    .venv/bin/python bench/bench_store.py             # 100,000 deployments (~1 min)
    .venv/bin/python bench/bench_store.py --full      # 1,000,000 deployments (~3 min)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import (
    RECONCILER,
    Table,
    cli_env,
    commit_all,
    fleet_file,
    machine,
    make_repo,
    median,
    ms,
    percentile,
    ratio,
    say,
    sec,
    timed,
    write_config,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from desired_state import load_files
from reconciler.config import load_config
from reconciler.engine import Engine, open_source
from reconciler.fleet import FleetSummary
from reconciler.providers import build_providers
from reconciler.store import NewDeployment, Store
from reconciler.store.models import metadata

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TARGET = 0.050
D = metadata.tables["deployments"]
COLUMNS = (
    "environment", "service", "version", "previous_version", "provider", "provider_type",
    "strategy", "status", "error_message", "trigger", "commit", "commit_author", "attempt",
    "timeout_seconds", "validation", "params", "created_at", "started_at", "completed_at",
)  # fmt: skip
STRATEGY = json.dumps({"type": "rolling"})
PARAMS = json.dumps({"deployment": "api", "replicas": 3})


def env_name(i: int) -> str:
    return f"env{i:04d}"


def rows(deployments: int, environments: int, services: int, sqlite: bool) -> Iterator[tuple]:
    """The ledger, round by round (each service deployed once per round), oldest first."""
    rng = random.Random(42)
    rounds = max(1, deployments // (environments * services))
    count = 0

    def stamp(t: datetime) -> Any:
        return t.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else t

    for r in range(rounds):
        for e in range(environments):
            for s in range(services):
                if count >= deployments:
                    return
                created = T0 + timedelta(seconds=count * 5)
                roll = rng.random()
                status = "completed" if roll < 0.85 else "failed" if roll < 0.97 else "timed_out"
                yield (
                    env_name(e), f"svc{s:02d}", f"1.{r}.0", f"1.{r - 1}.0" if r else None,
                    "local", "command", STRATEGY, status,
                    None if status == "completed" else "exit status 1", "git",
                    f"{count:040x}", "Bench <bench@example.com>", 1, 1800, None, PARAMS,
                    stamp(created), stamp(created + timedelta(seconds=1)),
                    stamp(created + timedelta(seconds=30)),
                )  # fmt: skip
                count += 1


def fill(store: Store, deployments: int, environments: int, services: int) -> float:
    """Bulk-load the ledger; indexes dropped during the load, re-created after. Seconds."""
    engine = store.engine
    sqlite = engine.dialect.name == "sqlite"
    started = time.perf_counter()
    with engine.begin() as conn:
        for index in D.indexes:
            index.drop(bind=conn)
    if sqlite:
        cols = ", ".join('"' + c + '"' for c in COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT INTO deployments ({cols}) VALUES ({marks})"
        batch: list[tuple] = []
        with engine.begin() as conn:
            for row in rows(deployments, environments, services, sqlite=True):
                batch.append(row)
                if len(batch) >= 50_000:
                    conn.exec_driver_sql(sql, batch)
                    batch = []
            if batch:
                conn.exec_driver_sql(sql, batch)
    else:
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            with raw.cursor() as cur:
                cols = ", ".join('"' + c + '"' for c in COLUMNS)
                with cur.copy(f"COPY deployments ({cols}) FROM STDIN") as copy:
                    for row in rows(deployments, environments, services, sqlite=False):
                        copy.write_row(row)
    with engine.begin() as conn:
        for index in D.indexes:
            index.create(bind=conn)
        if not sqlite:
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


# ---------------------------------------------------------------------------- baselines


def naive_history(
    store: Store, environment: str | None, service: str | None, **more: Any
) -> list[Any]:
    """Store.history's filters as plain SQL with the indexes off (a full scan)."""
    filters = {"environment": environment, "service": service, **more}
    terms = [
        f"{'created_at >=' if name == 'since' else name + ' ='} :{name}"
        for name, value in filters.items()
        if value is not None
    ]
    params = {name: value for name, value in filters.items() if value is not None}
    if "since" in params:  # stored as naive UTC text on SQLite
        since = params["since"]
        params["since"] = (
            since.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
            if store.engine.dialect.name == "sqlite"
            else since
        )
    where = ("WHERE " + " AND ".join(terms)) if terms else ""
    with store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            sql = f"SELECT * FROM deployments NOT INDEXED {where} ORDER BY id DESC LIMIT 50"
        else:
            for knob in ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan"):
                conn.execute(text(f"SET LOCAL {knob} = off"))
            sql = f"SELECT * FROM deployments {where} ORDER BY id DESC LIMIT 50"
        return conn.execute(text(sql), params).all()


NAIVE_STATUS = """
SELECT g.environment, g.service, d.version AS last_version, d.status AS last_status,
       c.version AS deployed_version
FROM (SELECT environment, service, max(id) AS last_id,
             max(CASE WHEN status = 'completed' THEN id END) AS completed_id
      FROM deployments {where} GROUP BY environment, service) AS g
JOIN deployments d ON d.id = g.last_id
LEFT JOIN deployments c ON c.id = g.completed_id
"""


def naive_status(store: Store, environment: str | None = None) -> list[Any]:
    """Status without the service_state helper table: GROUP BY over every deployment."""
    where = "WHERE environment = :e" if environment else ""
    with store.engine.connect() as conn:
        return conn.execute(text(NAIVE_STATUS.format(where=where)), {"e": environment}).all()


def naive_completed(store: Store, triples: list[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """One query per (environment, service, version)."""
    found = set()
    sql = text(
        "SELECT 1 FROM deployments WHERE environment = :e AND service = :s AND version = :v "
        "AND status = 'completed' LIMIT 1"
    )
    with store.engine.connect() as conn:
        for e, s, v in triples:
            if conn.execute(sql, {"e": e, "s": s, "v": v}).first() is not None:
                found.add((e, s, v))
    return found


# ---------------------------------------------------------------------------- the run


def new_deployment(environment: str, service: str, version: str) -> NewDeployment:
    return NewDeployment(
        environment=environment,
        service=service,
        version=version,
        previous_version=None,
        provider="local",
        provider_type="command",
        strategy={"type": "rolling"},
        trigger="git",
        commit="f" * 40,
        commit_author=None,
        attempt=1,
        timeout_seconds=60,
        params={},
    )


def one_deployment(store: Store, environment: str) -> None:
    record = store.create_deployment(new_deployment(environment, "svc03", "9.9.9"))
    now = datetime.now(UTC)
    store.set_status(record.id, "in_progress", at=now)
    store.set_status(record.id, "failed", at=now, error_message="bench")


def run_suite(
    table: Table,
    label: str,
    url: str,
    args: argparse.Namespace,
    tmp: Path,
    cached: bool,
    keep: Path | None = None,
) -> None:
    envs, services, n = args.environments, args.services, args.deployments
    store = Store.from_url(url, migrate=True)
    tag = f"[{label}] "
    try:
        if not cached:
            say(f"  {label}: loading {n:,} deployments ...")
            fill_s = fill(store, n, envs, services)
            started = time.perf_counter()
            store.rebuild_service_state()
            rebuild_s = time.perf_counter() - started
            table.add(
                f"{tag}bulk load {n:,} deployments (+ index build)",
                sec(fill_s, 1),
                target=f"{n / fill_s:,.0f} rows/s",
            )
            table.add(f"{tag}rebuild_service_state()", sec(rebuild_s, 1))
            if keep is not None:
                # Kept as loaded: the queries below add deployments and a sync (whose
                # commit a second run's fresh repository would not descend from).
                keep.unlink(missing_ok=True)
                raw = store.engine.raw_connection()  # VACUUM runs outside a transaction
                try:
                    raw.driver_connection.execute("VACUUM INTO ?", (str(keep),))
                finally:
                    raw.close()
        else:
            table.add(f"{tag}database reused from --cache", "-")
        with store.engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM deployments")).scalar_one()
        assert total >= n, (total, n)
        say(f"  {label}: {total:,} deployments; timing queries ...")

        rng = random.Random(7)
        picks = [env_name(rng.randrange(envs)) for _ in range(args.queries)]

        def cycle(fn: Callable[[str], Any]) -> Callable[[], Any]:
            it = iter(picks * (args.queries + 5))
            return lambda: fn(next(it))

        def row(metric: str, mine: list[float], base: list[float], base_label: str = "") -> None:
            a, b = median(mine), median(base)
            table.add(
                f"{tag}{metric}",
                f"{ms(a, 2)} (p95 {ms(percentile(mine, 95), 2)})",
                f"{ms(b, 1)}{base_label}",
                ratio(a, b),
                "< 50 ms",
                a < TARGET,
            )

        mine, recs = timed(cycle(lambda e: store.history(environment=e, limit=50)), args.queries)
        assert len(recs) == 50, len(recs)
        base, raw = timed(cycle(lambda e: naive_history(store, e, None)), args.baseline_queries)
        assert len(raw) == 50
        row("history(environment=E, limit=50)", mine, base, " no index")
        mine, _ = timed(
            cycle(lambda e: store.history(environment=e, service="svc07", limit=50)), args.queries
        )
        base, _ = timed(cycle(lambda e: naive_history(store, e, "svc07")), args.baseline_queries)
        row("history(environment=E, service=S, limit=50)", mine, base, " no index")

        sparse_filters(table, tag, store, picks[0], args)

        mine, cpu, states = timed_cpu(store.service_states, max(5, args.queries // 5))
        base, naive = timed(lambda: naive_status(store), max(2, args.baseline_queries // 2))
        naive_all = median(base)
        assert len(states) == len(naive) == envs * services, (len(states), len(naive))
        bad = sum(
            1
            for r in naive
            if states[(r.environment, r.service)].deployed_version != r.deployed_version
        )
        assert bad == 0, f"{bad} services disagree with the naive status"
        cpu_row(
            table,
            f"{tag}status: service_states() all {len(states):,}",
            (mine, cpu),
            base,
            " GROUP BY",
            in_process=store.engine.dialect.name == "sqlite",
        )
        fleet_summary(table, tag, store, picks, args)
        mine, _ = timed(cycle(lambda e: store.service_states([e])), args.queries)
        base, _ = timed(cycle(lambda e: naive_status(store, e)), args.baseline_queries)
        row("status: service_states([E]) one env", mine, base, " GROUP BY")

        triples = [
            (env_name(rng.randrange(envs)), f"svc{rng.randrange(services):02d}", "1.3.0")
            for _ in range(2000)
        ]
        mine, found = timed(lambda: store.completed_versions(triples), 5)
        base, found2 = timed(lambda: naive_completed(store, triples), 2, 0)
        assert found == found2
        row("completed_versions(2,000 triples)", mine, base, " 1 query each")

        # Engine.decisions over the whole fleet (what `reconciler status` computes).
        repo = tmp / "desired"
        if not repo.exists():
            make_repo(repo)
            for i in range(envs):
                # desired = the newest round's version: most services synced, some not
                newest = f"1.{max(1, n // (envs * services)) - 1}.0"
                repo.joinpath(f"{env_name(i)}.yaml").write_text(fleet_file(i, services, newest))
            commit_all(repo, "fleet")
        state = load_files(
            ((p.name, p.read_bytes()) for p in sorted(repo.glob("*.yaml"))), providers={"local"}
        )
        assert not state.errors, state.errors[:3]
        base_dir = tmp / f"cfg-{label}"
        base_dir.mkdir(exist_ok=True)
        config = load_config(
            write_config(base_dir, ["/bin/true"], repo=str(repo), database_url=url, watch=False)
        )
        engine = Engine(config, store, open_source(config), build_providers(config))
        engine.effective = dict(state.environments)
        started = time.perf_counter()
        decisions = asyncio.run(engine.decisions())
        first = time.perf_counter() - started
        assert len(decisions) == envs * services
        mine, _ = timed(lambda: asyncio.run(engine.decisions()), 3, 0)
        states_n = {d.state for d in decisions}
        table.add(
            f"{tag}Engine.decisions() all {len(decisions):,} (warm)",
            f"{ms(median(mine), 1)}",
            f"{ms(naive_all, 1)} GROUP BY",
            ratio(median(mine), naive_all),
            "-",
        )
        table.add(
            f"{tag}Engine.decisions() all, first call",
            ms(first, 1),
            target="-",
        )
        say(f"  {label}: decision states {sorted(states_n)}")

        mine, _ = timed(lambda: one_deployment(store, picks[0]), 10)
        table.add(f"{tag}create + in_progress + failed (3 tx)", ms(median(mine), 2))

        if args.cli and store.engine.dialect.name == "sqlite":
            cli_status(table, tag, base_dir, config, store, engine)
    finally:
        store.engine.dispose()


def recent_deployments(store: Store, environment: str, count: int) -> None:
    """``count`` deployments made now (``--since 7d`` finds only these), one running."""
    for index in range(count):
        record = store.create_deployment(new_deployment(environment, "svc00", f"7.0.{index}"))
        if index < count - 1:
            store.set_status(record.id, "timed_out", at=datetime.now(UTC))


def sparse_filters(
    table: Table, tag: str, store: Store, environment: str, args: argparse.Namespace
) -> None:
    """Every filter combination `reconciler history` offers (SPEC §7), limit 50, vs the
    same filters with the indexes off. Values: one environment, svc07 (and an unknown
    service), timed_out (3 %), since 7 days (11 recent rows; and "since all")."""
    recent_deployments(store, environment, 11)
    week = datetime.now(UTC) - timedelta(days=7)
    values: dict[str, Any] = {
        "environment": environment,
        "service": "svc07",
        "status": "timed_out",
        "since": week,
    }
    combos: list[dict[str, Any]] = []
    names = list(values)
    for size in range(1, len(names) + 1):
        for chosen in itertools.combinations(names, size):
            combos.append({n: values[n] for n in chosen})
    combos += [
        {"service": "no-such-service"},
        {"since": T0},
        {"since": T0, "status": "cancelled"},
        {"since": T0, "environment": environment, "service": "no-such-service"},
    ]
    for filters in combos:
        mine, got = timed(lambda f=filters: store.history(limit=50, **f), args.filter_queries)
        base, raw = timed(
            lambda f=filters: naive_history(
                store, f.get("environment"), f.get("service"),
                status=f.get("status"), since=f.get("since"),
            ),
            args.filter_baseline,
            0,
        )  # fmt: skip
        assert [r.id for r in got] == [r.id for r in raw], filters
        shown = " ".join(
            f"--{n[:3] if n == 'environment' else n} "
            + ("7d" if v is week else "all" if v is T0 else "E" if n == "environment" else v)
            for n, v in filters.items()
        )
        a, b = median(mine), median(base)
        table.add(
            f"{tag}history {shown} ({len(got)} rows)",
            f"{ms(a, 2)} (p95 {ms(percentile(mine, 95), 2)})",
            f"{ms(b, 1)} no index",
            ratio(a, b),
            "< 50 ms",
            a < TARGET,
        )


def timed_cpu(fn: Callable[[], Any], repeat: int) -> tuple[list[float], list[float], Any]:
    """Like `timed`, with each call's CPU time of this process beside its wall time."""
    result = fn()
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return walls, cpus, result


def cpu_row(
    table: Table,
    metric: str,
    times: tuple[list[float], list[float]],
    base: list[float],
    base_label: str,
    *,
    in_process: bool,
) -> None:
    """A row judged on CPU time when all the work is in this process (SQLite), so that
    the other work on a shared machine does not decide it; on wall time otherwise."""
    walls, cpus = times
    wall, cpu = median(walls), median(cpus)
    judged = cpu if in_process else wall
    table.add(
        metric,
        f"{ms(wall, 2)} (cpu {ms(cpu, 2)}, p95 {ms(percentile(walls, 95), 2)})",
        f"{ms(median(base), 1)}{base_label}",
        ratio(wall, median(base)),
        "< 50 ms" + (" cpu" if in_process else ""),
        judged < TARGET,
    )


def fleet_summary(
    table: Table, tag: str, store: Store, picks: list[str], args: argparse.Namespace
) -> None:
    """The daemon's in-memory `FleetSummary`: a read with nothing changed, and with one
    environment marked by a deployment event (its rows re-read), vs `service_states()`."""
    summary = FleetSummary(store)
    summary.service_states()  # the daemon's first read: the whole fleet
    base, _ = timed(store.service_states, max(3, args.queries // 10))
    mine = timed_cpu(summary.service_states, args.queries)
    assert mine[2] == store.service_states()
    it = iter(picks * 3)

    def one_changed() -> Any:
        summary.mark(next(it))
        return summary.service_states()

    changed = timed_cpu(one_changed, args.queries)
    for label, (walls, cpus, states) in (
        ("nothing changed", mine),
        ("1 environment changed", changed),
    ):
        cpu_row(
            table,
            f"{tag}status: daemon summary all {len(states):,}, {label}",
            (walls, cpus),
            base,
            " service_states()",
            in_process=store.engine.dialect.name == "sqlite",
        )


def cli_status(
    table: Table, tag: str, base_dir: Path, config: Any, store: Store, engine: Engine
) -> None:
    """`reconciler status --json` end to end: record a sync first (as the daemon would)."""
    engine.wake = lambda environments: None  # type: ignore[method-assign]  # deploy nothing
    engine.effective = {}
    outcome = asyncio.run(engine.sync("manual"))
    assert outcome.result == "ok", outcome
    engine.source.close()
    cmd = [*RECONCILER, "--config", str(base_dir / "reconciler.toml")]

    def run(*extra: str) -> float:
        started = time.perf_counter()
        out = subprocess.run(
            [*cmd, *extra], cwd=base_dir, env=cli_env(), capture_output=True, text=True
        )
        elapsed = time.perf_counter() - started
        if out.returncode not in (0, 1):
            raise RuntimeError(f"reconciler {' '.join(extra)}: {out.stderr.strip()}")
        return elapsed

    base = [run("--help") for _ in range(3)]
    mine = [run("status", "--json") for _ in range(3)]
    one = [run("status", "--env", "env0007", "--json") for _ in range(3)]
    table.add(
        f"{tag}`reconciler status --json` (process)",
        sec(median(mine), 2),
        f"{sec(median(base), 2)} --help",
        ratio(median(mine), median(base)),
    )
    table.add(
        f"{tag}`reconciler status --env E --json`",
        sec(median(one), 2),
        f"{sec(median(base), 2)} --help",
        ratio(median(one), median(base)),
    )


@contextmanager
def postgres_schema(base: str) -> Iterator[str]:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1,000,000 deployments")
    parser.add_argument("--deployments", type=int, help="default 100,000 (--full 1,000,000)")
    parser.add_argument("--environments", type=int, default=1000)
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--queries", type=int, default=50, help="timed calls per query")
    parser.add_argument("--baseline-queries", type=int, default=6)
    parser.add_argument("--filter-queries", type=int, default=20, help="per history filter")
    parser.add_argument("--filter-baseline", type=int, default=2, help="full scans per filter")
    parser.add_argument("--cache", type=Path, help="keep/reuse the SQLite file in this folder")
    parser.add_argument("--postgres", default=os.environ.get("RECONCILER_TEST_POSTGRES_URL"))
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-cli", dest="cli", action="store_false")
    args = parser.parse_args()
    args.deployments = args.deployments or (1_000_000 if args.full else 100_000)
    say(f"bench_store: {args.deployments:,} deployments; {machine()}")

    table = Table(
        f"store, {args.deployments:,} deployments over {args.environments:,} environments x "
        f"{args.services} services ({machine()})"
    )
    with tempfile.TemporaryDirectory(prefix="bench-store-") as name:
        tmp = Path(name)
        db = tmp / "bench.db"
        cached = False
        kept = None
        if args.cache:
            args.cache.mkdir(parents=True, exist_ok=True)
            kept = (
                args.cache
                / f"bench-store-{args.deployments}-{args.environments}-{args.services}.db"
            )
            if kept.exists():
                shutil.copy(kept, db)
                cached = True
        run_suite(
            table, "sqlite", f"sqlite:///{db}", args, tmp, cached, kept if args.cache else None
        )
        if args.postgres and not args.no_postgres:
            with postgres_schema(args.postgres) as url:
                run_suite(table, "postgres", url, args, tmp, False)
        else:
            table.note("PostgreSQL skipped: RECONCILER_TEST_POSTGRES_URL not set.")
    table.note(
        "reconciler column: median (p95) of the package's call; baseline: median of "
        "the naive query (raw rows, no record mapping)."
    )
    table.note(
        "Engine.decisions(): recorded state from the store + plan() for every service "
        "(desired state parsed beforehand); its baseline is the naive GROUP BY status."
    )
    table.note(
        "since 7d: the 11 deployments made by this run are that recent (the loaded ones are "
        "from 2024); since all: every deployment is."
    )
    table.print()
    missed = [r.metric for r in table.rows if r.met is False]
    if missed:
        say(f"bench_store: {len(missed)} target(s) missed: {', '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
