"""A deploy command that prints a flood of output: time, memory and database cost.

Runs `reconciler deploy` (a real CLI process, SQLite) of a `command` provider whose command
prints N lines of ~100 bytes (default 2,000,000 = ~190 MB), and measures:

* the run's duration (the record's ``duration_seconds``) and the whole CLI's wall time,
  vs the same command with its output to /dev/null (no reconciler at all);
* the CLI's peak RSS (``wait4`` ru_maxrss) vs the same CLI deploying a command that prints
  nothing (what the reconciler costs before any output);
* what reached the database: log rows and bytes, vs the `[daemon] log_cap` (1 MiB).

    .venv/bin/python bench/bench_output.py                 # 2,000,000 lines
    .venv/bin/python bench/bench_output.py --lines 200000  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    RECONCILER,
    Table,
    cli_env,
    commit_all,
    env_yaml,
    machine,
    make_repo,
    mb,
    ratio,
    say,
    sec,
    write_config,
)

FLOOD = """\
import sys
n = int(sys.argv[1])
pad = "x" * 88
w = sys.stdout.write
for i in range(n):
    w(f"{i:09d} {pad}\\n")
    if i % 100_000 == 0:
        w('{"progress": %d, "message": "line %d"}\\n' % (i * 100 // max(n, 1), i))
"""


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of one process and what it waited for."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and proc.stderr is not None:
        say(proc.stderr.read().decode(errors="replace")[-2000:])
    return wall, usage.ru_maxrss * 1024, proc.returncode


def deploy(tmp: Path, name: str, lines: int) -> dict[str, Any]:
    folder = tmp / name
    folder.mkdir()
    script = folder / "flood.py"
    script.write_text(FLOOD)
    repo = make_repo(folder / "desired")
    (repo / "staging.yaml").write_text(env_yaml("staging", [("api", "1.0")], extra=False))
    commit_all(repo)
    config = write_config(folder, [PYTHON, str(script), str(lines)])
    argv = [*RECONCILER, "--config", str(config), "deploy", "--env=staging", "--version=2.0"]
    wall, rss, code = run([*argv, "--json"], folder, cli_env())
    if code != 0:
        raise SystemExit(f"deploy exited {code}")
    db = sqlite3.connect(folder / "state" / "reconciler.db")
    rows, size = db.execute(
        "SELECT count(*), coalesce(sum(length(CAST(line AS BLOB))), 0) FROM deployment_logs"
    ).fetchone()
    marker = db.execute("SELECT line FROM deployment_logs WHERE stream = 'system'").fetchall()
    events = db.execute(
        "SELECT count(*) FROM deployment_events WHERE status = 'in_progress' AND percent IS NOT NULL"
    ).fetchone()[0]
    db.close()
    shown = subprocess.run(
        [*RECONCILER, "--config", str(config), "history", "--json"],
        cwd=folder,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    [record] = json.loads(shown.stdout)
    return {
        "wall": wall,
        "rss": rss,
        "rows": rows,
        "bytes": size,
        "run": float(record["duration_seconds"]),
        "status_ok": float(record["status"] == "completed"),
        "events": events,
        "marker": marker[0][0] if marker else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    args = parser.parse_args()
    n = args.lines
    with tempfile.TemporaryDirectory(prefix="bench-output-") as name:
        tmp = Path(name)
        flood = tmp / "flood.py"
        flood.write_text(FLOOD)
        say(f"baseline: the command alone, {n:,} lines to /dev/null")
        base_wall, base_rss, _ = run([PYTHON, str(flood), str(n)], tmp)
        say("reconciler deploy of a command that prints nothing")
        quiet = deploy(tmp, "quiet", 0)
        say(f"reconciler deploy of the {n:,}-line command")
        loud = deploy(tmp, "loud", n)

    table = Table(f"deploy command printing {n:,} lines of 99 bytes ({machine()})")
    table.add(
        "run duration (record)",
        sec(loud["run"]),
        sec(base_wall) + " (to /dev/null)",
        ratio(loud["run"], base_wall),
        "same order as the command itself",
    )
    table.add(
        "reconciler deploy, wall",
        sec(loud["wall"]),
        sec(quiet["wall"]) + " (no output)",
        f"+{loud['wall'] - quiet['wall']:.2f} s",
    )
    table.add(
        "peak RSS of the CLI",
        mb(loud["rss"]),
        mb(quiet["rss"]) + " (no output)",
        ratio(loud["rss"], quiet["rss"]),
        "bounded (< +32 MB)",
        loud["rss"] - quiet["rss"] < 32 * 2**20,
    )
    table.add(
        "log in the database",
        f"{int(loud['rows']):,} rows, {mb(loud['bytes'])}",
        f"{n * 99 / 2**20:,.1f} MB printed",
        ratio(loud["bytes"], n * 99),
        "<= 1 MiB (log_cap)",
        loud["bytes"] <= 2**20,
    )
    table.note(f"run status completed: {bool(loud['status_ok'])}; baseline peak RSS {mb(base_rss)}")
    table.note(f"progress events recorded: {loud['events']} (printed: {(n + 99_999) // 100_000})")
    table.note(f"log marker: {loud['marker'] or '(none)'}")
    table.print()


if __name__ == "__main__":
    main()
