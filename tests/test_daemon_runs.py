"""What a run leaves behind, with a real daemon (or a real `reconciler deploy`) process:
no process after a crash and restart or a stop, a bounded log, a built environment."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.store import Store
from tests.support import RECONCILER, World, alive, cli_env, wait_for
from tests.test_daemon import history

pytestmark = pytest.mark.timeout(120)


class Daemon:
    def __init__(self, world: World, **env: str) -> None:
        self.stderr = world.tmp / f"daemon-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [*RECONCILER, "--config", str(world.config), "run"],
            cwd=world.tmp,
            env={**cli_env(), **env},
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("w"),
        )

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def script(world: World, text: str) -> None:
    path = world.tmp / "deploy.sh"
    path.write_text(text)
    path.chmod(0o755)


def test_kill_9_then_restart_ends_the_orphaned_run_before_running_the_service_again(
    world: World,
):
    world.repo.set_env("staging", {"api": "1.0-hang"})
    store = Store.for_reading(load_config(world.config, environ={}).database_url)
    with Daemon(world) as first:
        wait_for(world.pids.exists, what="the deployment to start")
        # The crash comes once the run's process group is recorded (the script may write
        # its pids before the daemon commits it: a crash in between leaves an unknown run).
        wait_for(store.unfinished_processes, what="the run's process group to be recorded")
        first.stop(signal.SIGKILL)
    store.close()
    leader, child = (int(p) for p in world.pids.read_text().split())
    assert alive(leader) and alive(child)  # a crash leaves the run going
    world.pids.unlink()
    with Daemon(world) as second:
        # The interrupted version is retried (SPEC §4 rule 8): by the time it runs again,
        # the orphan must be gone, or the service would run twice at once.
        wait_for(world.pids.exists, what="the retry to start")
        still = [p for p in (leader, child) if alive(p)]
        assert second.stop() == 0
    assert not still
    assert "event=orphan_ended" in second.log()
    first_run = history(world)[-1]
    assert first_run["status"] == "failed"
    assert first_run["error_message"] == "interrupted: reconciler stopped during the run"


def test_kill_9_before_the_process_group_is_recorded_then_restart_ends_the_orphan(world: World):
    """The window between a run's spawn and the record of its group: a test hook holds the
    record back for good, so the crash comes inside it every time."""
    world.repo.set_env("staging", {"api": "1.0-hang"})
    store = Store.for_reading(load_config(world.config, environ={}).database_url)
    with Daemon(world, RECONCILER_TEST_HOLD_PROCESS_RECORD="1") as first:
        pids = wait_for(lambda: _pids(world), what="the script to run")
        [(deployment_id, pgid, token)] = store.unfinished_runs()
        assert pgid is None and token is None  # nothing recorded says what runs
        first.stop(signal.SIGKILL)
    store.close()
    leader, child = pids
    assert alive(leader) and alive(child)  # a crash leaves the run going
    world.pids.unlink()
    with Daemon(world) as second:
        # Found by the marker in its environment, ended before the record is closed and
        # the version planned again: the retry never overlaps it.
        wait_for(lambda: _pids(world), what="the retry to start")
        still = [p for p in (leader, child) if alive(p)]
        assert second.stop() == 0
    assert not still
    assert f"event=orphan_ended id={deployment_id} pgid={leader}" in second.log()
    first_run = next(d for d in history(world) if d["id"] == deployment_id)
    assert first_run["status"] == "failed"
    assert first_run["error_message"] == "interrupted: reconciler stopped during the run"


def _pids(world: World) -> list[int] | None:
    """The -hang script's leader and child, once it has written both."""
    try:
        pids = [int(p) for p in world.pids.read_text().split()]
    except FileNotFoundError:
        return None
    return pids if len(pids) == 2 else None


def test_sigterm_leaves_no_process_of_a_run_that_ignores_sigterm(tmp_path: Path):
    world = World(tmp_path, shutdown_grace="1s")
    world.repo.set_env("staging", {"api": "1.0-trap"})
    with Daemon(world) as daemon:
        wait_for(world.pids.exists, what="the deployment to start")
        leader = int(world.pids.read_text().split()[0])
        assert group(leader)
        assert daemon.stop() == 0
    assert group(leader) == []
    [record] = history(world)
    assert record["status"] == "cancelled"


def test_a_daemons_runs_keep_a_bounded_log_end_with_their_leader_and_get_a_built_environment(
    tmp_path: Path,
):
    world = World(tmp_path, log_cap="64KiB")
    script(
        world,
        f"""#!/usr/bin/env bash
case "$2" in
  flood) exec {sys.executable} -c '
import sys
for i in range(300_000):
    sys.stdout.write(f"line {{i}}\\n")
print("{{\\"progress\\": 100, \\"message\\": \\"flooded\\"}}")
' ;;
  background) sleep 300 & echo "$$ $!" > "$DEPLOY_PIDS"; echo "left a child"; exit 0 ;;
  env) env ;;
esac
""",
    )
    world.repo.set_env("staging", {"flood": "1", "background": "1", "env": "1"}, timeout="30")
    database_url = load_config(world.config, environ={}).database_url
    canary = {"AWS_SECRET_ACCESS_KEY": "canary-aws", "RECONCILER_DATABASE__URL": database_url}
    with Daemon(world, **canary) as daemon:
        records = wait_for(
            lambda: (
                len([d for d in history(world) if d["status"] not in ("pending",)]) == 3
                and all(d["completed_at"] for d in history(world))
                and history(world)
            ),
            timeout=60,
            what="three deployments",
        )
        assert daemon.stop() == 0
    by_service = {d["service"]: d for d in records}
    assert {s: d["status"] for s, d in by_service.items()} == dict.fromkeys(
        ("flood", "background", "env"), "completed"
    )
    assert by_service["background"]["duration_seconds"] < 10  # not the 30 s deadline
    assert not any(alive(int(p)) for p in world.pids.read_text().split())

    def shown(service: str) -> dict:
        import json

        out = world.cli("show", str(by_service[service]["id"]), "--json", check=True)
        return json.loads(out.stdout)

    flood = shown("flood")
    assert len(flood["log"].encode()) <= 64 * 1024 + 200
    assert re.search(r"\n… [\d,]+ lines \([\d.]+ [kM]B\) dropped …\n", flood["log"])
    assert flood["log"].startswith("line 0\n")
    assert "line 299999\n" in flood["log"]
    assert [p["message"] for p in flood["progress"]][-2:] == ["flooded", "flood is at 1"]

    env = shown("env")["log"]
    assert "canary" not in env and database_url not in env
    assert "RECONCILER_DATABASE__URL" not in env and "RECONCILER_SERVICE=env" in env


def test_a_second_ctrl_c_during_deploy_kills_a_command_that_ignores_sigterm(tmp_path: Path):
    world = World(tmp_path, kill_grace="60s")
    script(
        world,
        """#!/usr/bin/env bash
trap 'echo term >> "$DEPLOY_LOG"' TERM
echo "$$" > "$DEPLOY_PIDS"
while :; do sleep 1 & wait $!; done
""",
    )
    world.repo.set_env("staging", {"api": "0.9"})
    cli = subprocess.Popen(
        [*RECONCILER, "--config", str(world.config), "deploy", "--env=staging", "--version=1.0"],
        cwd=world.tmp,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(world.pids.exists, what="the deployment to start")
        pgid = int(world.pids.read_text())
        cli.send_signal(signal.SIGINT)
        wait_for(lambda: "term" in world.log.read_text(), what="the SIGTERM to arrive")
        cli.send_signal(signal.SIGINT)
        cli.wait(timeout=20)  # well inside the 60 s kill grace
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130
    err = cli.stderr.read() if cli.stderr else ""
    assert err.strip().splitlines()[-1] == "reconciler: interrupted" and "Traceback" not in err
    assert group(pgid) == []
    [record] = history(world)
    assert record["status"] == "cancelled"


def test_the_migration_child_gets_the_database_url_off_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from reconciler import daemon

    argv_log = tmp_path / "argv.log"
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" > "{argv_log}"\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    url = f"sqlite:///{tmp_path / 'secret-name.db'}"
    applied = asyncio.run(daemon.migrate_in_child(url))
    assert applied and applied[0] == "0001"
    assert "reconciler.store.migrate" in argv_log.read_text()
    assert "secret-name" not in argv_log.read_text()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_sigterm_to_a_standalone_deploy_stops_its_command_and_records_it(tmp_path: Path):
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "0.9"})
    cli = subprocess.Popen(
        [*RECONCILER, "--config", str(world.config), "deploy", "--env=staging", "--version=1-trap"],
        cwd=world.tmp,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(world.pids.exists, what="the deployment to start")
        pgid = int(world.pids.read_text().split()[0])
        cli.send_signal(signal.SIGTERM)
        _, err = cli.communicate(timeout=20)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 143
    assert err.strip().splitlines()[-1] == "reconciler: stopped by SIGTERM"
    assert "Traceback" not in err
    assert group(pgid) == []
    [record] = history(world)
    assert record["status"] == "cancelled"
