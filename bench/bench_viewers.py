"""Live viewers vs deployment speed: one deployment with 0 and with N SSE viewers.

Runs the real daemon (`python -m reconciler --config X run` with `[server]`, a subprocess).
The deploy command is a small Python script that waits on a FIFO, then prints ~300 SPEC §6
progress lines 10 ms apart and exits. For each scenario the benchmark commits a new
version, waits for its deployment to be recorded, opens the viewers
(`GET /api/v1/deployments/{id}/events`, raw sockets in this process, each read to `end`),
and only then opens the gate, so every viewer watches the whole run.

Duration = the record's `completed_at` - the `at` of its first step's progress event (both
the daemon's clock, read from its SQLite database at full precision): how long the daemon took to take in the command's output. Viewers also
report how many progress events each received (a slow viewer may skip, never stall).

    .venv/bin/python bench/bench_viewers.py                 # 200 viewers, 300 lines
    .venv/bin/python bench/bench_viewers.py --viewers 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    RECONCILER,
    Table,
    cli_env,
    commit_all,
    machine,
    make_repo,
    ratio,
    say,
    sec,
    stop_process,
    wait_for,
    write_config,
)

DEPLOY_SCRIPT = """\
import json, os, sys, time
with open(os.environ["BENCH_GATE"]) as gate:
    gate.readline()
lines = int(os.environ["BENCH_LINES"])
for i in range(lines):
    print(json.dumps({"progress": i * 100 // lines, "message": f"step {i}"}), flush=True)
    time.sleep(0.01)
"""

TERMINAL = ("completed", "failed", "rolled_back", "timed_out", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


async def _viewer(port: int, dep_id: int, ready: asyncio.Event, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /api/v1/deployments/{dep_id}/events HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    )
    await writer.drain()
    seen = 0
    first = True
    try:
        while line := await reader.readline():
            if first:
                first = False
                ready.set()
            if line == b"event: progress\n":
                seen += 1
            elif line == b"event: end\n":
                break
    finally:
        counts.append(seen)
        writer.close()


async def _viewers(
    port: int, dep_id: int, n: int, connected: threading.Event, counts: list[int]
) -> None:
    readies = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(_viewer(port, dep_id, r, counts)) for r in readies]
    await asyncio.gather(*(r.wait() for r in readies))
    connected.set()
    await asyncio.gather(*tasks)


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def scenario(
    tmp: Path, repo: Path, port: int, gate: Path, version: str, viewers: int
) -> tuple[float, str, list[int]]:
    (repo / "bench.yaml").write_text(
        "environment: bench\nprovider: local\nservices:\n"
        f'  api:\n    version: "{version}"\ntimeout: 120s\n'
    )
    commit_all(repo, version)
    [dep] = wait_for(
        lambda: [
            d
            for d in get_json(port, "/api/v1/deployments?limit=5")
            if d["version"] == version and d["status"] == "in_progress"
        ],
        60,
        f"the deployment of {version}",
        0.02,
    )
    counts: list[int] = []
    connected = threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(_viewers(port, dep["id"], viewers, connected, counts))
    )
    if viewers:
        thread.start()
        if not connected.wait(60):
            raise TimeoutError("the viewers did not connect")
    with gate.open("w") as f:
        f.write("go\n")
    wait_for(
        lambda: get_json(port, f"/api/v1/deployments/{dep['id']}")["status"] in TERMINAL,
        300,
        f"{version} to end",
        0.05,
    )
    if viewers:
        thread.join(120)
    return db_duration(tmp / "state" / "reconciler.db", dep["id"]), dep_status(port, dep), counts


def dep_status(port: int, dep: dict[str, Any]) -> str:
    return str(get_json(port, f"/api/v1/deployments/{dep['id']}")["status"])


def db_duration(db: Path, dep_id: int) -> float:
    """completed_at - the first step's event, at the database's full (microsecond) precision."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        [completed] = conn.execute(
            "SELECT completed_at FROM deployments WHERE id = ?", (dep_id,)
        ).fetchone()
        [first] = conn.execute(
            "SELECT min(at) FROM deployment_events WHERE deployment_id = ? AND message = ?",
            (dep_id, "step 0"),
        ).fetchone()
    return _at(completed) - _at(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--lines", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-viewers-") as name:
        tmp = Path(name)
        repo = make_repo(tmp / "desired")
        (repo / "README").write_text("bench\n")
        commit_all(repo, "initial")
        script = tmp / "deploy.py"
        script.write_text(DEPLOY_SCRIPT)
        gate = tmp / "gate.fifo"
        os.mkfifo(gate)
        port = free_port()
        config = write_config(
            tmp,
            [PYTHON, str(script)],
            env={"BENCH_GATE": str(gate), "BENCH_LINES": str(args.lines)},
        )
        config.write_text(config.read_text() + f'\n[server]\nlisten = "127.0.0.1:{port}"\n')
        daemon_log = tmp / "daemon.log"
        with daemon_log.open("w") as err:
            proc = subprocess.Popen(
                [*RECONCILER, "--config", str(config), "run"],
                cwd=tmp,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:

                def up() -> bool:
                    try:
                        return bool(get_json(port, "/healthz"))
                    except OSError:
                        return False

                wait_for(up, 60, "the HTTP server", 0.05)
                say(f"daemon pid {proc.pid} up on port {port}")
                results = []
                for i, n in enumerate((0, args.viewers)):
                    started = time.monotonic()
                    duration, status, counts = scenario(tmp, repo, port, gate, f"1.{i}", n)
                    say(
                        f"  {n} viewers: {status} in {duration:.2f} s "
                        f"(scenario {time.monotonic() - started:.1f} s)"
                    )
                    results.append((n, duration, status, counts))
            finally:
                stop_process(proc)
        tracebacks = daemon_log.read_text().count("Traceback")
    (_, alone, alone_status, _), (n, watched, watched_status, counts) = results
    table = Table(
        f"Deployment of {args.lines} progress lines, 0 vs {n} live SSE viewers ({machine()})"
    )
    table.add(
        f"duration with {n} viewers",
        f"{sec(watched)} ({watched_status})",
        f"{sec(alone)} ({alone_status})",
        ratio(watched, alone),
        "<= 1.25x",
        ratio(watched, alone) <= 1.25,
    )
    if counts:
        table.add(
            "progress events per viewer (min / max)",
            f"{min(counts)} / {max(counts)}",
            f"{args.lines}",
        )
    table.add("tracebacks in the daemon's log", str(tracebacks), target="0", met=tracebacks == 0)
    table.print()


if __name__ == "__main__":
    main()
