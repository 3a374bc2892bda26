"""The README's first command: the demo daemon on the bundled example repository."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, cli_env, git, wait_for

pytestmark = pytest.mark.timeout(120)


def test_demo_script_deploys_the_examples_and_a_committed_bump(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = tmp_path / "demo"
    env = {
        **cli_env(),
        "DEMO_DIR": str(demo),
        "DEMO_STEP_SECONDS": "0",
        "DEMO_PORT": str(port),
    }
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    reconciler = [
        str(ROOT / ".venv" / "bin" / "reconciler"),
        "--config",
        str(demo / "reconciler.toml"),
    ]

    def history() -> list[dict]:
        out = subprocess.run(
            [*reconciler, "history", "--json"], capture_output=True, text=True, env=env
        )
        return json.loads(out.stdout) if out.returncode == 0 else []

    try:
        wait_for(
            lambda: len([d for d in history() if d["status"] == "completed"]) == 4,
            60,
            "the example environments to deploy",
        )
        staging = demo / "desired-state" / "staging.yaml"
        staging.write_text(staging.read_text().replace('"1.4.2"', '"1.4.3"'))
        git(demo / "desired-state", "commit", "-qam", "api 1.4.3")
        wait_for(
            lambda: any(d["version"] == "1.4.3" and d["status"] == "completed" for d in history()),
            30,
            "the bump to deploy",
        )
        assert (demo / "deployed" / "staging" / "api").read_text().strip() == "1.4.3"
        proc.send_signal(signal.SIGTERM)  # demo.sh exec's the daemon: it gets the signal
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "reconciler demo: watching" in text and "event=stopped" in text
    assert f"curl -s localhost:{port}/api/v1/status" in text  # the banner names the port
    assert f"event=http_listening address=127.0.0.1:{port}" in text
    assert "Traceback" not in text
    # The first sync is logged once, as `startup` (not `watch` for the watch coming up
    # while the HTTP server starts, then `startup` again for the same commit).
    syncs = [line for line in text.splitlines() if "event=sync " in line]
    assert "trigger=startup" in syncs[0] and "full=True" in syncs[0], syncs
    assert "trigger=watch" in syncs[1] and "full=False" in syncs[1], syncs
