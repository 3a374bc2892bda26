"""The last applied commit survives a refused force push and a gc in the source repository:
`status` (the command, and a restarted daemon's API) still shows what was applied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support import World, git, wait_for

pytestmark = pytest.mark.timeout(120)


def _force_push_and_gc(world: World) -> None:
    """Rewrite the branch from scratch (refused: allow_force_push is off), then let the
    source's gc delete every commit that was applied."""
    repo = world.repo.path
    git(repo, "checkout", "-q", "--orphan", "rewritten")
    world.repo.set_env("staging", {"api": "2.0"}, message="rewritten")
    git(repo, "branch", "-q", "-M", "main")


def _prune(world: World) -> None:
    git(world.repo.path, "reflog", "expire", "--expire=now", "--all")
    git(world.repo.path, "gc", "-q", "--prune=now")


def _status(world: World) -> list[dict]:
    out = world.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_after_a_refused_force_push_and_a_gc_in_the_source(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    _force_push_and_gc(world)
    refused = world.cli("sync")
    assert refused.returncode == 1 and "refused" in refused.stderr
    _prune(world)
    [row] = _status(world)
    assert (row["environment"], row["desired"], row["deployed"]) == ("staging", "1.0", "1.0")
    # Without the mirror at all, the saved desired state of each environment answers.
    shutil.rmtree(tmp_path / "state" / "repo.git")
    [row] = _status(world)
    assert (row["environment"], row["desired"], row["deployed"]) == ("staging", "1.0", "1.0")


def test_a_restarted_daemon_still_shows_the_applied_state(tmp_path: Path) -> None:
    from tests.test_http_daemon import Served

    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    config = world.config.read_text()
    served = Served(world)

    def api_status() -> list[dict]:
        r = served.client.get("/api/v1/status")
        assert r.status_code == 200, r.text
        return r.json()

    def desired() -> list[tuple[str, str, str | None]]:
        return [(s["environment"], s["service"], s["desired"]) for s in api_status()]

    try:
        wait_for(
            lambda: [s["deployed"] for s in api_status()] == ["1.0"], what="the first deployment"
        )
        _force_push_and_gc(world)
        wait_for(lambda: "event=sync_refused" in served.stderr.read_text(), what="the refusal")
        assert desired() == [("staging", "api", "1.0")]
        served.close()
        _prune(world)
        for restart in ("mirror kept", "mirror deleted"):
            if restart == "mirror deleted":
                shutil.rmtree(tmp_path / "state" / "repo.git")
            world.config.write_text(config)  # Served adds its [server] section again
            served = Served(world)
            wait_for(
                lambda s=served: "event=sync_refused" in s.stderr.read_text(),
                what=f"the refusal after a restart ({restart})",
            )
            assert desired() == [("staging", "api", "1.0")], restart
            # Read from the mirror while it is there; else from the saved states.
            fell_back = "event=applied_commit_unreadable" in served.stderr.read_text()
            assert fell_back == (restart == "mirror deleted")
            served.close()
            assert "Traceback" not in served.stderr.read_text()
    finally:
        served.close()


def test_the_saved_states_forget_environments_that_left_the_repository(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    world.repo.set_env("production", {"api": "1.0"})
    world.cli("sync", check=True)
    (world.repo.path / "production.yaml").unlink()
    world.repo.commit("production retired")
    world.cli("sync", check=True)
    shutil.rmtree(tmp_path / "state" / "repo.git")
    assert [row["environment"] for row in _status(world)] == ["staging"]
