"""The daemon under a (pretend) systemd: the notify protocol, signals, the unit file."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import RECONCILER, ROOT, World, cli_env, wait_for

pytestmark = pytest.mark.timeout(90)


class NotifySocket:
    """The datagram socket systemd would own; collects what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))

    def wait(self, key: str, value: str | None = None, after: int = 0, timeout: float = 30) -> int:
        """Index of the first message after `after` with key (=value); waits for it."""

        found: list[int] = []

        def check() -> bool:
            for i, m in enumerate(self.drain()[after:], after):
                if key in m and (value is None or m[key] == value):
                    found.append(i)
                    return True
            return False

        wait_for(check, timeout, f"{key}={value} from the daemon")
        return found[-1]

    def seen_keys(self, start: int = 0, end: int | None = None) -> list[str]:
        return [k for m in self.drain()[start:end] for k in m]


def start(
    world: World, notify: NotifySocket, watchdog_usec: int = 200_000, log: str = "daemon.log"
):
    env = cli_env()
    env.update({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(watchdog_usec)})
    return subprocess.Popen(
        [*RECONCILER, "--config", str(world.config), "run"],
        cwd=world.tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(world.tmp / log).open("w"),
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_ready_only_after_the_first_fetch_then_watchdog_and_stopping(world: World):
    notify = NotifySocket(world.tmp / "notify.sock")
    # The repository does not exist yet: the daemon must not say READY.
    shutil.rmtree(world.repo.path)
    proc = start(world, notify)
    try:
        first_ping = notify.wait("WATCHDOG", "1")
        assert "READY" not in notify.seen_keys()
        assert any(m.get("STATUS") == "fetching the repository" for m in notify.drain())
        # Now the repository appears; the daemon's start-up retry finds it.
        from tests.support import Repo

        world.repo = Repo(world.repo.path)
        sha = world.repo.set_env("staging", {"api": "1.0"})
        ready = notify.wait("READY", "1", after=first_ping)
        assert notify.messages[ready]["STATUS"].startswith(f"synced {sha[:7]}")
        # Idle: the pings keep coming.
        idle = notify.wait("WATCHDOG", "1", after=ready + 1)
        notify.wait("WATCHDOG", "1", after=idle + 1)
        # While deploying, too (the gate holds the deployment open).
        world.repo.set_env("staging", {"api": "2.0-gate"})
        wait_for(
            lambda: any("1 deploying" in m.get("STATUS", "") for m in notify.drain()),
            what="deploying status",
        )
        mark = len(notify.drain())
        notify.wait("WATCHDOG", "1", after=mark)
        notify.wait("WATCHDOG", "1", after=len(notify.drain()))
        world.open_gate()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stopping = notify.wait("STOPPING", "1")
    assert int(notify.messages[stopping]["EXTEND_TIMEOUT_USEC"]) > 10_000_000
    assert "migrating" in notify.messages[0].get("STATUS", "")


def test_sighup_reloads_a_good_configuration_and_refuses_a_broken_one(world: World):
    notify = NotifySocket(world.tmp / "notify.sock")
    world.repo.set_env("staging", {"api": "1.0"})
    proc = start(world, notify, watchdog_usec=0)
    log = world.tmp / "daemon.log"
    try:
        ready = notify.wait("READY", "1")
        good = world.config.read_text().replace("retries = 3", "retries = 5")
        world.config.write_text(good)
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait("RELOADING", "1", after=ready + 1)
        assert "MONOTONIC_USEC" in notify.messages[reloading]
        notify.wait("READY", "1", after=reloading)
        wait_for(lambda: "event=reloaded" in log.read_text(), what="reloaded")

        world.config.write_text(good + "\n[daemon.oops]\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "event=reload_refused" in log.read_text(), what="refusal")
        changed = world.config.read_text().replace('url = "desired"', 'url = "elsewhere"')
        world.config.write_text(changed.replace("\n[daemon.oops]\n", ""))
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "repository.url cannot change on reload" in log.read_text(), what="url refusal"
        )
        # The old configuration still works: a commit is deployed.
        world.repo.set_env("staging", {"api": "1.1"})
        wait_for(lambda: ("staging", "api", "1.1") in world.started(), what="deploy after refusal")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("event=reload_refused") == 2


def test_journal_lines_have_no_timestamp(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    env = {**cli_env(), "JOURNAL_STREAM": "8:1234"}
    proc = subprocess.Popen(
        [*RECONCILER, "--config", str(world.config), "run"],
        cwd=world.tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: ("staging", "api", "1.0") in world.started(), what="deployment")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in err.splitlines() if line]
    assert lines and all(line.startswith("level=") for line in lines), lines[:3]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd)",
)
def test_unit_file_verifies(tmp_path: Path):
    unit = (ROOT / "systemd" / "reconciler.service").read_text()
    exe = shutil.which("reconciler") or str(Path(sys.executable).with_name("reconciler"))
    (tmp_path / "reconciler.service").write_text(
        unit.replace("/opt/reconciler/bin/reconciler", exe)
    )
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "reconciler.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "TimeoutStopSec=90s" in unit and "shutdown_grace" in unit
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=",
        "ConfigurationDirectory=",
        "LoadCredential=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
    ):
        assert directive in unit, directive


def test_reload_keeps_a_running_deployment(world: World):
    notify = NotifySocket(world.tmp / "notify.sock")
    world.repo.set_env("staging", {"api": "1.0-gate"})
    proc = start(world, notify, watchdog_usec=0)
    log = world.tmp / "daemon.log"
    try:
        wait_for(lambda: ("staging", "api", "1.0-gate") in world.started(), what="the run")
        world.config.write_text(world.config.read_text().replace("retries = 3", "retries = 4"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "event=reloaded" in log.read_text(), what="reloaded")
        world.open_gate()
        wait_for(lambda: "status=completed" in log.read_text(), what="the run to complete")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r for r in world.runs() if r[0] == "end"] == [
        ("end", "staging", "api", "1.0-gate", "ok")
    ]
