"""Notifications out: the outbox, delivered to a real local HTTP server.

Ledger rows are made through the real Store (create_deployment / set_status / add_event /
begin_sync / finish_sync); the receiver is a stdlib ThreadingHTTPServer that records
requests and can answer 500, hang, or be shut down and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.exc import OperationalError

from reconciler.config import Config, ConfigError
from reconciler.events import EventHub
from reconciler.executor import DeploymentEvent
from reconciler.notify import CURSOR_NAME, Notifier, backoff, default_target_name
from reconciler.store import NewDeployment, NotificationRecord, Store

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
COMMIT = "9f1c2ab" + "0" * 33
T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- the receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event(self) -> str:
        return self.headers["X-Reconciler-Event"]

    @property
    def delivery(self) -> int:
        return int(self.headers["X-Reconciler-Delivery"])


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: `mode` per path ("ok", "error", "hang")."""

    modes: dict[str, str] = field(default_factory=dict)
    requests: queue.Queue[Received] = field(default_factory=queue.Queue)
    seen: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                got = Received(self.path, dict(self.headers.items()), body)
                receiver.seen.append(got)
                receiver.requests.put(got)
                mode = receiver.modes.get(self.path, "ok")
                if mode == "hang":
                    receiver.release.wait(30)
                try:
                    code = {"error": 500, "gone": 410, "limited": 429}.get(mode, 200)
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok" if code == 200 else b"no")
                except OSError:  # the client gave up (a hang that timed out)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def down(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, timeout: float = 10.0) -> Received:
        return self.requests.get(timeout=timeout)

    async def aget(self, timeout: float = 10.0) -> Received:
        return await asyncio.to_thread(self.get, timeout)

    def drain(self) -> list[Received]:
        out = []
        while True:
            try:
                out.append(self.requests.get_nowait())
            except queue.Empty:
                return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    instance = Receiver()
    instance.up()
    try:
        yield instance
    finally:
        instance.release.set()
        if instance.server is not None:
            instance.down()


# --------------------------------------------------------------------------- helpers


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def config(tmp_path: Path, *targets: dict[str, Any]) -> Config:
    return Config.model_validate(
        {
            "repository": {"url": str(tmp_path / "repo")},
            "notifications": list(targets),
            "base_dir": tmp_path,
        }
    )


def hook(url: str, name: str = "hook", **settings: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": url, "name": name, **settings}


def create(
    store: Store,
    *,
    environment: str = "production",
    service: str = "api",
    version: str = "1.4.2",
    previous: str | None = "1.4.1",
    attempt: int = 1,
) -> int:
    return store.create_deployment(
        NewDeployment(
            environment=environment,
            service=service,
            version=version,
            previous_version=previous,
            provider="local",
            provider_type="command",
            strategy={"type": "rolling"},
            trigger="git",
            commit=COMMIT,
            commit_author="Ada <ada@example.com>",
            attempt=attempt,
            timeout_seconds=1800,
            params={},
        )
    ).id


def drive(store: Store, deployment_id: int, *statuses: str, at: datetime, **kw: Any) -> None:
    for status in statuses:
        extra = kw if status in ("failed", "timed_out") else {}
        store.set_status(deployment_id, status, at=at, **extra)


def outbox(store: Store, **filters: Any) -> list[NotificationRecord]:
    return list(reversed(store.list_notifications(limit=1000, **filters)))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition on recorded state (the database), checking every 20 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- deriving


def test_cursor_starts_at_the_end_of_the_ledger(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    clock = Clock()
    old = create(store)
    drive(store, old, "validating", "in_progress", "completed", at=T0)
    notifier = Notifier(config(tmp_path, hook(receiver.url())), store, None, clock=clock)

    async def main() -> tuple[int, int]:
        try:
            first = await notifier.run_once()  # history is not notified
            new = create(store, version="1.4.3", previous="1.4.2")
            drive(store, new, "validating", at=T0)
            return first, await notifier.run_once()
        finally:
            await notifier.aclose()

    assert arun(main()) == (0, 1)
    [got] = receiver.drain()
    assert got.event == "started" and got.json["deployment"]["version"] == "1.4.3"
    cursor = store.notification_cursor(CURSOR_NAME)
    assert cursor is not None and cursor.last_event_id > 0


def test_status_changes_map_to_events_and_progress_never_notifies(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    clock = Clock()
    notifier = Notifier(config(tmp_path, hook(receiver.url())), store, None, clock=clock)

    async def main() -> None:
        try:
            await notifier.run_once()
            ok = create(store)
            drive(store, ok, "validating", "in_progress", at=T0)
            for percent in (10, 50, 90):
                store.add_event(
                    ok, status="in_progress", message="step", percent=percent, details={}, at=T0
                )
            drive(store, ok, "completed", at=T0 + timedelta(seconds=72))
            bad = create(store, service="worker", version="2.0", previous="1.9")
            drive(store, bad, "validating", "in_progress", at=T0)
            drive(store, bad, "failed", at=T0 + timedelta(seconds=5), error_message="exit 3")
            drive(store, bad, "rolled_back", at=T0 + timedelta(seconds=9))
            slow = create(store, service="web", version="3.0", previous=None)
            drive(store, slow, "validating", "in_progress", at=T0)
            drive(store, slow, "timed_out", at=T0 + timedelta(seconds=9), error_message="deadline")
            gone = create(store, service="cron", version="1.0", previous=None)
            drive(store, gone, "validating", "cancelled", at=T0)
            assert await notifier.run_once() == 8
        finally:
            await notifier.aclose()

    arun(main())
    got = receiver.drain()
    assert [(r.json["service"], r.event) for r in got] == [
        ("api", "started"),
        ("api", "completed"),
        ("worker", "started"),
        ("worker", "failed"),
        ("worker", "rolled_back"),
        ("web", "started"),
        ("web", "timed_out"),
        ("cron", "started"),  # and its cancellation is not an event to notify
    ]


def test_generic_body_and_signed_headers(store: Store, receiver: Receiver, tmp_path: Path) -> None:
    (tmp_path / "hook-secret").write_text("s3cret\n")
    target = hook(receiver.url("/signed"), secret_file="hook-secret")
    notifier = Notifier(config(tmp_path, target), store, None, clock=Clock())

    async def main() -> None:
        try:
            await notifier.run_once()
            ident = create(store)
            drive(store, ident, "validating", at=T0)
            drive(store, ident, "in_progress", at=T0)
            drive(store, ident, "completed", at=T0 + timedelta(seconds=72))
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    started, completed = receiver.drain()
    for got in (started, completed):
        expected = "sha256=" + hmac.new(b"s3cret", got.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(got.headers["X-Reconciler-Signature-256"], expected)
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["User-Agent"] == "reconciler/0.1.0"
    body = completed.json
    assert list(body) == [
        "event",
        "environment",
        "service",
        "deployment",
        "sync",
        "message",
        "at",
    ]
    assert body["event"] == "completed" and body["sync"] is None
    assert body["environment"] == "production" and body["service"] == "api"
    assert body["at"] == "2026-11-26T10:01:12Z"
    dep = body["deployment"]
    assert dep["status"] == "completed" and dep["duration_seconds"] == 72.0
    assert dep["commit"] == COMMIT and dep["previous_version"] == "1.4.1"
    assert body["message"].startswith(
        "production/api 1.4.2 completed (was 1.4.1) — commit 9f1c2ab by Ada"
    )
    # The started notice shows the record as it was then, not as it is now.
    assert started.json["deployment"]["status"] == "validating"
    assert started.json["deployment"]["completed_at"] is None
    rows = outbox(store, deployment_id=completed.json["deployment"]["id"])
    assert [(r.event, r.state) for r in rows] == [
        ("started", "delivered"),
        ("completed", "delivered"),
    ]
    assert (started.delivery, completed.delivery) == (rows[0].id, rows[1].id)


def test_unsigned_when_no_secret(store: Store, receiver: Receiver, tmp_path: Path) -> None:
    notifier = Notifier(config(tmp_path, hook(receiver.url())), store, None, clock=Clock())

    async def main() -> None:
        try:
            await notifier.run_once()
            drive(store, create(store), "validating", at=T0)
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    [got] = receiver.drain()
    assert "X-Reconciler-Signature-256" not in got.headers


def test_filters_by_environment_and_event(store: Store, receiver: Receiver, tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        hook(
            receiver.url("/prod-failures"), "prod", environments=["production"], events=["failed"]
        ),
        hook(receiver.url("/staging"), "staging", environments=["staging"]),
        hook(receiver.url("/errors"), "errors", environments=["production"], events=["sync_error"]),
    )
    notifier = Notifier(cfg, store, None, clock=Clock())

    async def main() -> None:
        try:
            await notifier.run_once()
            for env in ("production", "staging"):
                ok = create(store, environment=env)
                drive(store, ok, "validating", "completed", at=T0)
                bad = create(store, environment=env, version="1.4.3")
                drive(store, bad, "validating", "failed", at=T0, error_message="boom")
            sync = store.begin_sync(trigger="poll", seen_at=T0, commit=None)
            store.finish_sync(
                sync,
                result="failed",
                ended_at=T0,
                environments_changed=[],
                errors=[],
                full_load=False,
                error_message="fetch failed: connection refused",
            )
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    got = [(r.path, r.event, r.json["environment"]) for r in receiver.drain()]
    by_path: dict[str, list[tuple[str, str | None]]] = {}
    for path, event, env in got:
        by_path.setdefault(path, []).append((event, env))
    assert by_path["/prod-failures"] == [("failed", "production")]
    assert by_path["/staging"] == [
        ("started", "staging"),
        ("completed", "staging"),
        ("started", "staging"),
        ("failed", "staging"),
        ("sync_error", None),  # a sync error belongs to no environment: every target
    ]
    assert by_path["/errors"] == [("sync_error", None)]


def test_sync_errors(store: Store, receiver: Receiver, tmp_path: Path) -> None:
    notifier = Notifier(config(tmp_path, hook(receiver.url())), store, None, clock=Clock())

    def finish(sync: int, result: str, **kw: Any) -> None:
        values: dict[str, Any] = {
            "ended_at": T0,
            "environments_changed": [],
            "errors": [],
            "full_load": False,
        }
        values.update(kw)
        store.finish_sync(sync, result=result, **values)

    async def main() -> None:
        try:
            await notifier.run_once()
            fine = store.begin_sync(trigger="poll", seen_at=T0, commit=None)
            finish(fine, "ok")
            invalid = store.begin_sync(trigger="watch", seen_at=T0, commit=None)
            error = {"file": "prod.yaml", "line": 3, "col": 5, "path": "services", "message": "bad"}
            finish(invalid, "errors", errors=[error])
            running = store.begin_sync(trigger="poll", seen_at=T0, commit=None)
            await notifier.run_once()
            assert [r.json["sync"]["id"] for r in receiver.drain()] == [invalid]
            # The unfinished sync is not skipped: its outcome is notified once known.
            finish(running, "refused", error_message="refused 1234: history rewritten")
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    [refused] = receiver.drain()
    assert refused.event == "sync_error"
    assert refused.json["sync"]["result"] == "refused"
    assert refused.json["deployment"] is None
    assert "history rewritten" in refused.json["message"]


def test_slack_message_shape(store: Store, receiver: Receiver, tmp_path: Path) -> None:
    target = {"type": "slack", "url": receiver.url("/services/T0/B0/xyz"), "name": "slack"}
    notifier = Notifier(config(tmp_path, target), store, None, clock=Clock())

    async def main() -> None:
        try:
            await notifier.run_once()
            ok = create(store)
            drive(store, ok, "validating", "completed", at=T0)
            bad = create(store, version="1.4.3", previous="1.4.2")
            drive(store, bad, "validating", "failed", at=T0, error_message="exit 3: <oops> & more")
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    _, completed, _, failed = receiver.drain()
    body = completed.json
    assert set(body) == {"text", "blocks"}
    assert body["text"] == "✅ production/api 1.4.2 completed (was 1.4.1) — commit 9f1c2ab by Ada"
    section, context = body["blocks"]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert "*production/api 1.4.2 completed (was 1.4.1)*" in section["text"]["text"]
    assert context["type"] == "context"
    assert context["elements"][0]["type"] == "mrkdwn"
    assert "commit 9f1c2ab by Ada" in context["elements"][0]["text"]
    body = failed.json
    assert body["text"].startswith(
        "❌ production/api 1.4.3 failed (was 1.4.2): exit 3: &lt;oops&gt;"
    )
    assert body["blocks"][1]["text"]["text"] == "```exit 3: &lt;oops&gt; &amp; more```"
    for block in body["blocks"]:
        text = block.get("text", {}).get("text", "")
        assert len(text) <= 3000


# --------------------------------------------------------------------------- delivery


def test_target_down_then_recovering_respects_backoff_and_delivers_once(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    clock = Clock()
    target = hook(receiver.url(), retry_backoff="10s", max_backoff="25s", max_attempts=10)
    notifier = Notifier(config(tmp_path, target), store, None, clock=clock)
    receiver.modes["/hook"] = "error"

    async def step(seconds: float = 0.0) -> int:
        clock.advance(seconds)
        return await notifier.run_once()

    async def main() -> None:
        try:
            await notifier.run_once()
            drive(store, create(store), "validating", at=T0)
            assert await step() == 0
            [row] = outbox(store)
            assert (row.attempts, row.state) == (1, "pending")
            assert row.next_attempt_at == T0 + timedelta(seconds=10)
            assert row.last_error == "HTTP 500: no"
            assert len(receiver.drain()) == 1
            assert await step(9.9) == 0 and receiver.drain() == []  # not due yet
            assert await step(0.1) == 0 and len(receiver.drain()) == 1  # 2nd attempt, +20 s
            receiver.down()  # and now it is away altogether
            assert await step(19.9) == 0
            assert outbox(store)[0].attempts == 2
            assert await step(0.1) == 0  # 3rd attempt: connection refused; then +25 s (cap)
            [row] = outbox(store)
            assert row.attempts == 3 and row.next_attempt_at == clock.now + timedelta(seconds=25)
            assert "Connect" in (row.last_error or "")
            receiver.modes["/hook"] = "ok"
            receiver.up()  # back, on the same port
            assert await step(24) == 0 and receiver.drain() == []
            assert await step(1) == 1
            assert await step(3600) == 0
        finally:
            await notifier.aclose()

    arun(main())
    [got] = receiver.drain()
    [row] = outbox(store)
    assert got.delivery == row.id and got.event == "started"
    assert (row.state, row.attempts, row.delivered_at) == (
        "delivered",
        4,
        clock.now - timedelta(hours=1),
    )
    assert row.last_error is not None  # the last failure is kept for the record
    assert notifier.stats()["hook"] == {"delivered": 1, "failed": 3, "suppressed": 0, "dead": 0}


def test_down_for_a_while_then_recovers_while_running(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    """The real loop and clock: refused connections, then the target comes back."""
    target = hook(receiver.url(), retry_backoff=0.05, max_backoff=0.2, max_attempts=1000)
    notifier = Notifier(config(tmp_path, target), store, EventHub(), poll_interval=0.5)
    receiver.down()

    async def main() -> None:
        task = asyncio.create_task(notifier.run())
        try:
            await until(lambda: store.notification_cursor(CURSOR_NAME) is not None)
            first = create(store)
            drive(store, first, "validating", at=datetime.now(UTC))
            await until(lambda: any(r.attempts >= 3 for r in outbox(store)))
            receiver.up()
            got = await receiver.aget()
            assert got.event == "started"
            drive(store, first, "completed", at=datetime.now(UTC))
            # Lanes are ordered: the second notice arrives after the first was settled.
            second = await receiver.aget()
            assert second.event == "completed"
            await until(lambda: all(r.state == "delivered" for r in outbox(store)))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    arun(main())
    assert receiver.drain() == []  # nothing sent twice
    rows = outbox(store)
    assert [r.state for r in rows] == ["delivered", "delivered"]
    assert rows[0].attempts >= 4 and rows[1].attempts == 1


def test_max_attempts_then_dead(
    store: Store, receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    target = hook(receiver.url(), retry_backoff=1, max_attempts=2)
    notifier = Notifier(config(tmp_path, target), store, None, clock=clock)
    receiver.modes["/hook"] = "error"

    async def main() -> None:
        try:
            await notifier.run_once()
            drive(store, create(store), "validating", at=T0)
            await notifier.run_once()
            clock.advance(1)
            with caplog.at_level(logging.INFO, logger="reconciler.notify"):
                await notifier.run_once()
            clock.advance(3600)
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    assert len(receiver.drain()) == 2
    [row] = outbox(store)
    assert (row.state, row.attempts, row.last_error) == ("dead", 2, "HTTP 500: no")
    assert f"event=notification_dead target=hook id={row.id}" in caplog.text
    assert notifier.stats()["hook"]["dead"] == 1
    assert store.notification_counts() == {"hook": {"dead": 1}}


@pytest.mark.parametrize(("mode", "dead_after"), [("gone", 1), ("limited", None)])
def test_a_refusal_is_final_but_a_rate_limit_is_retried(
    store: Store, receiver: Receiver, tmp_path: Path, mode: str, dead_after: int | None
) -> None:
    clock = Clock()
    target = hook(receiver.url(), retry_backoff=1, max_attempts=5)
    notifier = Notifier(config(tmp_path, target), store, None, clock=clock)
    receiver.modes["/hook"] = mode

    async def main() -> None:
        try:
            await notifier.run_once()
            drive(store, create(store), "validating", at=T0)
            await notifier.run_once()
            clock.advance(10)
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    [row] = outbox(store)
    if dead_after is not None:  # 410 Gone: asking again cannot help
        assert (row.state, row.attempts) == ("dead", dead_after)
        assert len(receiver.drain()) == 1
    else:  # 429: try again later
        assert (row.state, row.attempts) == ("pending", 2)
        assert len(receiver.drain()) == 2


def test_identical_failures_are_suppressed_within_the_interval(
    store: Store, receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    target = hook(receiver.url(), suppress_repeats="60s", events=["failed", "completed"])
    notifier = Notifier(config(tmp_path, target), store, None, clock=clock)

    def fail(at: float, error: str = "health check failed", attempt: int = 1) -> None:
        ident = create(store, attempt=attempt)
        drive(
            store,
            ident,
            "validating",
            "failed",
            at=T0 + timedelta(seconds=at),
            error_message=error,
        )

    def complete(at: float) -> None:
        drive(store, create(store), "validating", "completed", at=T0 + timedelta(seconds=at))

    async def main() -> None:
        try:
            await notifier.run_once()
            fail(0)
            fail(10, attempt=2)  # identical: suppressed
            fail(20, error="another error")  # different: sent
            complete(25)
            complete(26)  # successes are never suppressed
            with caplog.at_level(logging.INFO, logger="reconciler.notify"):
                await notifier.run_once()
            fail(70, attempt=3)  # 70 s after the sent one: sent again
            fail(100, attempt=4)  # 30 s after that: suppressed
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    sent = [(r.event, r.json["deployment"]["error_message"]) for r in receiver.drain()]
    assert sent == [
        ("failed", "health check failed"),
        ("failed", "another error"),
        ("completed", None),
        ("completed", None),
        ("failed", "health check failed"),
    ]
    states = [(r.event, r.state) for r in outbox(store)]
    assert states == [
        ("failed", "delivered"),
        ("failed", "suppressed"),
        ("failed", "delivered"),
        ("completed", "delivered"),
        ("completed", "delivered"),
        ("failed", "delivered"),
        ("failed", "suppressed"),
    ]
    suppressed = outbox(store, state="suppressed")[0]
    assert f"event=notification_suppressed target=hook id={suppressed.id}" in caplog.text
    assert notifier.stats()["hook"]["suppressed"] == 2


def test_a_crash_between_outbox_insert_and_delivery_loses_nothing(
    db_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    cfg = config(tmp_path, hook(receiver.url()))
    first_store = Store.from_url(db_url)
    clock = Clock()

    async def before_crash() -> None:
        notifier = Notifier(cfg, first_store, None, clock=clock)
        await notifier.derive()  # the cursor
        ident = create(first_store)
        drive(first_store, ident, "validating", "completed", at=T0)
        assert await notifier.derive() == 2  # in the outbox; then the process dies

    arun(before_crash())
    first_store.engine.dispose()
    assert receiver.drain() == []

    store = Store.from_url(db_url)
    try:
        notifier = Notifier(cfg, store, None, clock=clock)

        async def after_restart() -> int:
            try:
                return await notifier.run_once() + await notifier.run_once()
            finally:
                await notifier.aclose()

        assert arun(after_restart()) == 2
        assert [r.event for r in receiver.drain()] == ["started", "completed"]
        assert [r.state for r in outbox(store)] == ["delivered", "delivered"]
    finally:
        store.engine.dispose()


def test_a_crash_while_sending_resends_after_the_lease(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    """The at-least-once edge: a row claimed (being sent) when the process died is sent
    again once its lease ran out, with the same X-Reconciler-Delivery id."""
    cfg = config(tmp_path, hook(receiver.url(), timeout=5))
    clock = Clock()
    notifier = Notifier(cfg, store, None, clock=clock)

    async def main() -> None:
        try:
            await notifier.derive()
            drive(store, create(store), "validating", at=T0)
            await notifier.derive()
            claimed = store.claim_next_notification(
                "hook", now=clock(), lease_until=clock() + timedelta(seconds=65)
            )
            assert claimed is not None  # ... and the process dies here
            restarted = Notifier(cfg, store, None, clock=clock)
            try:
                assert await restarted.run_once() == 0  # still leased
                clock.advance(65)
                assert await restarted.run_once() == 1
            finally:
                await restarted.aclose()
        finally:
            await notifier.aclose()

    arun(main())
    [got] = receiver.drain()
    assert got.delivery == outbox(store)[0].id


def test_a_hanging_target_does_not_delay_deployments_or_other_targets(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.modes["/hang"] = "hang"
    cfg = config(
        tmp_path,
        hook(receiver.url("/hang"), "hang", timeout=3, retry_backoff=60),
        hook(receiver.url("/fast"), "fast"),
    )
    notifier = Notifier(cfg, store, EventHub(), poll_interval=0.2)

    async def main() -> None:
        task = asyncio.create_task(notifier.run())
        try:
            await until(lambda: store.notification_cursor(CURSOR_NAME) is not None)
            ident = create(store)
            await asyncio.to_thread(store.set_status, ident, "validating", at=datetime.now(UTC))
            got = {(await receiver.aget()).path, (await receiver.aget()).path}
            assert got == {"/hang", "/fast"}  # the hanging target holds its request open
            # While that delivery hangs, a deployment's record writes are not slowed...
            started = time.monotonic()
            await asyncio.to_thread(store.set_status, ident, "in_progress", at=datetime.now(UTC))
            await asyncio.to_thread(store.set_status, ident, "completed", at=datetime.now(UTC))
            assert time.monotonic() - started < 0.5
            # ... and the other target gets the next notice at once.
            fast = await receiver.aget(timeout=1.5)
            assert (fast.path, fast.event) == ("/fast", "completed")
            hang_rows = outbox(store, target="hang")
            assert hang_rows[0].attempts == 0  # still in flight
            # The hung attempt ends at the target's timeout and is recorded as failed.
            await until(lambda: outbox(store, target="hang")[0].attempts == 1, timeout=5)
            row = outbox(store, target="hang")[0]
            assert row.state == "pending" and row.last_error == "timed out after 3s"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    arun(main())


def test_hub_events_wake_the_notifier(store: Store, receiver: Receiver, tmp_path: Path) -> None:
    hub = EventHub()
    notifier = Notifier(config(tmp_path, hook(receiver.url())), store, hub, poll_interval=60)

    async def main() -> float:
        task = asyncio.create_task(notifier.run())
        try:
            await until(lambda: store.notification_cursor(CURSOR_NAME) is not None)
            ident = create(store)
            rec = store.set_status(ident, "validating", at=datetime.now(UTC))
            started = time.monotonic()
            hub.publish(
                DeploymentEvent(
                    deployment_id=rec.id,
                    environment=rec.environment,
                    service=rec.service,
                    version=rec.version,
                    trigger=rec.trigger,
                    status="validating",
                    message="validating",
                )
            )
            got = await receiver.aget(timeout=5)
            assert got.event == "started"
            return time.monotonic() - started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert arun(main()) < 5  # far sooner than the 60 s poll


def test_database_errors_are_logged_and_retried(
    store: Store, receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(config(tmp_path, hook(receiver.url())), store, None, poll_interval=0.05)
    real_ledger_after = store.ledger_after
    real_claim = store.claim_next_notification
    failures = {"ledger": 2, "claim": 2}

    def flaky(kind: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if failures[kind] > 0:
                failures[kind] -= 1
                raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database away"))
            return real(*args, **kwargs)

        return call

    async def main() -> None:
        task = asyncio.create_task(notifier.run())
        try:
            await until(lambda: store.notification_cursor(CURSOR_NAME) is not None)
            store.ledger_after = flaky("ledger", real_ledger_after)  # type: ignore[method-assign]
            store.claim_next_notification = flaky("claim", real_claim)  # type: ignore[method-assign]
            drive(store, create(store), "validating", at=datetime.now(UTC))
            got = await receiver.aget()
            assert got.event == "started"
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="reconciler.notify"):
        arun(main())
    assert failures == {"ledger": 0, "claim": 0}
    assert "event=notification_derive_error" in caplog.text
    assert "event=notification_lane_error target=hook" in caplog.text


def test_reload_adds_targets_and_refuses_a_bad_one(
    store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    clock = Clock()
    notifier = Notifier(config(tmp_path, hook(receiver.url("/a"), "a")), store, None, clock=clock)

    async def main() -> None:
        try:
            await notifier.run_once()
            notifier.reload(
                config(tmp_path, hook(receiver.url("/a"), "a"), hook(receiver.url("/b"), "b"))
            )
            with pytest.raises(ConfigError, match="secret"):
                notifier.reload(config(tmp_path, hook(receiver.url("/c"), "c", secret_file="nope")))
            drive(store, create(store), "validating", at=T0)
            await notifier.run_once()
        finally:
            await notifier.aclose()

    arun(main())
    assert sorted(r.path for r in receiver.drain()) == ["/a", "/b"]
    assert set(notifier.stats()) == {"a", "b"}


def test_bad_targets_are_configuration_errors(tmp_path: Path, sqlite_url: str) -> None:
    store = Store.from_url(sqlite_url)
    try:
        with pytest.raises(ConfigError, match="http"):
            Notifier(config(tmp_path, hook("ftp://example.com/x")), store, None)
        with pytest.raises(ConfigError, match="second"):
            Notifier(
                config(tmp_path, hook("http://a.example/x", "x"), hook("http://b.example/", "x")),
                store,
                None,
            )
    finally:
        store.engine.dispose()


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    cfg = config(tmp_path, hook("http://h.example/", retry_backoff="5s", max_backoff="30s"))
    target = cfg.notifications[0]
    assert [backoff(target, n) for n in range(1, 6)] == [5, 10, 20, 30, 30]


def test_default_names_never_show_the_url_path(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"type": "slack", "url": "https://hooks.slack.com/services/T/B/SECRET"})
    name = default_target_name(cfg.notifications[0])
    assert name.startswith("slack:hooks.slack.com:") and "SECRET" not in name


def test_retry_after_is_read_from_429_and_503() -> None:
    import httpx

    from reconciler.notify import retry_after_seconds as _retry_after

    def answer(status: int, value: str | None) -> httpx.Response:
        headers = {"Retry-After": value} if value is not None else {}
        return httpx.Response(status, headers=headers)

    assert _retry_after(answer(429, "120"), T0) == 120.0
    assert _retry_after(answer(503, "Thu, 26 Nov 2026 10:00:30 GMT"), T0) == 30.0
    assert _retry_after(answer(500, "120"), T0) is None
    assert _retry_after(answer(429, "soon"), T0) is None
    assert _retry_after(answer(429, None), T0) is None
