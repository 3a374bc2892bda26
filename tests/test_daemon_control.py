"""Every changing command through the running daemon: the control socket and the HTTP actions.

A real daemon process, the real CLI (a separate process each time), a real repository and
the real deploy script; what is recorded is read back from the database.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.support import RECONCILER, World, cli_env, wait_for
from tests.test_daemon import DaemonProcess, history, store_for
from tests.test_http_daemon import TOKEN, Served

pytestmark = pytest.mark.timeout(120)

ME = pwd.getpwuid(os.getuid()).pw_name


def actions(world: World) -> list[tuple[str, str, str | None, str, str | None]]:
    store = store_for(world)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT action, environment, service, actor, note"
                    " FROM operator_actions ORDER BY id"
                )
            ).all()
    finally:
        store.close()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def completed(world: World, version: str) -> list[dict]:
    return [d for d in history(world) if d["version"] == version and d["status"] == "completed"]


def no_watch(world: World) -> None:
    """Only an operator's `sync` makes this daemon look at git."""
    world.config.write_text(world.config.read_text().replace("watch = true", "watch = false"))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_suspend_rollback_deploy_resume_while_the_daemon_runs(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(lambda: completed(world, "1.0"), what="1.0")
        world.repo.set_env("staging", {"api": "1.1"})
        wait_for(lambda: completed(world, "1.1"), what="1.1")

        out = world.cli("suspend", "--env", "staging", "--reason", "incident 42")
        assert out.returncode == 0 and out.stdout == "staging suspended\n", out.stderr

        rb = world.cli(
            "rollback", "--env", "staging", "--service", "api", "--wait", "--reason", "1.1 leaks"
        )
        assert rb.returncode == 0, rb.stderr
        assert "is deploying 1.0 to staging/api" in rb.stderr
        assert "git wins" not in rb.stderr  # suspended: the rollback stays
        assert "completed" in rb.stdout and "1.0" in rb.stdout
        newest = history(world)[0]
        assert (newest["version"], newest["trigger"], newest["status"]) == (
            "1.0",
            "rollback",
            "completed",
        )
        # Live progress came over the socket.
        assert f"#{newest['id']} staging/api 1.0" in rb.stderr

        dep = world.cli("deploy", "--env", "staging", "--version", "1.2", "--wait", "--json")
        assert dep.returncode == 0, dep.stderr
        [record] = json.loads(dep.stdout)
        assert (record["version"], record["trigger"], record["status"]) == (
            "1.2",
            "manual",
            "completed",
        )

        res = world.cli("resume", "--env", "staging")
        assert res.returncode == 0 and res.stdout == "staging resumed\n", res.stderr
        # Resumed: git wins again, and at once.
        wait_for(
            lambda: [d for d in completed(world, "1.1") if d["id"] > record["id"]],
            what="git's version back after resume",
        )
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert actions(world) == [
        ("suspend", "staging", None, ME, "incident 42"),
        ("rollback", "staging", "api", ME, "to 1.0: 1.1 leaks"),
        ("deploy", "staging", "api", ME, "to 1.2"),
        ("resume", "staging", None, ME, None),
    ]
    log = daemon.log()
    assert (
        f"event=operator_action action=rollback environment=staging service=api actor='{ME}'"
        " version=1.0 reason='1.1 leaks'" in log
    )
    assert "event=operator_action action=suspend" in log and "Traceback" not in log


def test_deploy_through_the_daemon_warns_and_wait_fails_like_a_failed_run(tmp_path: Path):
    world = World(tmp_path, retries=1)
    no_watch(world)
    world.repo.set_env("staging", {"api": "1.0", "worker": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(lambda: len(completed(world, "1.0")) == 2, what="start")
        bad = world.cli(
            "deploy", "--env", "staging", "--service", "api", "--version", "3.0-fail", "--wait"
        )
        assert bad.returncode == 1, bad.stderr
        assert "warning: staging is not suspended: git wins at the next sync" in bad.stderr
        assert "3.0-fail" in bad.stdout and "failed" in bad.stdout
        # Without --wait the command returns once the daemon took the job.
        quick = world.cli("deploy", "--env", "staging", "--service", "worker", "--version", "3.1")
        assert quick.returncode == 0 and "is deploying 3.1 to staging/worker" in quick.stderr
        wait_for(lambda: completed(world, "3.1"), what="the daemon's deployment")
        # Mistakes are refused by the daemon in one line, with the CLI's exit status.
        unknown = world.cli("deploy", "--env", "qa", "--version", "1")
        assert unknown.returncode == 2 and unknown.stderr == (
            "reconciler: unknown environment 'qa'\n"
        )
        never = world.cli("rollback", "--env", "staging", "--service", "api", "--to", "9.9")
        assert never.returncode == 1 and "never completed version 9.9" in never.stderr
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_sync_wait_prints_each_outcome_and_exits_1_on_a_failure(tmp_path: Path):
    world = World(tmp_path, retries=1)
    no_watch(world)
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(lambda: completed(world, "1.0"), what="start")
        world.repo.set_env("staging", {"api": "2.0-fail"})
        failing = world.cli("sync", "--wait")
        assert failing.returncode == 1, failing.stderr
        assert "2.0-fail" in failing.stdout and "failed" in failing.stdout
        assert "staging/api 2.0-fail in_progress" in failing.stderr  # live progress

        world.repo.set_env("staging", {"api": "2.1"})
        passing = world.cli("sync", "--wait")
        assert passing.returncode == 0, passing.stderr
        assert "2.1" in passing.stdout and "completed" in passing.stdout
        assert "2.0-fail" not in passing.stdout

        # A run the daemon already started for the head commit is followed too.
        world.repo.set_env("staging", {"api": "2.2-gate"})
        assert world.cli("sync").returncode == 0
        wait_for(lambda: ("staging", "api", "2.2-gate") in world.started(), what="the run")
        follower = subprocess.Popen(
            [*RECONCILER, "--config", str(world.config), "sync", "--wait", "--json"],
            cwd=world.tmp,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: "event=operator_action action=sync" in daemon.log().split("2.2-gate")[-1],
            what="the follower's sync",
        )
        world.open_gate()
        out, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err
        doc = json.loads(out)
        assert [(d["version"], d["status"]) for d in doc["deployments"]] == [
            ("2.2-gate", "completed")
        ]
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_the_control_socket_is_the_daemon_users_alone(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    state = world.tmp / "state"
    try:
        wait_for(lambda: (state / "control.sock").exists(), what="the socket")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "control.sock").stat().st_mode) == 0o600
        # A request that is not one: a one-line refusal, and the daemon carries on.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(state / "control.sock"))
            s.sendall(b'{"action": "explode"}\n')
            answer = json.loads(s.makefile().readline())
        assert answer["type"] == "error" and answer["code"] == 2
        assert answer["message"].startswith("bad request:")
        assert world.cli("suspend", "--env", "staging").returncode == 0
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert not (state / "control.sock").exists()


def test_http_actions_need_the_token_and_record_its_holder(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    served = Served(world, server='token_holder = "ci-bot"\n')
    auth = {"Authorization": f"Bearer {TOKEN}"}
    c = served.client
    try:
        wait_for(lambda: completed(world, "1.0"), what="1.0")
        world.repo.set_env("staging", {"api": "1.1"})
        wait_for(lambda: completed(world, "1.1"), what="1.1")
        body = {"environment": "staging", "service": "api", "version": "1.3"}
        assert c.post("/api/v1/deploy", json=body).status_code == 401
        wrong = c.post("/api/v1/deploy", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert c.post("/api/v1/environments/staging/suspend").status_code == 401

        r = c.post("/api/v1/environments/staging/suspend", json={"reason": "freeze"}, headers=auth)
        assert r.status_code == 202, r.text
        r = c.post(
            "/api/v1/rollback", json={"environment": "staging", "service": "api"}, headers=auth
        )
        assert r.status_code == 202 and r.json()["warnings"] == [], r.text
        wait_for(
            lambda: (
                [d for d in served.deployments() if d["trigger"] == "rollback"]
                and served.deployments()[0]["status"] == "completed"
            ),
            what="the rollback",
        )
        r = c.post("/api/v1/deploy", json=body, headers=auth)
        assert r.status_code == 202 and r.json()["message"] == "deploying 1.3 to staging/api"
        wait_for(lambda: completed(world, "1.3"), what="the deploy")
        bad = c.post("/api/v1/deploy", json={**body, "version": "-x"}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"].startswith("bad body: version")
        unknown = c.post("/api/v1/deploy", json={**body, "environment": "qa"}, headers=auth)
        assert unknown.status_code == 404
        assert unknown.json() == {"error": "unknown environment 'qa'"}
        r = c.post("/api/v1/environments/staging/resume", headers=auth)
        assert r.status_code == 202, r.text
    finally:
        served.close()
    assert actions(world) == [
        ("suspend", "staging", None, "ci-bot", "freeze"),
        ("rollback", "staging", "api", "ci-bot", "to 1.0"),
        ("deploy", "staging", "api", "ci-bot", "to 1.3"),
        ("resume", "staging", None, "ci-bot", None),
    ]


def test_a_state_directory_too_long_for_a_socket_address_still_works(tmp_path: Path):
    from reconciler.channel import reachable

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(str(path)) > 108
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(reachable(path))
        server.listen()
        client.connect(reachable(path))
        assert path.exists()
