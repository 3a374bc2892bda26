"""Real daemon processes sharing one database: SQLite refuses a second, PostgreSQL shares."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import RECONCILER, DaemonProcess, World, cli_env, wait_for

pytestmark = pytest.mark.timeout(120)


class Daemon(DaemonProcess):
    def __init__(self, world: World, config: Path) -> None:
        super().__init__(world.tmp, config)


def _history(world: World) -> list[dict]:
    return json.loads(world.cli("history", "--json", check=True).stdout)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'reconciler.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_a_second_daemon_on_the_same_database_leaves_the_first_alone(
    tmp_path: Path, database: str
) -> None:
    """SQLite: the second daemon refuses (single-replica). PostgreSQL: it joins as a replica
    (docs/scaling.md) and takes the first one's environment over only once it is killed."""
    sqlite = database.startswith("sqlite")
    world = World(tmp_path, lease_ttl="2s")
    text = world.config.read_text() + f'\n[database]\nurl = "{database}"\n'
    world.config.write_text(text)
    other = tmp_path / "other.toml"
    other.write_text(text.replace('state_dir = "state"', 'state_dir = "state2"'))
    world.repo.set_env("staging", {"api": "1.0-hang"})
    first = Daemon(world, world.config)
    second: Daemon | None = None
    try:
        wait_for(world.pids.exists, what="the first daemon's deployment to start")
        second = Daemon(world, other)
        if sqlite:
            code = second.proc.wait(30)
            message = second.log()
            assert code == 2, message
            assert message.count("\n") == 1 and "Traceback" not in message
            for part in (f"pid {first.proc.pid}", str(tmp_path / "state"), "since"):
                assert part in message, message
            assert "SQLite is single-replica" in message and "PostgreSQL" in message
        else:
            wait_for(lambda: "event=ready" in second.log(), what="the second replica to join")
        # Nor does a command that deploys from the other state directory run beside it.
        deploy = subprocess.run(
            [*RECONCILER, "--config", str(other), "deploy", "--env", "staging", "--version", "9"],
            capture_output=True,
            text=True,
            cwd=world.tmp,
            env=cli_env(),
            timeout=60,
        )
        if sqlite:
            assert deploy.returncode == 2 and "holds the database" in deploy.stderr, deploy.stderr
        else:  # asked of the second replica, which does not hold staging: refused
            assert deploy.returncode == 1, deploy.stderr
            assert "is deployed by replica" in deploy.stderr and "Traceback" not in deploy.stderr
        # The first daemon's run was neither failed nor started again.
        [record] = _history(world)
        assert record["status"] == "in_progress"
        assert [r[0] for r in world.runs()] == ["start"]

        # A killed holder does not block the next start: the lock dies with it.
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(world.pids.read_text().split()[0]), signal.SIGKILL)
        if sqlite:
            second = Daemon(world, other)
        wait_for(
            lambda: _history(world)[-1]["status"] == "failed",
            what="the second daemon to start and recover",
        )
        assert second.proc.poll() is None, second.log()
        assert _history(world)[-1]["error_message"].startswith("interrupted")
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
            os.killpg(int(world.pids.read_text().split()[0]), signal.SIGKILL)


def test_a_sqlite_file_deleted_under_the_daemon_makes_it_unready_and_says_why(
    tmp_path: Path,
) -> None:
    from tests.test_http_daemon import Served

    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    served = Served(world)
    try:
        wait_for(lambda: served.client.get("/readyz").status_code == 200, what="ready")
        database = tmp_path / "state" / "reconciler.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        for _ in range(3):  # asked again and again: said once in the log
            r = served.client.get("/readyz")
            assert r.status_code == 503, r.text
            assert "deleted" in r.json()["database"] and str(database) in r.json()["database"]
        assert "reconciler_database_ok 0.0" in served.client.get("/metrics").text
        wait_for(
            lambda: "event=database_lost" in served.stderr.read_text(), what="the event logged"
        )
        assert served.stderr.read_text().count("event=database_lost") == 1
    finally:
        served.close()
    assert "Traceback" not in served.stderr.read_text()


@pytest.mark.postgres
def test_a_daemon_whose_postgres_lock_was_taken_stops_with_exit_2(
    tmp_path: Path, pg_url: str
) -> None:
    from datetime import UTC, datetime

    from reconciler.store import Store
    from reconciler.store.holder import DatabaseLock
    from tests.test_store_holder import _terminate_holders

    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + f'\n[database]\nurl = "{pg_url}"\n')
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = Daemon(world, world.config)
    store = Store.from_url(pg_url, migrate=False)
    intruder = DatabaseLock(store.engine)
    try:
        wait_for(lambda: _history(world), what="the first deployment")
        # Its session ends (a server restart, say) and another process is quicker.
        _terminate_holders(pg_url)
        intruder.acquire(role="daemon", state_dir="/srv/intruder", at=datetime.now(UTC))
        code = daemon.proc.wait(30)
        log = daemon.log()
        assert code == 2, log
        assert "event=database_lock_lost" in log and "/srv/intruder" in log.splitlines()[-1]
        assert "Traceback" not in log
    finally:
        daemon.kill()
        intruder.release()
        store.close()
