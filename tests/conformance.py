"""The provider conformance suite: what every provider type must do, through the real engine,
a real git repository and a real SQLite store, against a backend the test starts.

To run it for a provider type, give pytest a `backend` fixture that yields a `Backend` and
import the tests (see tests/test_conformance.py and docs/providers.md):

    from tests.conformance import *  # noqa: F403  (the test functions)

    @pytest.fixture
    def backend(tmp_path):
        with MyPlatformEmulator() as emulator:
            yield MyBackend(emulator, tmp_path)

Conventions a backend follows: a version ending in `-fail` fails on the target with the
backend's `failure_text` in the error; one ending in `-hang` never finishes (until
cancelled); `set_live` changes the target the way someone at the platform's console would,
so the type's `current_version` reports it. Service `api` in environment `staging`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from reconciler.engine import Engine
from tests.support import Repo, run_engine

__all__ = [
    "Backend",
    "Harness",
    "harness",
    "test_conformance_cancellation_stops_the_run",
    "test_conformance_credentials_never_recorded",
    "test_conformance_deadline_mid_rollout",
    "test_conformance_drift_reads_the_live_version",
    "test_conformance_drift_through_the_engine_and_self_heal",
    "test_conformance_failure_keeps_the_previous_version",
    "test_conformance_failure_with_rollback_restores_the_previous_version",
    "test_conformance_success",
    "test_conformance_validation_refusal_changes_nothing",
]


class Backend(Protocol):
    """A started target for one provider type, and out-of-band access to it."""

    secret: str  # a credential the provider holds: it must never be recorded
    failure_text: str  # part of the error text of a `-fail` version
    reads_live_version: bool  # the type implements current_version

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        """`[providers.local]` (with `type`); valid=False: wrong credentials or endpoint."""

    def params(self) -> dict[str, str]:
        """The params of service `api`."""

    def prepare(self, version: str) -> None:
        """Make `version` deployable (e.g. build its artifact); often nothing."""

    def live_version(self) -> str | None:
        """The version the target runs, read out of band."""

    def set_live(self, version: str) -> None:
        """Change the running version out of band (someone used the dashboard)."""

    def deployments_seen(self) -> int:
        """How many deployments the target has started (to prove nothing changed)."""

    def nothing_running(self) -> bool:
        """Nothing is left in flight on the target."""


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


class Harness:
    """A desired-state repository and a daemon configuration using the backend's provider."""

    def __init__(self, tmp: Path, backend: Backend) -> None:
        self.tmp, self.backend = tmp, backend
        self.repo = Repo(tmp / "desired")
        self.config = tmp / "reconciler.toml"
        self.write_config()

    def write_config(self, *, valid: bool = True) -> None:
        settings = self.backend.provider_settings(valid=valid)
        provider = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
        self.config.write_text(f"""
[repository]
url = "desired"
branch = "main"
poll_interval = "0"
watch = true

[daemon]
state_dir = "state"
timezone = "UTC"
retries = 1
kill_grace = "1s"

[server]
listen = ""

[providers.local]
{provider}
""")

    def set_version(self, version: str, **extra: Any) -> str:
        self.backend.prepare(version)
        lines = ["environment: staging", "provider: local", "services:", "  api:"]
        lines.append(f'    version: "{version}"')
        params = self.backend.params()
        if params:
            lines.append("    params:")
            lines += [f"      {k}: {json.dumps(v)}" for k, v in params.items()]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        self.repo.write("staging.yaml", "\n".join(lines) + "\n")
        return self.repo.commit(f"api {version}")

    def run(self, body: Callable[[Engine], Awaitable[Any]]) -> Any:
        return run_engine(self.config, body)

    def deploy(self, version: str, **extra: Any) -> list[Any]:
        """Commit `version`, sync, wait for the runs to settle; the history, newest first."""
        self.set_version(version, **extra)

        async def body(engine: Engine) -> list[Any]:
            await engine.sync("watch")
            await engine.idle()
            return engine.store.history(environment="staging")

        result: list[Any] = self.run(body)
        return result

    def database(self) -> Path:
        return self.tmp / "state" / "reconciler.db"


@pytest.fixture
def harness(tmp_path: Path, backend: Backend) -> Harness:
    return Harness(tmp_path / "conformance", backend)


def test_conformance_success(harness: Harness, backend: Backend) -> None:
    first = harness.deploy("1.0")
    assert [(d.version, d.status) for d in first] == [("1.0", "completed")], first[0].error_message
    assert backend.live_version() == "1.0"
    second = harness.deploy("1.1")
    assert (second[0].version, second[0].previous_version, second[0].status) == (
        "1.1",
        "1.0",
        "completed",
    )
    assert backend.live_version() == "1.1"


def test_conformance_failure_keeps_the_previous_version(harness: Harness, backend: Backend) -> None:
    harness.deploy("1.0")
    history = harness.deploy("1.1-fail")
    failed = history[0]
    assert (failed.version, failed.status) == ("1.1-fail", "failed")
    assert backend.failure_text in (failed.error_message or "")
    assert backend.live_version() == "1.0"


def test_conformance_failure_with_rollback_restores_the_previous_version(
    harness: Harness, backend: Backend
) -> None:
    harness.deploy("1.0", on_failure="rollback")
    history = harness.deploy("1.1-fail", on_failure="rollback")
    rollback, failed = history[0], history[1]
    assert (failed.version, failed.status) == ("1.1-fail", "rolled_back")
    assert (rollback.version, rollback.trigger, rollback.status) == ("1.0", "rollback", "completed")
    assert backend.live_version() == "1.0"


def test_conformance_validation_refusal_changes_nothing(harness: Harness, backend: Backend) -> None:
    harness.deploy("1.0")
    seen = backend.deployments_seen()
    harness.write_config(valid=False)
    history = harness.deploy("1.1")
    refused = history[0]
    assert (refused.version, refused.status) == ("1.1", "failed")
    assert refused.validation is not None and refused.validation["ok"] is False
    assert (refused.error_message or "").startswith("validation failed")
    assert backend.deployments_seen() == seen and backend.live_version() == "1.0"


def test_conformance_deadline_mid_rollout(harness: Harness, backend: Backend) -> None:
    harness.deploy("1.0")
    history = harness.deploy("1.1-hang", timeout=1)
    assert (history[0].version, history[0].status) == ("1.1-hang", "timed_out")
    assert "deadline of 1s" in (history[0].error_message or "")
    assert backend.nothing_running() and backend.live_version() == "1.0"


def test_conformance_cancellation_stops_the_run(harness: Harness, backend: Backend) -> None:
    harness.deploy("1.0")
    harness.set_version("1.1-hang")

    async def body(engine: Engine) -> tuple[list[int], list[Any]]:
        started = asyncio.Event()
        engine.executor.listener = lambda ev: started.set() if ev.status == "in_progress" else None
        await engine.sync("watch")
        await started.wait()
        cancelled = await engine.stop(0.2)
        return cancelled, engine.store.history(environment="staging")

    cancelled, history = harness.run(body)
    assert history[0].status == "cancelled" and cancelled == [history[0].id]
    assert backend.nothing_running() and backend.live_version() == "1.0"


def test_conformance_drift_reads_the_live_version(harness: Harness, backend: Backend) -> None:
    if not backend.reads_live_version:
        pytest.skip("this type cannot read the live version (no drift detection)")
    harness.deploy("1.0")

    async def read(engine: Engine) -> str | None:
        return await engine.providers["local"].current_version("staging", "api", backend.params())

    assert harness.run(read) == "1.0"
    backend.set_live("0.9-hotfix")
    assert harness.run(read) == "0.9-hotfix"


def test_conformance_drift_through_the_engine_and_self_heal(
    harness: Harness, backend: Backend
) -> None:
    """An out-of-band change on the target, as the daemon's drift monitor finds it: the
    service is `drifted` with the live version in its message; once the environment says
    `self_heal: true`, the deployed version is deployed again with trigger `drift`."""
    if not backend.reads_live_version:
        pytest.skip("this type cannot read the live version (no drift detection)")
    harness.set_version("1.0")

    def states(decisions: list[Any]) -> list[tuple[str, str, str]]:
        return [(d.service, d.state, d.message) for d in decisions]

    async def body(engine: Engine) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        await engine.sync("watch")
        await engine.idle()
        seen["calm"] = [(o.service, o.version) for o in await engine.drift.check()]
        backend.set_live("0.9-hotfix")
        seen["read"] = [(o.service, o.version, o.drifted) for o in await engine.drift.check()]
        seen["drifted"] = states(await engine.decisions())
        seen["status"] = [d.status_json(None) for d in await engine.decisions()]
        seen["suffered"] = engine.store.history(environment="staging")
        harness.set_version("1.0", self_heal="true")
        await engine.sync("watch")
        await engine.drift.check()  # still drifted: wakes the self-healing environment
        await engine.idle()
        seen["healed"] = [(o.service, o.version, o.drifted) for o in await engine.drift.check()]
        seen["after"] = states(await engine.decisions())
        seen["history"] = engine.store.history(environment="staging")
        return seen

    seen = harness.run(body)
    assert seen["calm"] == [("api", "1.0")]
    assert seen["read"] == [("api", "0.9-hotfix", True)]
    message = "live version is 0.9-hotfix, deployed 1.0"
    assert seen["drifted"] == [("api", "drifted", message)]
    assert (seen["status"][0]["state"], seen["status"][0]["message"]) == ("drifted", message)
    assert len(seen["suffered"]) == 1  # drift alone deploys nothing
    history = seen["history"]
    assert [(d.version, d.trigger, d.status) for d in history] == [
        ("1.0", "drift", "completed"),
        ("1.0", "git", "completed"),
    ], history[0].error_message
    assert seen["healed"] == [("api", "1.0", False)]
    assert seen["after"] == [("api", "synced", "")]
    assert backend.live_version() == "1.0"


def test_conformance_credentials_never_recorded(harness: Harness, backend: Backend) -> None:
    harness.deploy("1.0")
    harness.deploy("1.1-fail", on_failure="rollback")

    async def records(engine: Engine) -> list[Mapping[str, Any]]:
        return [
            engine.store.get_deployment(d.id, with_progress=True, with_log=True).to_json()
            for d in engine.store.history()
        ]

    docs = harness.run(records)
    text = json.dumps(docs)
    assert any(doc["log"] for doc in docs)  # there is something to look through
    assert backend.secret not in text
    assert backend.secret.encode() not in harness.database().read_bytes()
