"""`reconciler blame`: the commit that set a desired version, found in a real repository
through the real command, and what became of the version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import World, env_yaml, git

pytestmark = pytest.mark.timeout(180)


def blame(world: World, env: str = "staging", service: str = "api") -> dict[str, Any]:
    out = world.cli("blame", "--env", env, "--service", service, "--json", check=True)
    found: dict[str, Any] = json.loads(out.stdout)
    return found


def sync(world: World) -> list[dict[str, Any]]:
    out = world.cli("sync", "--json")
    assert out.returncode in (0, 1), out.stderr
    deployments: list[dict[str, Any]] = json.loads(out.stdout)["deployments"]
    return deployments


def test_blame_walks_back_over_unrelated_changes_and_broken_files(tmp_path: Path) -> None:
    world = World(tmp_path)
    repo = world.repo
    assert world.cli("blame", "--env", "staging", "--service", "api").returncode == 1

    repo.set_env("staging", {"api": "1.0", "web": "1.0"}, "start")
    sync(world)
    setting = repo.set_env("staging", {"api": "1.1", "web": "1.0"}, "api: ship 1.1")
    [applied] = sync(world)
    # Later commits touch the same file without changing api's version: a web release,
    # a broken file (the environment keeps its last valid state), its fix.
    repo.set_env("staging", {"api": "1.1", "web": "2.0"}, "web: 2.0")
    sync(world)
    repo.write("staging.yaml", "environment: staging\nprovider: local\nservices: [\n")
    repo.commit("oops")
    sync(world)
    repo.set_env("staging", {"api": "1.1", "web": "2.0"}, "fix the file", timeout="10m")
    sync(world)

    found = blame(world)
    assert found["version"] == "1.1"
    assert found["commit"] == setting
    assert found["subject"] == "api: ship 1.1"
    assert found["author"] == "Ada <ada@example.com>"
    assert found["file"] == "staging.yaml"
    assert found["applied"] is True
    assert found["deployment"]["id"] == applied["id"]
    assert found["deployment"]["status"] == "completed"
    assert found["deployment"]["completed_at"] == applied["completed_at"]
    assert found["deployed_version"] == "1.1"
    assert applied["commit"] == setting
    assert found["first_seen"]["sync_id"] is not None
    assert found["first_seen"]["seen_at"] <= applied["started_at"]

    text = world.cli("blame", "--env", "staging", "--service", "api", check=True).stdout
    assert text.splitlines()[0] == "staging/api 1.1"
    assert setting in text and "api: ship 1.1" in text
    assert f"deployment {applied['id']} completed" in text

    web = blame(world, service="web")
    assert web["subject"] == "web: 2.0"
    assert web["commit"] == git(repo.path, "rev-parse", "HEAD~2")


def test_blame_after_a_failed_deploy_and_a_revert(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"}, "start")
    sync(world)
    bad = world.repo.set_env("staging", {"api": "1.2-fail"}, "api: try 1.2")
    [failed] = sync(world)
    assert failed["status"] == "failed"

    found = blame(world)
    assert found["commit"] == bad
    assert found["applied"] is False
    assert found["deployment"]["id"] == failed["id"]
    assert found["deployment"]["status"] == "failed"
    assert found["deployed_version"] == "1.0"
    assert found["reason"].startswith(f"deployment {failed['id']} of 1.2-fail is failed")
    text = world.cli("blame", "--env", "staging", "--service", "api", check=True).stdout
    assert "not applied: deployment" in text

    # Back to 1.0: the revert is the commit that set it now, not the first one; nothing
    # is deployed for it (1.0 still runs), the earlier deployment is named.
    revert = world.repo.set_env("staging", {"api": "1.0"}, "revert api")
    assert sync(world) == []
    found = blame(world)
    assert found["commit"] == revert and found["subject"] == "revert api"
    assert found["applied"] is True
    assert found["deployment"]["status"] == "completed"
    assert found["reason"] == "deployed before this commit was synced"


def test_blame_names_what_is_unknown(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.repo.write("staging.yaml", env_yaml("staging", {"api": "1.0"}, suspended="true"))
    world.repo.commit("suspended from the start")
    sync(world)
    found = blame(world)
    assert found["applied"] is False and found["deployment"] is None
    assert found["reason"] == "staging is suspended"

    out = world.cli("blame", "--env", "staging", "--service", "nope")
    assert out.returncode == 2
    assert out.stderr.strip() == "reconciler: environment 'staging' has no service 'nope'"
    out = world.cli("blame", "--env", "nope", "--service", "api")
    assert out.returncode == 2
    assert out.stderr.strip() == "reconciler: unknown environment 'nope' (known: staging)"


def test_http_blame_answers_as_the_command(tmp_path: Path) -> None:
    import asyncio

    import httpx

    from reconciler.config import load_config
    from reconciler.events import EventHub
    from reconciler.http.app import create_app
    from reconciler.http.schemas import Blame
    from reconciler.store import Store
    from tests.test_http import FakeControl

    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"}, "api: 1.0")
    sync(world)
    expected = blame(world)
    config = load_config(world.config, environ={})
    store = Store.from_url(config.database_url)

    async def ask() -> list[httpx.Response]:
        app = create_app(FakeControl(config, store, EventHub()))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.get("/api/v1/blame", params={"env": "staging", "service": "api"}),
                await client.get("/api/v1/blame", params={"env": "staging", "service": "x"}),
                await client.get("/api/v1/blame", params={"env": "staging"}),
                await client.get("/api/v1/blame", params={"env": "a", "service": "b", "c": ""}),
            ]

    try:
        ok, unknown, missing, extra = asyncio.run(ask())
    finally:
        store.close()
    assert ok.status_code == 200 and ok.json() == expected
    Blame.model_validate(ok.json())
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "environment 'staging' has no service 'x'"}
    assert missing.status_code == 400 and "service" in missing.json()["error"]
    assert extra.status_code == 400
