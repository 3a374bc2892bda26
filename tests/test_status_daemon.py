"""`reconciler status` asks the running daemon over the control socket (issue 12 item 2):
the same answer as GET /api/v1/status and as the store read alone, nothing recorded, and
the store read again when nobody (or a daemon too old to know the query) answers."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler import channel
from reconciler.config import load_config
from tests.support import World, wait_for
from tests.test_daemon_control import actions, completed
from tests.test_http_daemon import Served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, retries=1)


def state_dir(world: World) -> Path:
    return load_config(world.config, environ={}).state_dir


def status_json(world: World, *args: str) -> list[dict[str, object]]:
    out = world.cli("status", "--json", *args)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    parsed: list[dict[str, object]] = json.loads(out.stdout)
    return parsed


def test_status_through_the_daemon_is_the_apis_and_the_stores(world: World):
    world.repo.set_env("staging", {"api": "1.0", "web": "2.0"})
    world.repo.set_env("production", {"api": "1.0", "web": "2.0"}, depends_on=["staging"])
    served = Served(world)
    try:
        wait_for(lambda: len(completed(world, "1.0")) == 2, what="api 1.0 deployed")
        wait_for(lambda: len(completed(world, "2.0")) == 2, what="web 2.0 deployed")
        world.repo.set_env("staging", {"api": "1.1-fail", "web": "2.0"})
        wait_for(
            lambda: any(e["state"] == "failed" for e in served.client.get("/api/v1/status").json()),
            what="staging/api failed",
        )
        suspend = world.cli("suspend", "--env", "production", "--reason", "freeze")
        assert suspend.returncode == 0, suspend.stderr
        recorded = actions(world)

        api = served.client.get("/api/v1/status").json()
        # The daemon's own answer on the socket, as the CLI gets it.
        direct = channel.ask_status(
            channel.socket_path(state_dir(world)), channel.StatusQuery(environment=None)
        )
        assert isinstance(direct, channel.StatusReport)
        assert direct.entries() == api
        assert direct.reasons == {"production": "freeze"}
        cli = world.cli("status", "--json")
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == api
        assert cli.stdout == json.dumps(api, indent=2, ensure_ascii=False) + "\n"
        assert {e["state"] for e in api} >= {"failed", "synced", "suspended"}, api
        one = status_json(world, "--env", "staging")
        assert one == served.client.get("/api/v1/status", params={"env": "staging"}).json()
        assert {e["environment"] for e in one} == {"staging"}

        table = world.cli("status")
        assert table.returncode == 0, table.stderr
        assert "suspended by operator: freeze" in table.stdout
        unknown = world.cli("status", "--env", "qa")
        assert (unknown.returncode, unknown.stderr) == (2, "reconciler: unknown environment 'qa'\n")

        # Reading is no operator action: nothing recorded, nothing logged.
        assert actions(world) == recorded
        assert served.proc.poll() is None
    finally:
        served.close()
    log = served.stderr.read_text()
    assert "Traceback" not in log and log.count("event=operator_action") == 1
    # The daemon gone: the store read alone gives the same answer.
    assert not channel.socket_path(state_dir(world)).exists()
    assert status_json(world) == api


class FakeDaemon:
    """A control socket that answers every request with one prepared line."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:
                self.requests.append(reader.readline())
                conn.sendall(self.reply)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def synced(world: World) -> Iterator[World]:
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    yield world


def test_the_cli_prints_what_the_daemon_answers(synced: World):
    world = synced
    entry = {
        "environment": "staging",
        "service": "api",
        "desired": "9.9",
        "deployed": "9.8",
        "state": "deploying",
        "commit": "c" * 40,
        "last_deployment_id": 77,
        "message": "deployment running",
    }
    report = channel.StatusReport(commit="c" * 40, services=[channel.StatusEntry(**entry)])  # type: ignore[arg-type]
    path = channel.socket_path(state_dir(world))
    fake = FakeDaemon(path, channel.encode(report))
    try:
        assert status_json(world) == [entry]  # the daemon's answer, not the store's
        table = world.cli("status")
        assert table.returncode == 0 and "9.9" in table.stdout
        assert json.loads(fake.requests[0]) == {"action": "status", "environment": None}
    finally:
        fake.close()


def test_the_store_is_read_when_no_daemon_knows_the_query(synced: World):
    world = synced
    alone = status_json(world)
    assert [(e["service"], e["state"]) for e in alone] == [("api", "synced")]
    path = channel.socket_path(state_dir(world))
    # A daemon from before the query: it refuses the request as a bad one.
    old = channel.Failed(message="bad request: action: Input tag 'status' ...", code=2)
    fake = FakeDaemon(path, channel.encode(old))
    try:
        assert status_json(world) == alone
        assert len(fake.requests) == 1
    finally:
        fake.close()
    # A socket file nobody listens on (a daemon that was killed).
    assert path.exists()
    assert status_json(world) == alone
    # A daemon that is starting (it has not synced yet).
    path.unlink()
    fake = FakeDaemon(path, channel.encode(channel.Failed(message="the daemon is starting")))
    try:
        assert status_json(world) == alone
        assert len(fake.requests) == 1
    finally:
        fake.close()
