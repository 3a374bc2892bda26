"""The daemon as users run it: a real process, a real repository, signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.store import Store
from tests.support import RECONCILER, World, alive, cli_env, wait_for

pytestmark = pytest.mark.timeout(90)


class DaemonProcess:
    def __init__(self, world: World) -> None:
        self.world = world
        self.stderr = world.tmp / f"daemon-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [*RECONCILER, "--config", str(world.config), "run"],
            cwd=world.tmp,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("w"),
        )

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def store_for(world: World) -> Store:
    return Store.from_url(load_config(world.config, environ={}).database_url, migrate=False)


def history(world: World) -> list[dict]:
    out = world.cli("history", "--json", check=True)
    return json.loads(out.stdout)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_commit_is_deployed_by_the_watching_daemon(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(
            lambda: any(d["status"] == "completed" for d in history(world)), what="first deployment"
        )
        sha = world.repo.set_env("staging", {"api": "1.1"})
        done = wait_for(
            lambda: [
                d for d in history(world) if d["version"] == "1.1" and d["status"] == "completed"
            ],
            what="the commit to be deployed",
        )
        assert done[0]["commit"] == sha and done[0]["previous_version"] == "1.0"
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    log = daemon.log()
    assert "event=sync trigger=watch" in log and "event=stopped" in log
    assert "Traceback" not in log
    # The first sync is logged once, as `startup`: the watch coming up before it needs no
    # look of its own (a sync reads the head after the watch is in place anyway).
    syncs = [line for line in log.splitlines() if "event=sync " in line]
    assert "trigger=startup" in syncs[0] and "full=True" in syncs[0], syncs
    assert "trigger=watch" in syncs[1] and f"commit={sha[:12]}" in syncs[1], syncs


def test_kill_9_mid_deployment_is_recorded_interrupted_and_recovered(world: World):
    world.repo.set_env("staging", {"api": "1.0-hang"})
    daemon = DaemonProcess(world)
    try:
        wait_for(world.pids.exists, what="the deployment to start")
        # `in_progress` is recorded with the run's process group, once the command runs.
        wait_for(
            lambda: [d["status"] for d in history(world)] == ["in_progress"],
            what="the run recorded in_progress",
        )
        daemon.stop(signal.SIGKILL)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    # The run itself is orphaned, as after a real crash; end it as the host's reboot would.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(world.pids.read_text().split()[0]), signal.SIGKILL)
    [running] = history(world)
    assert running["status"] == "in_progress"
    world.repo.set_env("staging", {"api": "1.1"})
    daemon = DaemonProcess(world)
    try:
        wait_for(
            lambda: any(
                d["version"] == "1.1" and d["status"] == "completed" for d in history(world)
            ),
            what="recovery",
        )
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    records = {d["version"]: d for d in history(world)}
    assert records["1.0-hang"]["status"] == "failed"
    assert records["1.0-hang"]["error_message"] == "interrupted: reconciler stopped during the run"
    assert records["1.1"]["previous_version"] is None


def test_sigterm_stops_within_shutdown_grace_and_cancels_the_run(tmp_path: Path):
    world = World(tmp_path, shutdown_grace="1s")
    world.repo.set_env("staging", {"api": "1.0-hang"})
    daemon = DaemonProcess(world)
    try:
        wait_for(world.pids.exists, what="the deployment to start")
        t0 = time.monotonic()
        code = daemon.stop(signal.SIGTERM)
        elapsed = time.monotonic() - t0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert code == 0
    assert elapsed < 1 + 1 + 5  # grace + kill grace + start-up slack
    [record] = history(world)
    assert record["status"] == "cancelled"
    assert not any(alive(int(p)) for p in world.pids.read_text().split())


def test_a_second_daemon_on_the_same_state_refuses(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(
            lambda: (world.tmp / "state" / "reconciler.lock").exists() and history(world),
            what="start",
        )
        second = world.cli("run", timeout=30)
        assert second.returncode == 2
        assert "another reconciler daemon" in second.stderr and "Traceback" not in second.stderr
        # `sync` asks the running daemon instead of racing it.
        asked = world.cli("sync")
        assert asked.returncode == 0 and "asked the running daemon" in asked.stderr
        # So does `deploy`: the daemon carries it out (tests/test_daemon_control.py).
        deploy = world.cli("deploy", "--env", "staging", "--version", "9")
        assert deploy.returncode == 0 and "the daemon (pid" in deploy.stderr, deploy.stderr
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_sync_wait_follows_the_daemon_and_reports_failures(tmp_path: Path):
    world = World(tmp_path, retries=1)
    # No watch, no polling: only an operator's `sync` makes this daemon look at git.
    world.config.write_text(world.config.read_text().replace("watch = true", "watch = false"))
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(lambda: any(d["status"] == "completed" for d in history(world)), what="start")
        world.repo.set_env("staging", {"api": "2.0-fail"})
        out = world.cli("sync", "--wait", "--json")
        assert out.returncode == 1, out.stderr
        assert "asked the running daemon" in out.stderr
        doc = json.loads(out.stdout)
        assert doc["result"] == "ok" and doc["environments_changed"] == ["staging"]
        assert [(d["version"], d["status"]) for d in doc["deployments"]] == [("2.0-fail", "failed")]
        quick = world.cli("sync")
        assert quick.returncode == 0 and "asked the running daemon" in quick.stderr
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_daemon_imports_leave_out_what_only_some_daemons_use():
    """The dashboard's templates and the published head's HTTP client (whose import loads
    rich and pygments too) are imported when used: ~6 MB and ~0.3 s of each daemon's start."""
    script = "import sys, reconciler.daemon; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=cli_env()
    ).stdout.split()
    tops = {name.split(".")[0] for name in out}
    assert "sqlalchemy" in tops  # it did import the daemon
    for lazy in ("jinja2", "httpx", "rich", "pygments"):
        assert lazy not in tops, lazy
