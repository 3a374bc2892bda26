"""Several `reconciler run` replicas on one PostgreSQL schema (docs/scaling.md): shared
work, failover after `kill -9`, a terminated database session survived, and no environment
ever deployed twice at once. Real processes, a real deploy script, real PostgreSQL."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reconciler.store import Store
from tests.support import RECONCILER, DaemonProcess, Repo, cli_env, env_yaml, wait_for
from tests.test_http import validator

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

ENVIRONMENTS = [f"env{i:02d}" for i in range(30)]
TERMINAL = ["completed", "failed", "rolled_back", "timed_out", "cancelled"]

# Takes 1-2 s; writes its own start and end times (and pid) to $TIMES. A SIGTERM (a new
# holder ending what a killed replica left running) ends it at once, saying so.
SCRIPT = r"""#!/usr/bin/env bash
set -u
env="$1"; version="$2"
now() { date +%s.%N; }
echo "start $env $version $$ $(now)" >> "$TIMES"
trap 'echo "end $env $version $$ $(now) killed" >> "$TIMES"; exit 143' TERM
sleep "1.$((RANDOM % 10))" & wait $!
echo "end $env $version $$ $(now) ok" >> "$TIMES"
"""


def _config(
    tmp: Path, name: str, url: str, script: Path, times: Path, leases: str = 'lease_ttl = "3s"'
) -> Path:
    app_url = make_url(url).update_query_dict({"application_name": name})
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[repository]
url = "{tmp / "desired"}"
branch = "main"
poll_interval = "1s"
watch = true

[database]
url = "{app_url.render_as_string(hide_password=False)}"

[daemon]
state_dir = "{tmp / name}"
timezone = "UTC"
max_parallel = 4
retry_backoff = "1s"
shutdown_grace = "10s"
kill_grace = "1s"
{leases}

[server]
listen = ""

[providers.local]
type = "command"
command = ["{script}", "{{environment}}", "{{version}}"]
env = {{ TIMES = "{times}" }}
""")
    return path


def _runs(times: Path) -> dict[str, list[tuple[float, float | None, str]]]:
    """Per environment: (start, end or None, version) of each run, from the script's lines."""
    starts: dict[str, tuple[str, float, str]] = {}
    out: dict[str, list[tuple[float, float | None, str]]] = defaultdict(list)
    for line in times.read_text().splitlines():
        kind, env, version, pid, when, *_ = line.split()
        if kind == "start":
            starts[pid] = (env, float(when), version)
        else:
            env, started, version = starts.pop(pid)
            out[env].append((started, float(when), version))
    for env, started, version in starts.values():
        out[env].append((started, None, version))
    return out


def test_three_replicas_share_the_work_and_survive_a_kill_and_a_lost_connection(
    tmp_path: Path, pg_url: str
) -> None:
    repo = Repo(tmp_path / "desired")
    for env in ENVIRONMENTS:
        repo.write(f"{env}.yaml", env_yaml(env, {"api": "1.0"}))
    repo.commit("thirty environments at 1.0")
    script = tmp_path / "deploy.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    times = tmp_path / "times.log"
    times.touch()
    Store.from_url(pg_url).close()  # the schema, so that the checks below can read it
    db = create_engine(pg_url)
    admin = create_engine(
        make_url(pg_url).update_query_dict({}, append=False), isolation_level="AUTOCOMMIT"
    )
    names = ("r1", "r2", "r3")
    configs = {n: _config(tmp_path, n, pg_url, script, times) for n in names}
    replicas = {n: DaemonProcess(tmp_path, configs[n], n) for n in names}
    try:

        def holders() -> dict[str, str]:
            with db.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT l.environment, r.id FROM environment_leases l JOIN replicas r"
                        " ON r.id = l.holder WHERE l.expires_at > now()"
                    )
                ).all()
            return {env: holder for env, holder in rows}

        def pid_of(holder: str) -> int:
            return int(holder.split(":")[1])

        # All three take part.
        wait_for(
            lambda: (
                {pid_of(h) for h in holders().values()} == {r.proc.pid for r in replicas.values()}
            ),
            timeout=60,
            what="every replica to hold leases",
        )

        # Kill -9 r1 while one of its deployments runs.
        victim = replicas["r1"]

        def victim_running() -> bool:
            mine = {e for e, h in holders().items() if pid_of(h) == victim.proc.pid}
            return any(
                end is None and env in mine
                for env, runs in _runs(times).items()
                for _, end, _ in runs
            )

        wait_for(victim_running, timeout=60, what="a deployment of r1 to run")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)

        # New desired versions for everyone, while r1's leases are still to expire.
        for env in ENVIRONMENTS:
            repo.write(f"{env}.yaml", env_yaml(env, {"api": "2.0"}))
        repo.commit("all at 2.0")

        # Terminate r2's database sessions once: it reconnects and carries on.
        with admin.connect() as conn:
            ended = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'r2'"
                )
            ).scalar()
        assert ended and ended > 0

        def done() -> bool:
            with db.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT DISTINCT environment FROM deployments"
                        " WHERE version = '2.0' AND status = 'completed'"
                    )
                ).all()
            return len(rows) == len(ENVIRONMENTS)

        wait_for(done, timeout=90, what="every environment to reach 2.0")
        # The survivors hold everything now, r2 included (it survived its lost sessions).
        survivors = {replicas["r2"].proc.pid, replicas["r3"].proc.pid}
        wait_for(
            lambda: {pid_of(h) for h in holders().values()} == survivors,
            timeout=30,
            what="r2 and r3 to hold every environment",
        )
        assert replicas["r2"].proc.poll() is None, replicas["r2"].log()
        # Any replica's configuration reads the same board: the killed one is gone.
        board = json.loads(_cli(tmp_path, configs["r1"], "status", "--replicas", "--json"))
        validator("Replicas").validate(board)
        assert board["replicated"] is True and len(board["leases"]) == len(ENVIRONMENTS)
        live = {r["pid"]: r["live"] for r in board["replicas"]}
        assert live == {victim.proc.pid: False, **dict.fromkeys(survivors, True)}, board
        shown = _cli(tmp_path, configs["r2"], "status", "--replicas")
        assert shown.count(" live ") == 2 and shown.count(" gone ") == 1, shown
        for name in ("r2", "r3"):
            replicas[name].proc.send_signal(signal.SIGTERM)
        for name in ("r2", "r3"):
            assert replicas[name].proc.wait(30) == 0, replicas[name].log()
    finally:
        for r in replicas.values():
            r.kill()

    # The script's own times: no environment ever ran two deployments at once, and every
    # run ended (the killed replica's orphan by itself, or ended by the new holder).
    runs = _runs(times)
    for env in ENVIRONMENTS:
        spans = sorted(runs[env])
        assert all(end is not None for _, end, _ in spans), (env, spans)
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            assert end is not None and start >= end, (env, spans)
        assert spans[-1][2] == "2.0", (env, spans)

    with db.connect() as conn:
        # Every deployment ended, with exactly one terminal record.
        open_ = conn.execute(
            text("SELECT count(*) FROM deployments WHERE status <> ALL(:t)"), {"t": TERMINAL}
        ).scalar()
        assert open_ == 0
        twice = conn.execute(
            text(
                "SELECT deployment_id FROM deployment_events WHERE status = ANY(:t)"
                " GROUP BY deployment_id HAVING count(*) <> 1"
            ),
            {"t": TERMINAL},
        ).all()
        assert twice == []
        ledger = conn.execute(
            text(
                "SELECT ref FROM audit_ledger WHERE kind = 'deployment' GROUP BY ref"
                " HAVING count(*) <> 1"
            )
        ).all()
        assert ledger == []
        # The killed replica's run was recorded interrupted by the one that took over.
        interrupted = conn.execute(
            text("SELECT count(*) FROM deployments WHERE error_message LIKE 'interrupted%'")
        ).scalar()
        assert interrupted and interrupted >= 1
    db.dispose()
    admin.dispose()

    for name in ("r2", "r3"):
        log = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in log, log
    assert json.loads(_cli(tmp_path, configs["r2"], "audit", "verify", "--json"))["ok"] is True


def test_replicas_hear_each_other_between_lease_passes(tmp_path: Path, pg_url: str) -> None:
    """Lease passes 30 s apart: a newcomer still gets its share at once (`replicas`
    notices), and `status` on one replica shows what the other deployed (`progress`)."""
    envs = [f"e{i}" for i in range(6)]
    repo = Repo(tmp_path / "desired")
    for env in envs:
        repo.write(f"{env}.yaml", env_yaml(env, {"api": "1.0"}))
    repo.commit("six environments at 1.0")
    script = tmp_path / "deploy.sh"
    script.write_text(SCRIPT.replace('sleep "1.$((RANDOM % 10))"', "sleep 0.1"))
    script.chmod(0o755)
    times = tmp_path / "times.log"
    times.touch()
    Store.from_url(pg_url).close()
    db = create_engine(pg_url)
    slow = 'lease_ttl = "90s"\nlease_renew = "30s"'
    configs = {n: _config(tmp_path, n, pg_url, script, times, slow) for n in ("r1", "r2")}
    for config in configs.values():  # no poll: its syncs would make lease passes too
        config.write_text(config.read_text().replace('poll_interval = "1s"', 'poll_interval = "0"'))

    def held_by(pid: int) -> set[str]:
        with db.connect() as conn:
            rows = conn.execute(text("SELECT environment, holder FROM environment_leases")).all()
        return {env for env, holder in rows if holder and int(holder.split(":")[1]) == pid}

    def deployed(config: Path) -> dict[str, str | None]:
        entries = json.loads(_cli(tmp_path, config, "status", "--json"))
        entries = entries["services"] if isinstance(entries, dict) else entries
        return {e["environment"]: e["deployed"] for e in entries}

    r1 = DaemonProcess(tmp_path, configs["r1"], "r1")
    r2: DaemonProcess | None = None
    try:
        wait_for(lambda: held_by(r1.proc.pid) == set(envs), timeout=30, what="r1 to hold all")
        wait_for(
            lambda: set(deployed(configs["r1"]).values()) == {"1.0"},
            timeout=30,
            what="r1 to deploy 1.0 everywhere",
        )
        r2 = DaemonProcess(tmp_path, configs["r2"], "r2")
        proc = r2.proc
        # Well inside the 30 s between passes: r1 released half when r2 joined, and r2
        # claimed them when r1 said so.
        wait_for(lambda: len(held_by(proc.pid)) == 3, timeout=15, what="r2 to get its share")
        assert len(held_by(r1.proc.pid)) == 3
        # An operator's deploy asked of the replica that does not hold the environment is
        # refused, naming the one that does.
        theirs = sorted(held_by(proc.pid))[0]
        holder = _holder(db, theirs)
        deploy = ["deploy", "--env", theirs, "--service", "api", "--version", "1.5"]
        asked = subprocess.run(
            [*RECONCILER, "--config", str(configs["r1"]), *deploy],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=cli_env(),
            timeout=60,
        )
        assert asked.returncode == 1, asked.stdout + asked.stderr
        assert f"deployed by replica {holder}" in asked.stderr, asked.stderr
        for env in envs:
            repo.write(f"{env}.yaml", env_yaml(env, {"api": "2.0"}))
        repo.commit("all at 2.0")
        # r1's status (its in-memory fleet summary, over the control socket) follows the
        # deployments r2 runs too.
        wait_for(
            lambda: set(deployed(configs["r1"]).values()) == {"2.0"},
            timeout=30,
            what="r1's status to show 2.0 everywhere",
        )
        assert set(deployed(configs["r2"]).values()) == {"2.0"}
    finally:
        for r in (r1, r2):
            if r is not None:
                r.kill()
        db.dispose()


def _holder(db: Any, environment: str) -> str:
    with db.connect() as conn:
        return str(
            conn.execute(
                text("SELECT holder FROM environment_leases WHERE environment = :e"),
                {"e": environment},
            ).scalar_one()
        )


def _cli(tmp: Path, config: Path, *args: str) -> str:
    out = subprocess.run(
        [*RECONCILER, "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=cli_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout
