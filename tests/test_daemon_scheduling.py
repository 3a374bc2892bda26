"""Scheduling hardening (issue 6) in a real daemon process: a stale decision never
deploys, and an operator's sync is not lost when a commit's request coalesces with it."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from reconciler.config import load_config
from reconciler.store import DeploymentRecord
from tests.support import World, git, wait_for
from tests.test_daemon import DaemonProcess, store_for
from tests.test_http_daemon import SECRET, TOKEN, Served

pytestmark = pytest.mark.timeout(120)


def _deployments(world: World) -> list[DeploymentRecord]:
    store = store_for(world)
    try:
        return store.history(limit=1000)
    except OperationalError:  # the daemon has not migrated the new database yet
        return []
    finally:
        store.close()


def _synced(world: World, sha: str) -> bool:
    store = store_for(world)
    try:
        return any(s.commit_sha == sha and s.ended_at is not None for s in store.list_syncs(5))
    finally:
        store.close()


def _done(world: World, env: str, version: str) -> list[DeploymentRecord]:
    return [
        d
        for d in _deployments(world)
        if (d.environment, d.version, d.status) == (env, version, "completed")
    ]


def test_a_decision_that_waited_for_a_slot_deploys_the_newest_version(tmp_path: Path) -> None:
    """max_parallel = 1. Production plans 2.0 while staging holds the only slot; 3.0 is
    committed before the slot frees: 3.0 deploys, named with its own commit; 2.0 never."""
    world = World(tmp_path, max_parallel=1)
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(
            lambda: (
                len(_deployments(world)) == 2
                and all(d.status == "completed" for d in _deployments(world))
            ),
            what="the first deployments",
        )
        world.repo.set_env("staging", {"api": "2.0-gate"})
        wait_for(
            lambda: [
                d
                for d in _deployments(world)
                if d.version == "2.0-gate" and d.status == "in_progress"
            ],
            what="staging to hold the slot",
        )
        second = world.repo.set_env("production", {"api": "2.0"})
        wait_for(lambda: _synced(world, second), what="the 2.0 sync")
        third = world.repo.set_env("production", {"api": "3.0"})
        wait_for(lambda: _synced(world, third), what="the 3.0 sync")
        world.open_gate()
        done = wait_for(lambda: _done(world, "production", "3.0"), what="3.0 deployed")
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert done[0].commit == third
    production = [d.version for d in reversed(_deployments(world)) if d.environment == "production"]
    assert production == ["1.0", "3.0"]
    assert ("production", "api", "2.0") not in world.started()
    assert "Traceback" not in daemon.log() and "event=runner_error" not in daemon.log()


def _push(served: Served, sha: str) -> None:
    body = json.dumps(
        {"ref": "refs/heads/main", "after": sha, "repository": {"full_name": "o/desired"}}
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256="
        + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
    }
    r = served.client.post("/hooks/git", content=body, headers=headers)
    assert (r.status_code, r.json()) == (202, {"status": "accepted"})


def test_an_operators_sync_survives_a_webhook_that_coalesces_with_it(tmp_path: Path) -> None:
    """`resume` asks for a manual sync (it wakes every environment); a push to another
    environment asks for a webhook sync right after, while a sync is still running. The
    coalesced sync must still wake the resumed environment, which deploys what it held."""
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"})
    served = Served(world, watch=False)  # only a webhook or an operator's sync wakes it
    database = load_config(world.config, environ={}).database_url.removeprefix("sqlite:///")
    try:
        wait_for(
            lambda: len(_done(world, "staging", "1.0") + _done(world, "production", "1.0")) == 2,
            what="the first deployments",
        )
        world.cli("suspend", "--env", "staging", check=True)
        held = world.repo.set_env("staging", {"api": "2.0"})
        _push(served, held)
        wait_for(lambda: _synced(world, held), what="the staging 2.0 sync")
        # `resume`, its two halves apart: the record now, the operator's sync below.
        store = store_for(world)
        try:
            store.record_operator_action(
                environment="staging",
                service=None,
                action="resume",
                actor="test",
                note=None,
                at=datetime.now(UTC),
            )
        finally:
            store.close()
        # Keep the daemon's next sync busy: it cannot record while the database is locked.
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            pushed = world.repo.set_env("production", {"api": "2.0"})
            _push(served, pushed)
            mirror = world.tmp / "state" / "repo.git"
            wait_for(
                lambda: git(mirror, "rev-parse", "refs/heads/main") == pushed,
                what="the daemon to fetch the push (its sync now waits for the database)",
            )
            manual = served.client.post(
                "/api/v1/sync", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert manual.status_code == 202
            _push(served, pushed)  # a second delivery: the request after the operator's
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wait_for(lambda: _done(world, "production", "2.0"), what="production 2.0")
        wait_for(lambda: _done(world, "staging", "2.0"), what="the resumed staging to deploy")
    finally:
        served.close()
    log = served.stderr.read_text()
    assert "event=sync trigger=manual" in log and "Traceback" not in log
