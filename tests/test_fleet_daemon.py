"""The running daemon answers status from its fleet summary: the same as the store's.

A real daemon process (tests/test_http_daemon.Served); after each commit has been
deployed, GET /api/v1/status (planned from the daemon's in-memory summary) equals
`reconciler status --json` (a separate process planning from the store's rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import World, wait_for
from tests.test_http_daemon import Served

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    world = World(tmp_path, retries=1)
    world.repo.set_env("staging", {"api": "1.0", "web": "1.0"})
    world.repo.set_env("production", {"api": "1.0"})
    s = Served(world)
    try:
        yield s
    finally:
        s.close()
    assert "Traceback" not in s.stderr.read_text()


def settled(served: Served, want: dict[tuple[str, str], str]) -> list[dict[str, Any]] | None:
    """The API's status once every service's last deployment is the wanted version and
    finished, and the CLI (from the store) says the same; None until then."""
    api = sorted(
        served.client.get("/api/v1/status").json(), key=lambda e: (e["environment"], e["service"])
    )
    done = {(e["environment"], e["service"]): e for e in api}
    for key, version in want.items():
        entry = done.get(key)
        if entry is None or entry["desired"] != version or entry["state"] == "deploying":
            return None
    cli = json.loads(served.world.cli("status", "--json", check=True).stdout)
    cli.sort(key=lambda e: (e["environment"], e["service"]))
    return api if api == cli else None


def test_daemon_status_from_its_summary_equals_the_store(served: Served) -> None:
    repo = served.world.repo
    want = {("staging", "api"): "1.0", ("staging", "web"): "1.0", ("production", "api"): "1.0"}
    wait_for(lambda: settled(served, want), timeout=60, what="the first deployments")
    repo.set_env("staging", {"api": "2.0", "web": "2.0-fail"})
    want.update({("staging", "api"): "2.0", ("staging", "web"): "2.0-fail"})
    status = wait_for(lambda: settled(served, want), timeout=60, what="2.0 in staging")
    states = {(e["environment"], e["service"]): e["state"] for e in status}
    assert states[("staging", "api")] == "synced"
    assert states[("staging", "web")] != "synced"
    repo.set_env("production", {"api": "2.0"})
    want[("production", "api")] = "2.0"
    status = wait_for(lambda: settled(served, want), timeout=60, what="2.0 in production")
    assert {e["deployed"] for e in status if e["service"] == "api"} == {"2.0"}
