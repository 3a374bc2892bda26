"""Drift: live versions read from the targets, state `drifted`, self-heal (trigger drift).

Planner rules on values; the command provider's `current_version_command` and the drift
monitor through a real engine, a real git repository and SQLite; and a real daemon process
that reads by itself every `drift_interval` and shows drift in /api/v1/status and /metrics.
(The docker provider's drift tests are in test_docker.py, next to its engine.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from desired_state import EnvironmentSpec
from reconciler.config import Config
from reconciler.engine import Engine
from reconciler.notify import Notifier
from reconciler.plan import LiveVersion, PlanSettings, RecordedState, ServiceRecord, plan
from reconciler.store import DriftEvent, LiveObservation, Store
from tests import support
from tests.support import RECONCILER, Repo, cli_env, wait_for
from tests.test_notify import Receiver

pytestmark = pytest.mark.timeout(90)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SETTINGS = PlanSettings(retries=2, retry_backoff=60)


# ---- the planner --------------------------------------------------------------------


def spec(**extra: Any) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {"environment": "prod", "provider": "p", "services": {"api": {"version": "1.4.2"}}, **extra}
    )


def decide(live: LiveVersion | None, rec: ServiceRecord | None = None, **extra: Any):
    rec = rec or ServiceRecord(deployed_version="1.4.2", last_deployment_id=7)
    recorded = RecordedState(
        services={("prod", "api"): rec}, live={("prod", "api"): live} if live else {}
    )
    [d] = plan({"prod": spec(**extra)}, recorded, NOW, SETTINGS)
    return d


def test_plan_a_different_live_version_is_drifted_with_both_versions_in_the_message():
    d = decide(LiveVersion("1.3.0", 7))
    assert (d.state, d.deploy) == ("drifted", False)
    assert d.message == "live version is 1.3.0, deployed 1.4.2"
    assert d.status_json(None)["message"] == "live version is 1.3.0, deployed 1.4.2"


def test_plan_same_unknown_or_stale_reading_is_not_drift():
    assert decide(LiveVersion("1.4.2", 7)).state == "synced"
    assert decide(None).state == "synced"
    # Read before the latest deployment (id 7): says nothing about what runs now.
    assert decide(LiveVersion("1.3.0", 6)).state == "synced"
    running = ServiceRecord(deployed_version="1.4.2", last_deployment_id=7, running=True)
    assert decide(LiveVersion("1.3.0", 7), running).state == "deploying"


def test_plan_self_heal_redeploys_with_trigger_drift_unless_suspended():
    d = decide(LiveVersion("1.3.0", 7), self_heal="true")
    assert (d.state, d.deploy, d.trigger, d.desired) == ("drifted", True, "drift", "1.4.2")
    assert d.message == "live version is 1.3.0, deployed 1.4.2; self-heal"
    d = decide(LiveVersion("1.3.0", 7), self_heal=True, suspended=True)
    assert (d.state, d.deploy) == ("drifted", False)
    assert d.message == "live version is 1.3.0, deployed 1.4.2; suspended in git"


def test_plan_self_heal_backs_off_and_gives_up_like_any_retry():
    failed_once = ServiceRecord(
        deployed_version="1.4.2",
        last_deployment_id=8,
        streak_version="1.4.2",
        streak_count=1,
        streak_last_at=NOW - timedelta(seconds=10),
    )
    d = decide(LiveVersion("1.3.0", 8), failed_once, self_heal=True)
    assert (d.state, d.deploy) == ("drifted", False)
    assert d.message.endswith("; self-heal retry in 50s")
    assert d.not_before == NOW + timedelta(seconds=50)
    gave_up = ServiceRecord(
        deployed_version="1.4.2", last_deployment_id=9, streak_version="1.4.2", streak_count=2
    )
    d = decide(LiveVersion("1.3.0", 9), gave_up, self_heal=True)
    assert (d.state, d.deploy) == ("drifted", False)
    assert d.message.endswith("; self-heal gave up after 2 attempts")


# ---- the store (SQLite and PostgreSQL) ------------------------------------------------


def test_store_live_versions_upsert_and_drift_events(store: Store):
    def obs(version: str | None, at: datetime, **kw: Any) -> LiveObservation:
        return LiveObservation("prod", "api", version, 7, "1.4.2", at, **kw)

    store.save_live_versions(
        [obs("1.3.0", NOW, drifted_since=NOW)], [DriftEvent("prod", "api", "1.3.0", "1.4.2", NOW)]
    )
    later = NOW + timedelta(minutes=5)
    store.save_live_versions(
        [obs(None, later, error="timed out"), LiveObservation("dev", "api", "1", 1, "1", later)]
    )
    rows = store.live_versions()
    assert rows[("prod", "api")] == obs(None, later, error="timed out")
    assert rows[("dev", "api")].version == "1" and not rows[("dev", "api")].drifted
    assert list(store.live_versions(["dev"])) == [("dev", "api")]
    cursor = store.start_drift_cursor("drift", at=NOW)
    assert (cursor.last_event_id, cursor.last_sync_id) == (1, 0)  # starts at the end
    store.save_live_versions([], [DriftEvent("prod", "api", "1.2.0", "1.4.2", later)])
    [event] = store.drift_events_after(cursor.last_event_id)
    assert (event.id, event.live_version, event.at) == (2, "1.2.0", later)


# ---- the command provider through a real engine -------------------------------------

# Deploying writes the version where `current_version_command` reads it: the "target".
DEPLOY = """#!/bin/sh
echo "$3" > "$LIVE/$1-$2"
"""
PROBE = """#!/bin/sh
case "$RECONCILER_SERVICE" in
  broken) echo "target says no (token $PROBE_TOKEN)" >&2; exit 4 ;;
esac
f="$LIVE/$RECONCILER_ENVIRONMENT-$RECONCILER_SERVICE"
[ -f "$f" ] && cat "$f"
exit 0
"""


class Target:
    """A repository, a deploy script that records the version in a file, and a config."""

    def __init__(self, tmp: Path, **daemon: Any) -> None:
        self.tmp = tmp
        self.repo = Repo(tmp / "desired")
        self.live = tmp / "live"
        self.live.mkdir()
        for name, text in (("deploy.sh", DEPLOY), ("probe.sh", PROBE)):
            (tmp / name).write_text(text)
            (tmp / name).chmod(0o755)
        settings = {"timezone": "UTC", "retries": 2, "retry_backoff": "1s", "kill_grace": "1s"}
        settings.update(daemon)
        lines = "\n".join(
            f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()
        )
        self.config = tmp / "reconciler.toml"
        self.config.write_text(f"""
[repository]
url = "desired"
branch = "main"
poll_interval = "0"
watch = false

[daemon]
state_dir = "state"
{lines}

[server]
listen = ""

[providers.local]
type = "command"
command = ["{tmp}/deploy.sh", "{{environment}}", "{{service}}", "{{version}}"]
current_version_command = ["{tmp}/probe.sh", "{{environment}}"]
env = {{ LIVE = "{self.live}", PROBE_TOKEN = "probe-secret-value" }}
""")

    def set_env(self, env: str, services: dict[str, str], **extra: str) -> None:
        lines = [f"environment: {env}", "provider: local", "services:"]
        for svc, version in services.items():
            lines += [f"  {svc}:", f'    version: "{version}"']
        lines += [f"{k}: {v}" for k, v in extra.items()]
        self.repo.write(f"{env}.yaml", "\n".join(lines) + "\n")
        self.repo.commit(f"{env}: {services}")

    def change_out_of_band(self, env: str, service: str, version: str) -> None:
        (self.live / f"{env}-{service}").write_text(version + "\n")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*RECONCILER, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.tmp,
            env=cli_env(),
        )


def run_engine(target: Target, body: Callable[[Engine], Awaitable[Any]]) -> Any:
    return support.run_engine(target.config, body)


async def settle(engine: Engine) -> None:
    await engine.sync("manual")
    await engine.idle()


def states(decisions) -> dict[str, tuple[str, str]]:
    return {d.service: (d.state, d.message) for d in decisions}


def test_command_current_version_command_shows_drift_in_status(tmp_path: Path):
    t = Target(tmp_path)
    t.set_env("prod", {"api": "1.0", "broken": "2.0"})

    async def body(engine: Engine):
        await settle(engine)
        first = await engine.drift.check()
        before = states(await engine.decisions())
        t.change_out_of_band("prod", "api", "0.9")
        await engine.drift.check()
        after = states(await engine.decisions())
        gauge = engine.drift.drifted_by_environment()
        return first, before, after, gauge, engine.store.live_versions()

    first, before, after, gauge, rows = run_engine(t, body)
    assert {(o.service, o.version) for o in first} == {("api", "1.0"), ("broken", None)}
    assert before == {"api": ("synced", ""), "broken": ("synced", "")}
    assert after["api"] == ("drifted", "live version is 0.9, deployed 1.0")
    assert after["broken"] == ("synced", "")  # unknown is not drift
    assert gauge == {"prod": 1}
    broken = rows[("prod", "broken")]
    assert broken.version is None
    assert (
        broken.error == f"{tmp_path}/probe.sh failed with exit status 4: target says no (token ***)"
    )
    assert rows[("prod", "api")].drifted_since is not None
    # The standalone CLI reads the same records: drift shows there too.
    out = t.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    api = next(s for s in json.loads(out.stdout) if s["service"] == "api")
    assert (api["state"], api["message"]) == ("drifted", "live version is 0.9, deployed 1.0")
    assert "probe-secret-value" not in (tmp_path / "state" / "reconciler.db").read_bytes().decode(
        "utf-8", "replace"
    )


def test_self_heal_redeploys_the_deployed_version_with_trigger_drift(tmp_path: Path):
    t = Target(tmp_path)
    t.set_env("prod", {"api": "1.0"}, self_heal="true")

    async def body(engine: Engine):
        await settle(engine)
        t.change_out_of_band("prod", "api", "0.9")
        await engine.drift.check()  # wakes the self-healing environment
        await engine.idle()
        healed = await engine.drift.check()
        return healed, states(await engine.decisions()), engine.store.history()

    healed, decided, history = run_engine(t, body)
    assert [(d.version, d.previous_version, d.trigger, d.status) for d in history] == [
        ("1.0", "1.0", "drift", "completed"),
        ("1.0", None, "git", "completed"),
    ]
    assert (t.live / "prod-api").read_text().strip() == "1.0"
    assert [(o.service, o.version, o.drifted) for o in healed] == [("api", "1.0", False)]
    assert decided == {"api": ("synced", "")}


def test_suspended_environment_records_drift_and_deploys_nothing(tmp_path: Path):
    t = Target(tmp_path)
    t.set_env("prod", {"api": "1.0"}, self_heal="true")

    async def body(engine: Engine):
        await settle(engine)
        t.set_env("prod", {"api": "1.0"}, self_heal="true", suspended="true")
        await settle(engine)
        t.change_out_of_band("prod", "api", "0.9")
        await engine.drift.check()
        await engine.idle()
        return states(await engine.decisions()), engine.store.history()

    decided, history = run_engine(t, body)
    assert decided["api"] == ("drifted", "live version is 0.9, deployed 1.0; suspended in git")
    assert [d.trigger for d in history] == ["git"]
    assert (t.live / "prod-api").read_text().strip() == "0.9"


def test_drift_is_notified_once_per_change(tmp_path: Path):
    receiver = Receiver()
    receiver.up()
    t = Target(tmp_path)
    t.set_env("prod", {"api": "1.0"})

    async def body(engine: Engine):
        config = Config.model_validate(
            {
                "repository": {"url": str(tmp_path / "desired")},
                "notifications": [
                    {"type": "webhook", "url": receiver.url(), "events": ["drifted"]}
                ],
                "base_dir": tmp_path,
            }
        )
        notifier = Notifier(config, engine.store, None)
        try:
            await settle(engine)
            await notifier.run_once()  # starts its cursors at the end
            t.change_out_of_band("prod", "api", "0.9")
            await engine.drift.check()
            await engine.drift.check()  # the same drift read again: no second notice
            await notifier.run_once()
            first = receiver.drain()
            t.change_out_of_band("prod", "api", "0.8")
            await engine.drift.check()
            await notifier.run_once()
            return first, receiver.drain()
        finally:
            await notifier.aclose()

    try:
        first, second = run_engine(t, body)
    finally:
        receiver.down()
    assert [r.event for r in first] == ["drifted"]
    doc = first[0].json
    assert (doc["environment"], doc["service"]) == ("prod", "api")
    assert doc["drift"] == {"live_version": "0.9", "deployed_version": "1.0"}
    assert doc["message"] == (
        "prod/api drifted: live version is 0.9, deployed 1.0 — found by the drift monitor"
    )
    assert [r.json["drift"]["live_version"] for r in second] == ["0.8"]


# ---- a real daemon: the monitor reads by itself, off the deployment path -------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_reads_live_versions_every_drift_interval_and_serves_drift(tmp_path: Path):
    t = Target(tmp_path, drift_interval=0.2)
    port = free_port()
    if True:
        text = t.config.read_text().replace(
            '[server]\nlisten = ""\n', f'[server]\nlisten = "127.0.0.1:{port}"\n'
        )
        t.config.write_text(text)
        t.set_env("prod", {"api": "1.0"})
        log = tmp_path / "daemon.log"
        proc = subprocess.Popen(
            [*RECONCILER, "--config", str(t.config), "run"],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        try:

            def api_state() -> tuple[str, str | None] | None:
                if proc.poll() is not None:
                    raise AssertionError(log.read_text())
                try:
                    r = client.get("/api/v1/status")
                except httpx.TransportError:
                    return None
                if r.status_code != 200 or not r.json():
                    return None
                return r.json()[0]["state"], r.json()[0]["message"]

            wait_for(lambda: api_state() == ("synced", None), what="api synced")
            started = time.monotonic()
            t.change_out_of_band("prod", "api", "0.7")
            wait_for(
                lambda: api_state() == ("drifted", "live version is 0.7, deployed 1.0"),
                what="drift seen by the daemon",
            )
            assert time.monotonic() - started < 10
            metrics = client.get("/metrics").text
            assert 'reconciler_services_drifted{environment="prod"} 1.0' in metrics
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)
    text = log.read_text()
    assert "event=drift_detected environment=prod service=api live=0.7 deployed=1.0" in text
    assert "Traceback" not in text
