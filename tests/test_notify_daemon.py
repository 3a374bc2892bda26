"""Notifications from the real daemon to a receiver that is down for a while."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import RECONCILER, World, cli_env, wait_for
from tests.test_notify import Receiver

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_receiver_that_was_down_gets_every_notice_once(tmp_path: Path):
    world = World(tmp_path)
    receiver = Receiver(port=free_port())  # not listening yet: the target is down
    world.config.write_text(
        world.config.read_text()
        + f"""
[[notifications]]
name = "ops"
type = "webhook"
url = "{receiver.url()}"
retry_backoff = 0.2
max_backoff = 0.5
"""
    )
    world.repo.set_env("staging", {"api": "1.0"})
    log = world.tmp / "daemon.log"
    proc = subprocess.Popen(
        [*RECONCILER, "--config", str(world.config), "run"],
        cwd=world.tmp,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        wait_for(lambda: ("staging", "api", "1.0") in world.started(), what="the deployment")
        wait_for(lambda: "event=notification_failed" in log.read_text(), what="a failed delivery")
        receiver.up()
        got = [receiver.get(timeout=30), receiver.get(timeout=30)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if receiver.server is not None:
            receiver.down()
    assert sorted(r.event for r in got) == ["completed", "started"]
    body = json.loads(next(r for r in got if r.event == "completed").body)
    assert body["environment"] == "staging" and body["deployment"]["version"] == "1.0"
    with pytest.raises(queue.Empty):
        receiver.requests.get(timeout=0.5)  # nothing delivered twice
    assert len({r.delivery for r in got}) == 2
