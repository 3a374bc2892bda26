"""The HTTP side of a real daemon process: `reconciler run` with `[server]`, a real client."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import resource
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

import reconciler.daemon
from tests.support import RECONCILER, World, cli_env, wait_for

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not hasattr(reconciler.daemon, "HTTP_WIRED"), reason="daemon wiring pending"
    ),
]

TOKEN = "daemon-api-token"
SECRET = "daemon-webhook-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A daemon process with its HTTP server, and a client for it."""

    def __init__(
        self,
        world: World,
        *,
        watch: bool = True,
        server: str = "",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.world = world
        self.port = free_port()
        (world.tmp / "api-token").write_text(TOKEN + "\n")
        (world.tmp / "webhook-secret").write_text(SECRET + "\n")
        text = world.config.read_text().replace('[server]\nlisten = ""\n', "")
        if not watch:
            text = text.replace("watch = true", "watch = false")
        world.config.write_text(
            text
            + f"""
[server]
listen = "127.0.0.1:{self.port}"
token_file = "api-token"
webhook_secret_file = "webhook-secret"
{server}"""
        )
        self.stderr = world.tmp / f"daemon-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [*RECONCILER, "--config", str(world.config), "run"],
            cwd=world.tmp,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("w"),
            preexec_fn=preexec_fn,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        wait_for(self._up, what="the HTTP server")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited: {self.stderr.read_text()}")
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def deployments(self, **params: str) -> list[dict]:
        r = self.client.get("/api/v1/deployments", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def served(world: World) -> Iterator[Served]:
    world.repo.set_env("staging", {"api": "1.0"})
    s = Served(world)
    try:
        yield s
    finally:
        s.close()
    assert "Traceback" not in s.stderr.read_text()


def test_health_ready_status_and_history(served: Served):
    assert served.client.get("/healthz").json() == {"status": "ok"}
    wait_for(lambda: served.client.get("/readyz").status_code == 200, what="readiness")
    wait_for(
        lambda: [d for d in served.deployments() if d["status"] == "completed"],
        what="the first deployment",
    )
    [entry] = served.client.get("/api/v1/status").json()
    cli = json.loads(served.world.cli("status", "--json", check=True).stdout)
    assert [entry] == cli
    assert entry["state"] == "synced" and entry["deployed"] == "1.0"
    [record] = served.deployments(env="staging")
    shown = served.client.get(f"/api/v1/deployments/{record['id']}").json()
    assert shown["status"] == "completed" and "preparing" in [
        p["message"] for p in shown["progress"]
    ]
    metrics = served.client.get("/metrics").text
    assert 'reconciler_deployments_total{environment="staging",status="completed"} 1.0' in metrics


def test_sync_endpoint_needs_the_token(served: Served):
    assert served.client.post("/api/v1/sync").status_code == 401
    wrong = served.client.post("/api/v1/sync", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = served.client.post("/api/v1/sync", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 202 and ok.json() == {"status": "accepted"}


def read_sse(response: httpx.Response) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def test_live_progress_of_a_running_deployment(world: World):
    world.repo.set_env("staging", {"api": "1.0-gate"})
    served = Served(world)
    try:
        [running] = wait_for(lambda: served.deployments(), what="the deployment to be recorded")
        url = f"/api/v1/deployments/{running['id']}/events"
        seen: list[dict[str, str]] = []
        with served.client.stream("GET", url, timeout=30) as response:
            assert response.status_code == 200
            for message in read_sse(response):
                seen.append(message)
                data = json.loads(message["data"])
                if message.get("event") == "progress" and data["message"] == "preparing":
                    world.open_gate()  # the run is blocked on the gate until now
                if message.get("event") == "end":
                    break
        assert seen[-1]["event"] == "end"
        assert json.loads(seen[-1]["data"])["status"] == "completed"
        progress = [json.loads(m["data"]) for m in seen if m.get("event") == "progress"]
        assert [p["percent"] for p in progress if p["percent"] is not None][-2:] == [100, 100]
        ids = [int(m["id"]) for m in seen if m.get("event") == "progress"]
        assert ids == sorted(set(ids))
    finally:
        served.close()


def test_a_signed_github_push_makes_the_daemon_deploy(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    served = Served(world, watch=False)  # poll_interval is "0" too: only the webhook can wake it
    try:
        wait_for(
            lambda: [d for d in served.deployments() if d["status"] == "completed"],
            what="the first deployment",
        )
        sha = world.repo.set_env("staging", {"api": "1.1"})
        body = json.dumps(
            {"ref": "refs/heads/main", "after": sha, "repository": {"full_name": "o/desired"}}
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": "f0a1c2d3-0000-11e3-81ab-4c9367dc0958",
            "X-Hub-Signature-256": "sha256="
            + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        }
        unsigned = served.client.post(
            "/hooks/git", content=body, headers={"Content-Type": "application/json"}
        )
        assert unsigned.status_code == 401
        r = served.client.post("/hooks/git", content=body, headers=headers)
        assert (r.status_code, r.json()) == (202, {"status": "accepted"})
        done = wait_for(
            lambda: [d for d in served.deployments(status="completed") if d["version"] == "1.1"],
            what="the pushed commit to be deployed",
        )
        assert done[0]["commit"] == sha
        replay = served.client.post("/hooks/git", content=body, headers=headers)
        assert (replay.status_code, replay.json()) == (200, {"status": "duplicate"})
        metrics = served.client.get("/metrics").text
        assert 'reconciler_webhook_requests_total{result="accepted"} 1.0' in metrics
        assert 'reconciler_webhook_requests_total{result="duplicate"} 1.0' in metrics
    finally:
        served.close()
    assert "event=sync trigger=webhook" in served.stderr.read_text()


CHATTY = r"""#!/usr/bin/env bash
read -r _ < "$DEPLOY_GATE"
for i in $(seq 1 "$LINES"); do echo "{\"progress\": $((i * 100 / LINES)), \"message\": \"step $i\"}"; done
"""


async def _watch(port: int, dep_id: int, connected: asyncio.Event, got: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/v1/deployments/{dep_id}/events HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    connected.set()
    progress = 0
    while line := await reader.readline():
        if line == b"event: progress\n":
            progress += 1
        elif line == b"event: end\n":
            got.append(progress)
            break
    writer.close()


def _viewers(port: int, dep_id: int, n: int, connected: threading.Event, got: list[int]) -> None:
    async def main() -> None:
        events = [asyncio.Event() for _ in range(n)]
        tasks = [asyncio.create_task(_watch(port, dep_id, e, got)) for e in events]
        await asyncio.gather(*(e.wait() for e in events))
        connected.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def _run_watched(served: Served, version: str, viewers: int, got: list[int]) -> float:
    """Deploy ``version`` with ``viewers`` live SSE viewers attached before its output
    starts; the seconds the daemon took from the first step to the end, by its records."""
    world = served.world
    world.repo.set_env("staging", {"api": version}, timeout="120s")
    [dep] = wait_for(
        lambda: [d for d in served.deployments() if d["version"] == version],
        what=f"the deployment of {version}",
    )
    connected = threading.Event()
    thread = threading.Thread(
        target=_viewers, args=(served.port, dep["id"], viewers, connected, got)
    )
    if viewers:
        thread.start()
        assert connected.wait(30), "the viewers did not connect"
    world.open_gate()
    shown = wait_for(
        lambda: (
            (r := served.client.get(f"/api/v1/deployments/{dep['id']}").json())["status"]
            == "completed"
            and r
        ),
        timeout=60,
        what=f"{version} to complete",
    )
    if viewers:
        thread.join(30)
    steps = [p["at"] for p in shown["progress"] if p["message"].startswith("step ")]
    db = world.tmp / "state" / "reconciler.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        first, last = conn.execute(
            "SELECT min(e.at), d.completed_at FROM deployment_events e JOIN deployments d"
            " ON d.id = e.deployment_id WHERE d.id = ? AND e.message = 'step 1'",
            (dep["id"],),
        ).fetchone()
    assert len(steps) == LINES
    return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()


LINES = 150


def test_live_viewers_cost_a_deployment_nothing(world: World):
    """100 viewers of a 150-event deployment: before, each viewer read the store at each
    event, the deployment's own writes queued behind 15,000 reads and it ran many times
    slower; now it runs about as fast as with nobody watching."""
    script = world.tmp / "chatty.sh"
    script.write_text(CHATTY)
    script.chmod(0o755)
    text = world.config.read_text().replace(str(world.tmp / "deploy.sh"), str(script))
    world.config.write_text(text.replace("SECRET_TOKEN =", f'LINES = "{LINES}", SECRET_TOKEN ='))
    world.repo.set_env("staging", {"api": "0.9"})
    served = Served(world)
    try:
        world.open_gate()
        wait_for(lambda: served.deployments(status="completed"), what="the first deployment")
        alone = _run_watched(served, "1.0", 0, [])
        got: list[int] = []
        watched = _run_watched(served, "1.1", 100, got)
        # Every viewer saw every event (the steps and the status changes), then the end.
        assert len(got) == 100 and set(got) == {got[0]} and got[0] > LINES
        assert watched < max(3 * alone, 1.0), f"{watched:.2f} s watched vs {alone:.2f} s alone"
    finally:
        served.close()
    assert "Traceback" not in served.stderr.read_text()


def _fd_limit(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Flood:
    """Keeps ``n`` idle TCP connections open to a port, reopening each one the server
    closes, until stopped: a client fleet (or an attacker) that never sends a request."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.stopping = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> socket.socket:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self.opened += 1
        return s

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.n)]
        try:
            while not self.stopping.is_set():
                for i, s in enumerate(socks):
                    try:
                        if s.recv(4096) == b"":  # closed by the server: reopen
                            s.close()
                            socks[i] = self._open()
                    except BlockingIOError:
                        pass
                    except OSError:
                        s.close()
                        socks[i] = self._open()
                self.stopping.wait(0.05)
        finally:
            for s in socks:
                s.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def test_idle_connections_exhaust_neither_descriptors_nor_health(world: World):
    """300 idle connections, kept up, against a daemon whose descriptor limit is 256: before,
    accept() failed with EMFILE (a traceback each), /healthz timed out and git could not
    fetch. Now the daemon raises its soft limit to the hard one, caps connections below it
    (closing idle ones to make room), and deploys a commit pushed during the flood."""
    world.repo.set_env("staging", {"api": "1.0"})
    served = Served(world, server='header_timeout = "3s"\n', preexec_fn=_fd_limit(200, 256))
    flood: Flood | None = None
    try:
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
        [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == ["256", "256"]  # soft raised to the hard limit
        wait_for(lambda: served.deployments(status="completed"), what="the first deployment")
        flood = Flood(served.port, 300)
        wait_for(lambda: flood.opened >= 400, what="the server to close idle connections")
        for _ in range(5):
            started = time.monotonic()
            assert served.client.get("/healthz").status_code == 200
            assert time.monotonic() - started < 5
            served.client.close()  # a new connection each time, in the flood
            served.client = httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=10)
        sha = world.repo.set_env("staging", {"api": "1.1"})
        done = wait_for(
            lambda: [d for d in served.deployments(status="completed") if d["version"] == "1.1"],
            timeout=30,
            what="the commit pushed during the flood to be deployed",
        )
        assert done[0]["commit"] == sha
        fds = len(list(Path(f"/proc/{served.proc.pid}/fd").iterdir()))
        assert fds < 256
    finally:
        if flood is not None:
            flood.stop()
        served.close()
    log = served.stderr.read_text()
    assert "Traceback" not in log and "Too many open files" not in log
    assert "max_connections=128" in log  # 256 descriptors, 128 kept for the rest


def test_busy_connections_over_the_cap_are_refused_and_logged_once(world: World):
    world.repo.set_env("staging", {"api": "1.0-gate"})
    served = Served(world, server="max_connections = 4\n")
    try:
        [running] = wait_for(lambda: served.deployments(), what="the deployment to be recorded")
        served.client.close()  # its keep-alive connection would count as one of the four
        url = f"/api/v1/deployments/{running['id']}/events"
        streams = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", served.port))
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            streams.append(s)
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", served.port)) as s:
                s.settimeout(5)
                assert s.recv(4096).startswith(b"HTTP/1.1 503 Service Unavailable")
        for s in streams:
            s.close()
        served.client = httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=10)
        wait_for(lambda: served.client.get("/healthz").status_code == 200, what="room again")
        world.open_gate()
    finally:
        served.close()
    log = served.stderr.read_text()
    assert log.count("event=http_connections_refused") == 1
    assert "count=1 open=4 max_connections=4" in log
