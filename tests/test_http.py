"""The HTTP API through a real uvicorn server on 127.0.0.1 and a real HTTP client.

The daemon side is a small fake `Control` over a real store (SQLite in tmp_path) and a real
event hub; deployments are written through the store as the executor writes them, and the
hub is told as the executor tells it, so what the API reads is what a daemon would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from reconciler.config import Config, ConfigError
from reconciler.daemon import _check_reloadable
from reconciler.engine import SyncOutcome
from reconciler.events import EventHub
from reconciler.executor import DeploymentEvent
from reconciler.http import (
    HttpServer,
    HttpServerError,
    Limits,
    api,
    create_app,
    parse_listen,
    serve,
    stop_streams,
    watch_connections,
)
from reconciler.http.app import ROUTES
from reconciler.http.openapi import openapi_document
from reconciler.http.server import connection_budget
from reconciler.http.sse import LiveFeeds, deployment_events
from reconciler.http.webhooks import sign, sign_generic
from reconciler.plan import Decision
from reconciler.store import DeploymentRecord, LedgerCheck, NewDeployment, Store, make_engine

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOKEN = "s3cret-api-token"
WEBHOOK_SECRET = "webhook-shared-secret"
T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeControl:
    """The daemon as the HTTP layer sees it."""

    def __init__(self, config: Config, store: Store, hub: EventHub) -> None:
        self._config, self._store, self._hub = config, store, hub
        self.ready = True
        self.fetch_error: str | None = None
        self.commit: str | None = "9f1c2ab000000000000000000000000000000000"
        self.decisions: list[Decision] = []
        self.known: set[tuple[str, str]] = {("staging", "api")}
        self.syncs: list[str] = []
        self.retries: list[tuple[str, str]] = []
        self.depth = 0
        self.ledger: LedgerCheck | None = None

    @property
    def config(self) -> Config:
        return self._config

    @property
    def store(self) -> Store:
        return self._store

    @property
    def hub(self) -> EventHub:
        return self._hub

    def is_ready(self) -> bool:
        return self.ready

    def last_fetch_error(self) -> str | None:
        return self.fetch_error

    async def status(self, environment: str | None) -> tuple[str | None, list[Decision]]:
        return self.commit, [
            d for d in self.decisions if environment is None or d.environment == environment
        ]

    def request_sync(self, trigger: str) -> None:
        self.syncs.append(trigger)

    async def retry(self, environment: str, service: str, origin: str | None = None) -> None:
        if (environment, service) not in self.known:
            raise KeyError((environment, service))
        self.retries.append((environment, service))

    def queue_depth(self) -> int:
        return self.depth

    def notification_stats(self) -> dict[str, dict[str, int]]:
        return {"ops": {"delivered": 2, "failed": 1}}

    def lease_counts(self) -> tuple[int, int]:
        return 3, 7

    def drifted_services(self) -> dict[str, int]:
        return {"production": 2}

    def ledger_check(self) -> LedgerCheck | None:
        return self.ledger


def make_config(tmp_path: Path, *, token: bool = True, webhooks: bool = True, **server) -> Config:
    server = dict(server)
    if token:
        (tmp_path / "api-token").write_text(TOKEN + "\n")
        server["token_file"] = "api-token"
    if webhooks:
        (tmp_path / "webhook-secret").write_text(WEBHOOK_SECRET + "\n")
        server["webhook_secret_file"] = "webhook-secret"
    return Config.model_validate(
        {
            "repository": {"url": "desired", "branch": "main"},
            "server": {"listen": "127.0.0.1:0", **server},
            "base_dir": tmp_path,
        }
    )


@dataclass
class Harness:
    control: FakeControl
    client: httpx.AsyncClient
    server: HttpServer
    app: Any
    store: Store
    hub: EventHub
    ids: list[int] = field(default_factory=list)

    def deploy(
        self,
        environment: str = "staging",
        service: str = "api",
        version: str = "1.0",
        *,
        statuses: tuple[str, ...] = ("in_progress", "completed"),
        at: datetime = T0,
    ) -> DeploymentRecord:
        """A deployment recorded as the executor records it, through the real store."""
        rec = self.store.create_deployment(
            NewDeployment(
                environment=environment,
                service=service,
                version=version,
                previous_version=None,
                provider="local",
                provider_type="command",
                strategy={"type": "rolling"},
                trigger="git",
                commit="9f1c2ab",
                commit_author="Ada <ada@example.com>",
                attempt=1,
                timeout_seconds=1800,
                params={},
                created_at=at,
            )
        )
        for i, status in enumerate(statuses):
            rec = self.store.set_status(rec.id, status, at=at + timedelta(seconds=10 * (i + 1)))
        return rec

    def publish(self, rec: DeploymentRecord, status: str, message: str = "", **kw: Any) -> None:
        self.hub.publish(
            DeploymentEvent(
                rec.id,
                rec.environment,
                rec.service,
                rec.version,
                rec.trigger,
                status,
                message,
                **kw,
            )
        )


async def start(
    tmp_path: Path, config: Config, *, limits: Limits | None = None, **app_kw: Any
) -> Harness:
    store = Store.from_url(f"sqlite:///{tmp_path / 'state' / 'reconciler.db'}", migrate=True)
    hub = EventHub()
    control = FakeControl(config, store, hub)
    app = create_app(control, **app_kw)
    server = HttpServer(app, "127.0.0.1:0", on_stop=lambda: stop_streams(app), limits=limits)
    watch_connections(app, server)
    await server.start()
    client = httpx.AsyncClient(base_url=server.url, timeout=10)
    return Harness(control, client, server, app, store, hub)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start(tmp_path, make_config(tmp_path))
    try:
        yield h
    finally:
        await h.client.aclose()
        await h.server.stop()
        h.store.close()


async def wait_until(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """For effects the server applies on its own time (a disconnect noticed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---- health --------------------------------------------------------------------------


async def test_healthz_and_readyz(http: Harness):
    r = await http.client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await http.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "database": "ok", "repository": "ok"}

    http.control.ready = False
    http.control.fetch_error = "cannot fetch desired: repository not found"
    r = await http.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["database"] == "ok"
    assert body["repository"] == "not fetched yet: cannot fetch desired: repository not found"
    assert body["error"].startswith("repository: not fetched yet")


async def test_readyz_names_an_unreachable_database(http: Harness):
    # A PostgreSQL that is down: nothing listens on port 1.
    broken = Store(make_engine("postgresql+psycopg://reconciler@127.0.0.1:1/reconciler"))
    http.control._store = broken
    r = await http.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable" and body["repository"] == "ok"
    assert body["database"] != "ok" and body["error"].startswith("database: ")


# ---- metrics -------------------------------------------------------------------------


async def test_metrics_follow_published_events(http: Harness):
    http.control.depth = 3
    rec = http.deploy(statuses=())
    http.publish(rec, "pending", at=T0)
    http.publish(rec, "in_progress", at=T0 + timedelta(seconds=1))
    text = (await http.client.get("/metrics")).text
    assert "reconciler_deployments_running 1.0" in text
    http.publish(rec, "completed", at=T0 + timedelta(seconds=73))
    http.hub.publish(SyncOutcome(7, "abc123", "ok", trigger="webhook", duration_seconds=0.2))
    http.hub.publish(SyncOutcome(None, None, "failed", trigger="poll", duration_seconds=0.1))
    r = await http.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in (
        'reconciler_deployments_total{environment="staging",status="completed"} 1.0',
        'reconciler_deployment_duration_seconds_count{environment="staging"} 1.0',
        'reconciler_deployment_duration_seconds_sum{environment="staging"} 72.0',
        'reconciler_sync_duration_seconds_count{result="ok",trigger="webhook"} 1.0',
        'reconciler_syncs_total{result="ok"} 1.0',
        'reconciler_syncs_total{result="failed"} 1.0',
        "reconciler_fetch_errors_total 1.0",
        "reconciler_queue_depth 3.0",
        'reconciler_services_drifted{environment="production"} 2.0',
        'reconciler_notifications_total{result="delivered",target="ops"} 2.0',
        "reconciler_deployments_running 0.0",
        'reconciler_webhook_requests_total{result="accepted"} 0.0',
        "reconciler_replicas_live 3.0",
        "reconciler_leases_held 7.0",
    ):
        assert line in text, line
    assert 'reconciler_last_synced_commit{commit="abc123"}' in text
    assert 'reconciler_http_requests_total{method="GET",route="/metrics",status="200"}' in text


# ---- read API ------------------------------------------------------------------------


async def test_status_is_the_cli_status_json(http: Harness):
    http.control.decisions = [
        Decision("staging", "api", "1.1", "1.0", "out_of_sync", "", last_deployment_id=4),
        Decision("production", "api", "1.0", "1.0", "waiting", "waiting on staging"),
    ]
    r = await http.client.get("/api/v1/status")
    assert r.status_code == 200
    assert r.json() == [
        {
            "environment": "staging",
            "service": "api",
            "desired": "1.1",
            "deployed": "1.0",
            "state": "out_of_sync",
            "commit": http.control.commit,
            "last_deployment_id": 4,
            "message": None,
        },
        {
            "environment": "production",
            "service": "api",
            "desired": "1.0",
            "deployed": "1.0",
            "state": "waiting",
            "commit": http.control.commit,
            "last_deployment_id": None,
            "message": "waiting on staging",
        },
    ]
    assert list(r.json()[0]) == [
        "environment",
        "service",
        "desired",
        "deployed",
        "state",
        "commit",
        "last_deployment_id",
        "message",
    ]
    only = (await http.client.get("/api/v1/status", params={"env": "production"})).json()
    assert [e["environment"] for e in only] == ["production"]
    bad = await http.client.get("/api/v1/status", params={"environment": "production"})
    assert bad.status_code == 400 and "unknown parameter 'environment'" in bad.json()["error"]


async def test_deployments_filters_paging_and_link(http: Harness):
    a = http.deploy("staging", "api", "1.0")
    b = http.deploy("staging", "worker", "2.0", statuses=("in_progress", "failed"))
    c = http.deploy("production", "api", "1.0")
    d = http.deploy("staging", "api", "1.1", statuses=("in_progress",))
    r = await http.client.get("/api/v1/deployments")
    assert r.status_code == 200 and "link" not in r.headers
    assert [x["id"] for x in r.json()] == [d.id, c.id, b.id, a.id]
    assert r.json()[-1] == a.to_json()

    async def ids(**params: Any) -> list[int]:
        resp = await http.client.get("/api/v1/deployments", params=params)
        assert resp.status_code == 200, resp.text
        return [x["id"] for x in resp.json()]

    assert await ids(env="staging") == [d.id, b.id, a.id]
    assert await ids(env="staging", service="api") == [d.id, a.id]
    assert await ids(status="failed") == [b.id]
    assert await ids(status="in_progress") == [d.id]
    assert await ids(since="2026-11-26T10:00:00Z") == [d.id, c.id, b.id, a.id]
    assert await ids(since="2030-01-01T00:00:00Z") == []

    page = await http.client.get("/api/v1/deployments", params={"env": "staging", "limit": 2})
    assert [x["id"] for x in page.json()] == [d.id, b.id]
    link = page.headers["link"]
    assert link == f'</api/v1/deployments?env=staging&limit=2&before={b.id}>; rel="next"'
    nxt = await http.client.get(link[1 : link.index(">")])
    assert [x["id"] for x in nxt.json()] == [a.id]
    assert "link" not in nxt.headers


#: History filters refused with a 400, and how (also the dashboard's /history page).
BAD_HISTORY_PARAMS = [
    ({"limit": "0"}, "parameter 'limit' must be between 1 and 1000"),
    ({"limit": "1001"}, "parameter 'limit' must be between 1 and 1000"),
    ({"limit": "ten"}, "parameter 'limit' must be an integer, not 'ten'"),
    ({"before": "-3"}, "parameter 'before' must be at least 1"),
    ({"status": "done"}, "parameter 'status' must be one of pending, validating"),
    ({"since": "yesterday"}, "parameter 'since' must be a time"),
    ({"environment": "staging"}, "unknown parameter 'environment'"),
]


@pytest.mark.parametrize(("params", "message"), BAD_HISTORY_PARAMS)
async def test_deployments_bad_parameters_are_400(http: Harness, params, message):
    r = await http.client.get("/api/v1/deployments", params=params)
    assert r.status_code == 400
    assert r.json()["error"].startswith(message)


async def test_show_a_deployment_and_404(http: Harness):
    rec = http.deploy()
    http.store.append_log(rec.id, [("stdout", "hello", T0), ("stderr", "world", T0)])
    r = await http.client.get(f"/api/v1/deployments/{rec.id}")
    assert r.status_code == 200
    body = r.json()
    full = http.store.get_deployment(rec.id, with_progress=True, with_log=True)
    assert full is not None
    assert body == {
        **full.to_json(),
        "log_lines": 2,
        "log_truncated": False,
        "log_url": f"/api/v1/deployments/{rec.id}/log",
    }
    assert [p["status"] for p in body["progress"]] == ["pending", "in_progress", "completed"]
    assert body["log"] == "hello\nworld"
    for path in ("/api/v1/deployments/999", "/api/v1/deployments/abc", "/api/v1/deployments/0"):
        missing = await http.client.get(path)
        assert missing.status_code == 404 and missing.json()["error"].startswith("no deployment")
    nowhere = await http.client.get("/api/v2/nothing")
    assert nowhere.status_code == 404 and nowhere.json() == {
        "error": "no such endpoint: /api/v2/nothing"
    }
    wrong = await http.client.delete(f"/api/v1/deployments/{rec.id}")
    assert wrong.status_code == 405 and "error" in wrong.json()


async def test_a_huge_log_is_shown_by_its_tail_and_paged(http: Harness):
    """A run with a 24 MiB log: the record carries its tail only, the log is paged in
    bounded pages, and together the pages are the whole log, in order."""
    rec = http.deploy()
    filler = "x" * 1000
    lines = [f"line {i:05d} {filler}" for i in range(24_000)]
    http.store.append_log(rec.id, [("stdout", line, T0) for line in lines])
    http.store.append_log(rec.id, [("stderr", "y" * 40_000, T0)])  # one longer than 16 KiB
    r = await http.client.get(f"/api/v1/deployments/{rec.id}")
    assert r.status_code == 200 and len(r.content) < 80_000  # not 24 MiB
    body = r.json()
    assert body["log_lines"] == 24_001 and body["log_truncated"] is True
    tail = body["log"].split("\n")
    assert tail[-1] == "y" * 16384 + " … (23,616 characters cut)"
    assert tail[:-1] == lines[-len(tail) + 1 :]
    assert body["log_url"] == f"/api/v1/deployments/{rec.id}/log"
    validator("DeploymentDetail").validate(body)

    got: list[str] = []
    url: str | None = f"{body['log_url']}?limit=5000"
    pages = 0
    while url is not None:
        page = await http.client.get(url)
        assert page.status_code == 200 and len(page.content) < 1_100_000
        validator("LogPage").validate(page.json())
        assert page.json()["offset"] == len(got)
        got += [entry["line"] for entry in page.json()["lines"]]
        link = page.headers.get("link")
        url = link[1 : link.index(">")] if link else None
        assert (url is None) == (page.json()["next_offset"] is None)
        pages += 1
    assert got[:-1] == lines and got[-1].startswith("y" * 16384 + " … ")
    assert pages == 25  # about 1,000 lines of 1 KiB fit in a 1 MiB page
    for params, status in (
        ({"offset": "-1"}, 400),
        ({"limit": "0"}, 400),
        ({"limit": "10001"}, 400),
        ({"page": "2"}, 400),
        ({"offset": "99999"}, 200),
    ):
        answer = await http.client.get(body["log_url"], params=params)
        assert answer.status_code == status, params
    assert (await http.client.get(f"{body['log_url']}?offset=99999")).json()["lines"] == []
    assert (await http.client.get("/api/v1/deployments/999/log")).status_code == 404


async def test_index_page_links_the_api(http: Harness):
    r = await http.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for href in ("/api/v1/status", "/api/v1/deployments", "/metrics"):
        assert f'href="{href}"' in r.text


# ---- server-sent events --------------------------------------------------------------


class SSEReader:
    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self) -> dict[str, str]:
        """The next message (a comment comes back as {"comment": ...})."""
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise EOFError("stream ended")


async def test_sse_replays_then_streams_live_then_ends(http: Harness):
    rec = http.deploy(statuses=("in_progress",))
    http.store.add_event(
        rec.id,
        status="in_progress",
        message="preparing",
        percent=10,
        details={"step": "prepare"},
        at=T0 + timedelta(seconds=15),
    )
    recorded = http.store.events_after(rec.id, 0)
    url = f"/api/v1/deployments/{rec.id}/events"
    async with http.client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        sse = SSEReader(response)
        for event in recorded:
            msg = await sse.next()
            assert msg["event"] == "progress" and msg["id"] == str(event.id)
            assert json.loads(msg["data"]) == event.to_json()
        # Live: recorded while the client is connected, then announced on the hub.
        http.store.add_event(
            rec.id,
            status="in_progress",
            message="halfway",
            percent=50,
            details={},
            at=T0 + timedelta(seconds=20),
        )
        http.publish(rec, "in_progress", "halfway", percent=50)
        msg = await sse.next()
        assert json.loads(msg["data"])["message"] == "halfway"
        assert int(msg["id"]) > recorded[-1].id
        # Events of other deployments wake nobody up with anything to send.
        other = http.deploy("production", statuses=("in_progress",))
        http.publish(other, "in_progress", "elsewhere")
        final = http.store.set_status(rec.id, "completed", at=T0 + timedelta(seconds=30))
        http.publish(rec, "completed", "completed")
        msg = await sse.next()
        assert (msg["event"], json.loads(msg["data"])["status"]) == ("progress", "completed")
        end = await sse.next()
        assert end["event"] == "end" and json.loads(end["data"]) == final.to_json()
        with pytest.raises(EOFError):
            await sse.next()
    assert not http.hub.watching()


async def test_sse_resumes_after_last_event_id_and_ends_at_once_when_finished(http: Harness):
    rec = http.deploy()
    events = http.store.events_after(rec.id, 0)
    async with http.client.stream(
        "GET",
        f"/api/v1/deployments/{rec.id}/events",
        headers={"Last-Event-ID": str(events[0].id)},
    ) as response:
        sse = SSEReader(response)
        got = [await sse.next() for _ in range(len(events))]
    assert [m["id"] for m in got[:-1]] == [str(e.id) for e in events[1:]]
    assert got[-1]["event"] == "end"
    bad = await http.client.get(
        f"/api/v1/deployments/{rec.id}/events", headers={"Last-Event-ID": "x"}
    )
    assert bad.status_code == 400
    missing = await http.client.get("/api/v1/deployments/4242/events")
    assert missing.status_code == 404


async def test_sse_pings_and_a_disconnect_closes_the_subscription(tmp_path: Path):
    h = await start(tmp_path, make_config(tmp_path), ping_interval=0.05)
    try:
        rec = h.deploy(statuses=("in_progress",))
        async with h.client.stream("GET", f"/api/v1/deployments/{rec.id}/events") as response:
            sse = SSEReader(response)
            assert (await sse.next())["event"] == "progress"
            assert (await sse.next())["event"] == "progress"
            assert await sse.next() == {"comment": "ping"}
            assert h.hub.watching() == 1
        await wait_until(lambda: not h.hub.watching(), what="the subscription to close")
    finally:
        await h.client.aclose()
        await h.server.stop()
        h.store.close()


async def test_stopping_the_server_ends_open_streams(tmp_path: Path):
    h = await start(tmp_path, make_config(tmp_path))
    try:
        rec = h.deploy(statuses=("in_progress",))
        async with h.client.stream("GET", f"/api/v1/deployments/{rec.id}/events") as response:
            sse = SSEReader(response)
            await sse.next()
            await sse.next()
            stopping = asyncio.create_task(h.server.stop())
            with pytest.raises(EOFError):
                await sse.next()
            await stopping
        assert not h.hub.watching()
    finally:
        await h.client.aclose()
        h.store.close()


async def test_many_viewers_of_a_deployment_share_one_store_read_per_event(
    http: Harness, monkeypatch: pytest.MonkeyPatch
):
    """Viewers cost the deployment nothing: N viewers x E events is not N x E store reads
    (which queued the deployment's own writes behind them), but about E."""
    rec = http.deploy(statuses=("in_progress",))
    reads = 0
    events_after = http.store.events_after

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return events_after(*args, **kwargs)

    monkeypatch.setattr(http.store, "events_after", counting)
    url = f"/api/v1/deployments/{rec.id}/events"
    viewers, live = 40, 10
    async with contextlib.AsyncExitStack() as stack:
        readers = []
        for _ in range(viewers):
            response = await stack.enter_async_context(http.client.stream("GET", url))
            readers.append(SSEReader(response))
        for sse in readers:  # the recorded history: pending, in_progress
            assert [(await sse.next())["event"] for _ in range(2)] == ["progress"] * 2
        before = reads
        for i in range(live):
            http.store.add_event(
                rec.id, status="in_progress", message=f"step {i}", percent=i, details={}, at=T0
            )
            http.publish(rec, "in_progress", f"step {i}", percent=i)
            for sse in readers:  # every viewer has it before the next one is recorded
                assert json.loads((await sse.next())["data"])["message"] == f"step {i}"
        assert reads - before <= live + 2, f"{reads - before} store reads for {live} events"
    await wait_until(lambda: not http.hub.watching(), what="the feed to close")


async def test_slow_api_reads_leave_the_deployments_threads_free(
    http: Harness, monkeypatch: pytest.MonkeyPatch
):
    """The executor writes each event through asyncio's default thread pool: API reads must
    not be able to fill it (a slow database, many clients), or the deployment waits."""
    rec = http.deploy()
    release = threading.Event()
    get_deployment = http.store.get_deployment

    blocked = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        blocked.append(1)
        release.wait(10)
        blocked.pop()
        return get_deployment(*args, **kwargs)

    def waiting() -> int:
        return len(blocked)

    monkeypatch.setattr(http.store, "get_deployment", slow)
    readers = [
        asyncio.create_task(http.client.get(f"/api/v1/deployments/{rec.id}")) for _ in range(12)
    ]
    # Every thread the API reads with is blocked in the store now.
    await wait_until(lambda: waiting() >= api.READ_THREADS, what="the reads to block")
    try:
        # What `executor.durable` does for every event of a running deployment:
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "written"), 2) == "written"
    finally:
        release.set()
    assert [r.status_code for r in await asyncio.gather(*readers)] == [200] * 12


async def test_a_viewer_that_falls_behind_skips_ahead_and_never_holds_up_the_feed(
    tmp_path: Path,
):
    store = Store.from_url(f"sqlite:///{tmp_path / 'r.db'}", migrate=True)
    hub = EventHub()
    h = Harness(None, None, None, None, store, hub)  # type: ignore[arg-type]
    rec = h.deploy(statuses=("in_progress",))
    for i in range(40):
        store.add_event(
            rec.id, status="in_progress", message=f"e{i}", percent=None, details={}, at=T0
        )
    feeds = LiveFeeds(lambda: store, hub, buffer_events=10, page_events=5, ping_interval=5)
    fast = deployment_events(feeds, rec.id)
    slow = deployment_events(feeds, rec.id)
    first_slow = await anext(slow)  # the slow viewer takes one chunk, then stops reading
    assert first_slow.count(b"event: progress") == 5  # the first page read
    store.set_status(rec.id, "completed", at=T0 + timedelta(minutes=1))
    h.publish(rec, "completed", "completed")
    received = b""
    async for chunk in fast:  # the fast one is never held up by the slow one
        received += chunk
    assert received.count(b"event: progress") == 42 + 1 and b"event: end" in received
    rest = b"".join([chunk async for chunk in slow])
    assert rest.startswith(b": skipped to after event ")
    assert rest.count(b"event: progress") < 40 and rest.endswith(b"\n\n")
    assert b"event: end" in rest and not feeds and not hub.watching()
    store.close()


# ---- POST /api/v1/sync ---------------------------------------------------------------


async def test_sync_needs_the_bearer_token(http: Harness):
    url = "/api/v1/sync"
    missing = await http.client.post(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = await http.client.post(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "wrong bearer token"}
    basic = await http.client.post(url, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    assert http.control.syncs == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ok = await http.client.post(url, headers=auth)
    assert (ok.status_code, ok.json()) == (202, {"status": "accepted"})
    assert http.control.syncs == ["manual"]

    retry = await http.client.post(
        url, headers=auth, json={"environment": "staging", "service": "api"}
    )
    assert retry.status_code == 202 and http.control.retries == [("staging", "api")]
    unknown = await http.client.post(
        url, headers=auth, json={"environment": "staging", "service": "db"}
    )
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "no service db in environment staging"}
    lonely = await http.client.post(url, headers=auth, json={"service": "api"})
    assert lonely.status_code == 400
    extra = await http.client.post(url, headers=auth, json={"env": "staging"})
    assert extra.status_code == 400 and "env" in extra.json()["error"]
    garbage = await http.client.post(url, headers=auth, content=b"{nope")
    assert garbage.status_code == 400
    http.control.decisions = [Decision("staging", "api", "1.1", "1.0", "out_of_sync", "")]
    no_env = await http.client.post(url, headers=auth, json={"environment": "qa"})
    assert no_env.status_code == 404 and no_env.json() == {"error": "no environment qa"}
    env = await http.client.post(url, headers=auth, json={"environment": "staging"})
    assert env.status_code == 202
    assert http.control.syncs == ["manual", "manual", "manual"]


async def test_sync_without_a_configured_token_is_refused(tmp_path: Path):
    h = await start(tmp_path, make_config(tmp_path, token=False))
    try:
        for path in (
            "/api/v1/sync",
            "/api/v1/deploy",
            "/api/v1/rollback",
            "/api/v1/environments/staging/suspend",
            "/api/v1/environments/staging/resume",
        ):
            r = await h.client.post(path, headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403, path
            assert r.json() == {"error": "no token configured: set server.token_file"}
        assert h.control.syncs == []
    finally:
        await h.client.aclose()
        await h.server.stop()
        h.store.close()


# ---- POST /hooks/git -----------------------------------------------------------------


def github(
    body: bytes,
    *,
    event: str = "push",
    delivery: str = "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    secret: str = WEBHOOK_SECRET,
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": "sha256="
        + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }


def push(ref: str = "refs/heads/main") -> bytes:
    return json.dumps(
        {
            "ref": ref,
            "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "after": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
            "repository": {"full_name": "octo-org/desired-state"},
            "pusher": {"name": "octocat"},
            "commits": [{"id": "59b20b8d", "message": "api 1.4.2"}],
        }
    ).encode()


async def webhook_counts(h: Harness) -> dict[str, float]:
    text = (await h.client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("reconciler_webhook_requests_total{"):
            label, value = line.split("} ")
            out[label.split('"')[1]] = float(value)
    return out


async def test_github_webhook_outcomes_and_counts(http: Harness):
    post = http.client.post
    body = push()
    ok = await post("/hooks/git", content=body, headers=github(body))
    assert (ok.status_code, ok.json()) == (202, {"status": "accepted"})
    assert http.control.syncs == ["webhook"]
    again = await post("/hooks/git", content=body, headers=github(body))
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    bad = await post("/hooks/git", content=body, headers=github(body, delivery="2", secret="guess"))
    assert bad.status_code == 403 and "signature" in bad.json()["error"]
    unsigned = {k: v for k, v in github(body, delivery="3").items() if k != "X-Hub-Signature-256"}
    r = await post("/hooks/git", content=body, headers=unsigned)
    assert r.status_code == 401
    other = push("refs/heads/feature")
    r = await post("/hooks/git", content=other, headers=github(other, delivery="4"))
    assert (r.status_code, r.json()) == (
        202,
        {"status": "ignored", "reason": "push to branch feature, not main"},
    )
    ping = json.dumps({"zen": "Design for failure.", "hook_id": 12}).encode()
    r = await post("/hooks/git", content=ping, headers=github(ping, event="ping", delivery="5"))
    assert r.status_code == 202 and r.json()["status"] == "ignored"
    garbage = b"{not json"
    r = await post("/hooks/git", content=garbage, headers=github(garbage, delivery="6"))
    assert r.status_code == 400
    assert http.control.syncs == ["webhook"]
    counts = await webhook_counts(http)
    assert counts == {
        "accepted": 1,
        "ignored": 2,
        "unauthorized": 1,
        "forbidden": 1,
        "too_large": 0,
        "bad_request": 1,
        "duplicate": 1,
        "unavailable": 0,
    }


async def test_oversized_webhooks_are_413(tmp_path: Path):
    h = await start(tmp_path, make_config(tmp_path, webhook_max_bytes=2048))
    try:
        big = json.dumps({"ref": "refs/heads/main", "pad": "x" * 4096}).encode()
        r = await h.client.post("/hooks/git", content=big, headers=github(big))
        assert r.status_code == 413 and "2048" in r.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            for _ in range(8):
                yield b"x" * 1024

        r = await h.client.post("/hooks/git", content=chunks(), headers=github(big, delivery="c"))
        assert r.status_code == 413
        assert (await webhook_counts(h))["too_large"] == 2
        assert h.control.syncs == []
    finally:
        await h.client.aclose()
        await h.server.stop()
        h.store.close()


async def test_gitlab_and_generic_webhooks(http: Harness):
    body = json.dumps(
        {"object_kind": "push", "ref": "refs/heads/main", "checkout_sha": "da15608", "commits": []}
    ).encode()
    gitlab = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": WEBHOOK_SECRET,
        "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
        "Idempotency-Key": "f5e5f430-f57b-4e6e-9fac-d9128cd7232f",
    }
    r = await http.client.post("/hooks/git", content=body, headers=gitlab)
    assert r.status_code == 202 and r.json() == {"status": "accepted"}
    bad = {**gitlab, "X-Gitlab-Token": "guess", "Idempotency-Key": "x"}
    r = await http.client.post("/hooks/git", content=body, headers=bad)
    assert r.status_code == 403

    generic = json.dumps({"branch": "main"}).encode()
    now = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "X-Reconciler-Timestamp": str(now),
        "X-Reconciler-Signature-256": sign_generic(WEBHOOK_SECRET, now, generic, delivery="ci-1"),
        "X-Reconciler-Delivery": "ci-1",
    }
    r = await http.client.post("/hooks/git", content=generic, headers=headers)
    assert r.status_code == 202 and r.json() == {"status": "accepted"}
    stale = now - 3600
    headers = {
        "X-Reconciler-Timestamp": str(stale),
        "X-Reconciler-Signature-256": sign_generic(WEBHOOK_SECRET, stale, generic, delivery="ci-2"),
        "X-Reconciler-Delivery": "ci-2",
    }
    r = await http.client.post("/hooks/git", content=generic, headers=headers)
    assert r.status_code == 403 and "replay window" in r.json()["error"]
    assert http.control.syncs == ["webhook", "webhook"]


async def test_webhooks_off_without_a_secret(tmp_path: Path):
    h = await start(tmp_path, make_config(tmp_path, webhooks=False))
    try:
        body = push()
        r = await h.client.post(
            "/hooks/git", content=body, headers={"X-Hub-Signature-256": sign("x", body)}
        )
        assert r.status_code == 503
        assert r.json() == {"error": "webhooks are off: set server.webhook_secret_file"}
    finally:
        await h.client.aclose()
        await h.server.stop()
        h.store.close()


# ---- OpenAPI -------------------------------------------------------------------------


async def test_openapi_lists_exactly_the_served_routes(http: Harness):
    doc = (await http.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    served = {
        (route.path, method.lower())
        for route in http.app.routes
        for method in route.methods
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert served == documented
    assert {r.path for r in ROUTES} == set(doc["paths"])
    for name in ("Deployment", "DeploymentDetail", "ProgressEvent", "StatusEntry", "Error"):
        assert name in doc["components"]["schemas"]
    # Every $ref points at a schema that exists.
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs <= set(doc["components"]["schemas"])


def validator(name: str, *, array: bool = False) -> jsonschema.Draft202012Validator:
    doc = openapi_document()
    ref = {"$ref": f"#/components/schemas/{name}"}
    schema = {
        **({"type": "array", "items": ref} if array else ref),
        "components": doc["components"],
    }
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


async def test_real_responses_validate_against_their_schemas(http: Harness):
    rec = http.deploy()
    http.deploy("staging", "worker", "2", statuses=("in_progress", "failed"))
    http.store.add_event(
        rec.id, status="in_progress", message="m", percent=40, details={"a": 1}, at=T0
    )
    http.control.decisions = [
        Decision("staging", "api", "1.1", "1.0", "deploying", "", last_deployment_id=rec.id)
    ]
    c = http.client
    validator("Deployment", array=True).validate((await c.get("/api/v1/deployments")).json())
    validator("DeploymentDetail").validate((await c.get(f"/api/v1/deployments/{rec.id}")).json())
    validator("StatusEntry", array=True).validate((await c.get("/api/v1/status")).json())
    validator("Error").validate((await c.get("/api/v1/deployments/999")).json())
    validator("Health").validate((await c.get("/healthz")).json())
    validator("Ready").validate((await c.get("/readyz")).json())
    replicas = (await c.get("/api/v1/replicas")).json()
    validator("Replicas").validate(replicas)  # PostgreSQL's: tests/test_replicas.py
    assert replicas["replicated"] is False and replicas["replicas"] == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    validator("Accepted").validate((await c.post("/api/v1/sync", headers=auth)).json())
    body = push("refs/heads/other")
    validator("WebhookReply").validate(
        (await c.post("/hooks/git", content=body, headers=github(body))).json()
    )
    events = http.store.events_after(rec.id, 0)
    for event in events:
        validator("ProgressEvent").validate(event.to_json())
    # The schemas are strict: a renamed field would fail.
    with pytest.raises(jsonschema.ValidationError):
        validator("Deployment").validate({**rec.to_json(), "extra": 1})


# ---- the server inside the loop ------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:9090", ("::1", 9090)),
        (":8080", ("", 8080)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8080", "::1:8080", "[::1]8080", "host:http", "h:70000"])
def test_parse_listen_refuses(listen):
    with pytest.raises(HttpServerError, match="bad listen address"):
        parse_listen(listen)


async def test_connections_send_without_waiting_for_acks(http: Harness):
    """TCP_NODELAY on every accepted connection: a kept-alive client's next response is
    not held back until the client's delayed ACK (~40 ms each)."""
    assert (await http.client.get("/healthz")).status_code == 200
    await wait_until(lambda: http.server.guard.kept_alive, what="the kept-alive connection")
    (connection,) = http.server.guard.kept_alive
    sock = connection.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_a_port_in_use_is_one_clear_error(http: Harness):
    host, port = http.server.address or ("", 0)
    other = HttpServer(http.app, f"{host}:{port}")
    with pytest.raises(HttpServerError) as err:
        await other.start()
    assert str(err.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"


async def test_serve_leaves_the_signal_handlers_alone_and_stops_when_cancelled(tmp_path: Path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    store = Store.from_url(f"sqlite:///{tmp_path / 'db.sqlite'}", migrate=True)
    control = FakeControl(make_config(tmp_path), store, EventHub())
    ready = asyncio.Event()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(serve(create_app(control), f"127.0.0.1:{port}", ready=ready))
    await ready.wait()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/healthz")).status_code == 200
    assert {sig: signal.getsignal(sig) for sig in before} == before
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with socket.socket() as again:  # the port is free again
        again.bind(("127.0.0.1", port))
    store.close()


# ---- connections: timeouts and the cap -------------------------------------------------


@contextlib.asynccontextmanager
async def guarded(tmp_path: Path, **limits: Any) -> AsyncIterator[Harness]:
    h = await start(tmp_path, make_config(tmp_path), limits=Limits(**limits))
    try:
        yield h
    finally:
        await h.client.aclose()
        await h.server.stop()
        h.store.close()


async def raw(h: Harness) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = h.server.address or ("", 0)
    return await asyncio.open_connection(host, port)


async def test_a_client_slow_to_send_its_headers_gets_a_408_and_is_closed(tmp_path: Path):
    async with guarded(tmp_path, header_timeout=0.3) as h:
        silent = await raw(h)
        slow = await raw(h)
        slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        for reader, _ in (silent, slow):
            answer = await asyncio.wait_for(reader.read(), 5)  # read to EOF: closed
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert answer.endswith(b'{"error": "request not received in time"}')
        assert h.server.guard.timed_out == 2
        # A prompt client is not affected, and keeps its connection between requests.
        for _ in range(3):
            assert (await h.client.get("/healthz")).status_code == 200


async def test_a_client_slow_to_send_its_body_is_dropped(tmp_path: Path):
    async with guarded(tmp_path, header_timeout=5, body_timeout=0.3) as h:
        reader, writer = await raw(h)
        writer.write(
            b"POST /hooks/git HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b'X-Hub-Signature-256: sha256=00\r\n\r\n{"ref"'
        )
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, no answer
        assert 0.25 < time.monotonic() - started < 4
        assert h.server.guard.timed_out == 1


async def test_a_client_that_stops_reading_its_response_is_dropped(tmp_path: Path):
    async with guarded(tmp_path, write_timeout=0.3) as h:
        rec = h.deploy()
        h.store.append_log(rec.id, [("stdout", "z" * 8000, T0)] * 2000)  # 16 MB of log
        host, port = h.server.address or ("", 0)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        sock.connect((host, port))
        try:
            for offset in range(0, 2000, 120):  # pipelined: ~1 MB each
                sock.sendall(
                    f"GET /api/v1/deployments/{rec.id}/log?offset={offset}&limit=120 "
                    "HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
            await wait_until(lambda: h.server.guard.write_timeouts == 1, what="the drop")
            assert (await h.client.get("/healthz")).status_code == 200
        finally:
            sock.close()


async def test_at_the_cap_idle_connections_make_room_and_busy_ones_refuse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    async with guarded(tmp_path, max_connections=3, header_timeout=30) as h:
        idle = [await raw(h) for _ in range(3)]
        # A fourth connection: the oldest idle one is closed to make room for it.
        assert (await h.client.get("/healthz")).status_code == 200
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        assert h.server.guard.evicted == 1
        # Fresh connections go before a client's kept-alive one, which keeps working.
        extra = await raw(h)
        assert await asyncio.wait_for(idle[1][0].read(), 5) == b""
        assert (await h.client.get("/healthz")).status_code == 200
        assert h.server.guard.evicted == 2
        extra[1].close()
        # Three streams keep their connections busy: now a new connection is refused.
        await h.client.aclose()
        rec = h.deploy(statuses=("in_progress",))
        streams = []
        for _ in range(3):
            reader, writer = await raw(h)
            writer.write(
                f"GET /api/v1/deployments/{rec.id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            streams.append((reader, writer))
        for _, writer in idle[1:]:  # (they were evicted by now; closing ours is harmless)
            writer.close()
        caplog.set_level(logging.WARNING, "reconciler.http")
        for _ in range(5):
            reader, writer = await raw(h)
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"too many connections" in answer
            writer.close()
        refusals = [r for r in caplog.records if "http_connections_refused" in r.getMessage()]
        assert len(refusals) == 1 and h.server.guard.refused == 5
        text = h.app.state.ctx.metrics.render().decode()
        assert "reconciler_http_connections 3.0" in text
        assert "reconciler_http_max_connections 3.0" in text
        assert 'reconciler_http_connections_closed_total{reason="refused"} 5.0' in text
        assert 'reconciler_http_connections_closed_total{reason="evicted"}' in text
        assert "reconciler_sse_viewers 3.0" in text
        for _, writer in streams:
            writer.close()


def test_the_unit_leaves_descriptors_for_every_connection_allowed():
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "reconciler.service").read_text()
    [limit] = [
        line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("LimitNOFILE=")
    ]
    default = Limits().max_connections
    assert connection_budget(default, int(limit)) == default
    assert connection_budget(default, 1024) == 768  # what the unit's default would allow


def test_connection_limits_cannot_change_on_reload(tmp_path: Path):
    old = make_config(tmp_path)
    _check_reloadable(old, make_config(tmp_path))
    with pytest.raises(ConfigError, match=r"^server.max_connections, server.header_timeout "):
        _check_reloadable(old, make_config(tmp_path, max_connections=5, header_timeout="1s"))
