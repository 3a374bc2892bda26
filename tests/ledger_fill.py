"""A large ledger, written fast: deployments with their progress events and syncs, by
driver-level ``executemany`` into a migrated SQLite database (for the export's memory test and
`bench/bench_export.py`). Rows look like what the engine writes; nothing is deployed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = 20_000
SYNCS = 100

_DEPLOYMENT_COLUMNS = (
    "id, environment, service, version, previous_version, provider, provider_type, strategy,"
    ' status, error_message, trigger, "commit", commit_author, attempt, timeout_seconds,'
    " validation, params, created_at, started_at, completed_at, sync_id"
)
_EVENT_COLUMNS = "deployment_id, status, message, percent, details, at"
_SYNC_COLUMNS = (
    "id, trigger, commit_sha, commit_author, commit_time, commit_subject, seen_at, ended_at,"
    " result, full_load, environments_changed, errors"
)


def _marks(engine: Engine, count: int) -> str:
    mark = "?" if engine.dialect.name == "sqlite" else "%s"
    return ", ".join([mark] * count)


def _stamp(engine: Engine, t: datetime) -> Any:
    if engine.dialect.name == "sqlite":
        return t.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return t


def _rows(
    engine: Engine, start: int, count: int, environments: Sequence[str]
) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]:
    strategy = json.dumps({"type": "rolling"})
    validation = json.dumps({"ok": True, "checks": [{"name": "provider", "ok": True}]})
    params = json.dumps({"deployment": "api", "replicas": 3})
    for i in range(start, start + count):
        env = environments[i % len(environments)]
        created = T0 + timedelta(seconds=i)
        failed = i % 10 == 0
        status = "failed" if failed else "completed"
        deployment = (
            i, env, f"svc{i % 50:02d}", f"1.{i // 50}.0", f"1.{i // 50 - 1}.0", "local",
            "command", strategy, status, "exit status 3" if failed else None, "git",
            f"{i % SYNCS + 1:040x}", "Ada <ada@example.com>", 1, 1800, validation, params,
            _stamp(engine, created), _stamp(engine, created + timedelta(seconds=1)),
            _stamp(engine, created + timedelta(seconds=20)), i % SYNCS + 1,
        )  # fmt: skip
        events = [
            (i, "pending", "deployment queued", None, "{}", _stamp(engine, created)),
            (i, "in_progress", "deploying", 50, '{"step": "roll"}', _stamp(engine, created)),
            (i, status, f"deployment {status}", 100 if not failed else None, "{}",
             _stamp(engine, created + timedelta(seconds=20))),
        ]  # fmt: skip
        yield deployment, events


def fill_ledger(
    engine: Engine, deployments: int, environments: Sequence[str] = ("production",)
) -> None:
    """Append ``deployments`` deployments (3 progress events each) spread over
    ``environments``, and the syncs they name, to a migrated database."""
    with engine.begin() as conn:
        start = int(conn.execute(text("SELECT coalesce(max(id), 0) FROM deployments")).scalar_one())
        have_syncs = conn.execute(text("SELECT count(*) FROM syncs")).scalar_one()
    sql_d = f"INSERT INTO deployments ({_DEPLOYMENT_COLUMNS}) VALUES ({_marks(engine, 21)})"
    sql_e = f"INSERT INTO deployment_events ({_EVENT_COLUMNS}) VALUES ({_marks(engine, 6)})"
    sql_s = f"INSERT INTO syncs ({_SYNC_COLUMNS}) VALUES ({_marks(engine, 12)})"
    with engine.begin() as conn:
        if not have_syncs:
            syncs = [
                (s, "poll", f"{s:040x}", "Ada <ada@example.com>", _stamp(engine, T0),
                 f"release {s}", _stamp(engine, T0), _stamp(engine, T0), "ok", False,
                 "[]", "[]")
                for s in range(1, SYNCS + 1)
            ]  # fmt: skip
            conn.exec_driver_sql(sql_s, syncs)
        done = 0
        while done < deployments:
            count = min(BATCH, deployments - done)
            batch_d: list[tuple[Any, ...]] = []
            batch_e: list[tuple[Any, ...]] = []
            for deployment, events in _rows(engine, start + done + 1, count, environments):
                batch_d.append(deployment)
                batch_e.extend(events)
            conn.exec_driver_sql(sql_d, batch_d)
            conn.exec_driver_sql(sql_e, batch_e)
            done += count


_PROBE = """\
import resource, subprocess, sys, time
with open('/dev/null', 'w') as out:
    started = time.perf_counter()
    subprocess.run(sys.argv[1:], stdout=out, check=True)
    wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime, wall)
"""


def measured_run(
    command: Sequence[str], *, cwd: Path, env: dict[str, str]
) -> tuple[int, float, float]:
    """Run ``command`` (stdout to /dev/null) under a parent of its own, which reads its
    rusage: (peak RSS in KiB, CPU seconds, wall seconds)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=True,
    )
    rss, cpu, wall = out.stdout.split()
    return int(rss), float(cpu), float(wall)
