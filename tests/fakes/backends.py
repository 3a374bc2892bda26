"""Backends of the conformance suite for the built-in types (tests/conformance.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakes.hosted import FakeNetlify, FakeRailway, FakeServer, FakeVercel, make_zip
from tests.support import DEPLOY_SCRIPT, alive

TOKEN = "tok-s3cr3t-9f8e7d6c5b4a"


class CommandBackend:
    """The `command` type with the deploy script of tests/support.py."""

    secret = "hunter2-secret"
    failure_text = "exit status 3"
    reads_live_version = False

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.log, self.pids = tmp / "deploy.log", tmp / "deploy.pids"
        self.log.touch()
        self.script = tmp / "deploy.sh"
        self.script.write_text(DEPLOY_SCRIPT)
        self.script.chmod(0o755)

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        script = str(self.script) if valid else str(self.script.parent / "missing.sh")
        return {
            "type": "command",
            "command": [script, "{environment}", "{service}", "{version}"],
            "env": {
                "DEPLOY_LOG": str(self.log),
                "DEPLOY_PIDS": str(self.pids),
                "DEPLOY_GATE": "/nonexistent",
                "SECRET_TOKEN": self.secret,
            },
        }

    def params(self) -> dict[str, str]:
        return {}

    def prepare(self, version: str) -> None:
        pass

    def _lines(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines()]

    def live_version(self) -> str | None:
        done = [r[3] for r in self._lines() if r[0] == "end" and r[-1] == "ok"]
        return done[-1] if done else None

    def set_live(self, version: str) -> None:
        with self.log.open("a") as f:
            f.write(f"end staging api {version} ok\n")

    def deployments_seen(self) -> int:
        return sum(1 for r in self._lines() if r[0] == "start")

    def nothing_running(self) -> bool:
        if not self.pids.exists():
            return True
        return not any(alive(int(p)) for p in self.pids.read_text().split())


class HostedBackend:
    """A fake hosted platform (tests/fakes/hosted.py) with the provider type that drives it."""

    secret = TOKEN
    reads_live_version = True

    def __init__(self, kind: str, fake: FakeServer, tmp: Path, **settings: Any) -> None:
        self.kind, self.fake, self.tmp = kind, fake, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.bad_token_file = tmp / "bad-token"
        self.bad_token_file.write_text("tok-wrong-0000\n")
        self.settings = settings
        self.failure_text = {
            "vercel": 'Command "npm run build" exited with 1',
            "netlify": "deploy directory 'dist' does not exist",
            "railway": "health check failed",
        }[kind]

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        return {
            "type": self.kind,
            "token_file": str(self.token_file if valid else self.bad_token_file),
            "api_url": self.fake.url,
            "poll_interval": 0.05,
            "request_timeout": 5,
            **self.settings,
        }

    def params(self) -> dict[str, str]:
        if self.kind == "vercel":
            return {"project": "web", "repo": "acme/web"}
        if self.kind == "netlify":
            return {"site": "5a1e-site", "artifact": str(self.tmp / "dist" / "site-{version}.zip")}
        return {
            "service_id": "svc-7f3a",
            "environment_id": "env-prod-1",
            "image": "ghcr.io/acme/web",
        }

    def prepare(self, version: str) -> None:
        if self.kind == "netlify":
            make_zip(self.tmp / "dist" / f"site-{version}.zip", f"<h1>{version}</h1>")

    def live_version(self) -> str | None:
        return self.fake.live_version()  # type: ignore[attr-defined,no-any-return]

    def set_live(self, version: str) -> None:
        self.fake.set_live(version)  # type: ignore[attr-defined]

    def deployments_seen(self) -> int:
        return len(self.fake.runs)

    def nothing_running(self) -> bool:
        return not self.fake.in_flight()  # type: ignore[attr-defined]


FAKES = {"vercel": FakeVercel, "netlify": FakeNetlify, "railway": FakeRailway}
