"""The `kubernetes` provider end to end: a real git repository, the engine (and a real daemon
process for the API), the real `kubernetes` client, against tests/fake_kube.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.engine import Engine
from tests import support
from tests.fake_kube import FakeKube
from tests.support import RECONCILER, Repo, cli_env, wait_for

pytestmark = pytest.mark.timeout(90)

TOKEN = "kube-e2e-token-8c41d09a"
REPO = "registry.local:5000/team/api"


class KubeWorld:
    """A desired-state repository and a daemon configuration with one kubernetes provider."""

    def __init__(self, tmp: Path, kube: FakeKube, token: str | None = TOKEN, **daemon: Any) -> None:
        self.tmp, self.kube = tmp, kube
        self.repo = Repo(tmp / "desired")
        kube.kubeconfig(tmp / "kubeconfig", token=token, namespace="apps")
        settings = {"retries": 1, "retry_backoff": '"1s"', "kill_grace": '"2s"', **daemon}
        self.config = tmp / "reconciler.toml"
        self.config.write_text(
            """
[repository]
url = "desired"
branch = "main"
poll_interval = "0"
watch = false

[daemon]
state_dir = "state"
timezone = "UTC"
"""
            + "\n".join(f"{k} = {v}" for k, v in settings.items())
            + """

[server]
listen = ""

[providers.k8s]
type = "kubernetes"
kubeconfig = "kubeconfig"
namespace = "apps"
"""
        )

    def set_version(self, version: str, **extra: str) -> str:
        lines = [
            "environment: staging",
            "provider: k8s",
            "services:",
            "  api:",
            f'    version: "{version}"',
            "    params:",
            "      container: app",
            "strategy:",
            "  type: rolling",
            "  max_surge: 1",
            "  max_unavailable: 0",
            *(f"{k}: {v}" for k, v in extra.items()),
        ]
        self.repo.write("staging.yaml", "\n".join(lines) + "\n")
        return self.repo.commit(f"api {version}")

    def image(self) -> str:
        return self.kube.image("deployments", "apps", "api")


def run_engine(world: KubeWorld, body: Callable[[Engine], Awaitable[Any]]) -> Any:
    return support.run_engine(world.config, body)


async def settle(engine: Engine, trigger: str = "watch") -> None:
    await engine.sync(trigger)
    await engine.idle()


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube(token=TOKEN, tick=0.02, deadline_scale=0.01) as fake:
        fake.add_deployment(
            "api", f"{REPO}:1.0", replicas=3, namespace="apps", progress_deadline=30
        )
        yield fake


def test_rollout_failure_rollback_and_drift(tmp_path: Path, kube: FakeKube):
    world = KubeWorld(tmp_path, kube)
    world.set_version("1.0", on_failure="rollback")

    async def body(engine: Engine):
        await settle(engine, "startup")  # 1.0 already runs: recorded, nothing to roll
        world.set_version("1.1", on_failure="rollback")
        await settle(engine)
        after_11 = (world.image(), kube.serving("apps", "api"))
        world.set_version("1.2-fail", on_failure="rollback")
        await settle(engine)
        provider = engine.providers["k8s"]
        params = {"container": "app"}
        live = await provider.current_version("staging", "api", params)
        kube.set_image("deployments", "apps", "api", f"{REPO}:1.1-hotfix")  # out of band
        drifted = await provider.current_version("staging", "api", params)
        history = engine.store.history(environment="staging")
        full = [
            engine.store.get_deployment(d.id, with_progress=True, with_log=True) for d in history
        ]
        return after_11, live, drifted, full

    after_11, live, drifted, history = run_engine(world, body)
    assert after_11 == (f"{REPO}:1.1", {f"{REPO}:1.1": 3})
    rollback, failed, second, first = history
    assert (first.version, first.status) == ("1.0", "completed")
    assert (second.version, second.status) == ("1.1", "completed")
    assert (failed.version, failed.status) == ("1.2-fail", "rolled_back")
    assert "exceeded its progress deadline" in failed.error_message
    assert (rollback.version, rollback.trigger, rollback.status) == ("1.1", "rollback", "completed")
    assert live == "1.1" and drifted == "1.1-hotfix"
    assert kube.serving("apps", "api") != {}  # the hotfix rolls, the cluster keeps serving
    for rec in history:
        assert TOKEN not in json.dumps(rec.to_json())
    db = (tmp_path / "state" / "reconciler.db").read_bytes()
    assert TOKEN.encode() not in db


def test_deadline_mid_rollout_is_timed_out_and_restored(tmp_path: Path, kube: FakeKube):
    kube.add_deployment("slow", f"{REPO}:1.0", replicas=3, namespace="apps")  # 6 s deadline
    world = KubeWorld(tmp_path, kube)
    world.repo.write(
        "staging.yaml",
        "environment: staging\nprovider: k8s\ntimeout: 1\nservices:\n"
        '  slow:\n    version: "1.1-fail"\n',
    )
    world.repo.commit()

    async def body(engine: Engine):
        await settle(engine, "startup")
        return engine.store.history()[0]

    rec = run_engine(world, body)
    assert rec.status == "timed_out" and "deadline of 1s" in rec.error_message
    assert kube.image("deployments", "apps", "slow") == f"{REPO}:1.0"


def test_graceful_stop_cancels_the_rollout_and_restores(tmp_path: Path, kube: FakeKube):
    kube.add_deployment("slow", f"{REPO}:1.0", replicas=3, namespace="apps")  # 6 s deadline
    world = KubeWorld(tmp_path, kube)
    world.repo.write(
        "staging.yaml",
        'environment: staging\nprovider: k8s\nservices:\n  slow:\n    version: "1.1-fail"\n',
    )
    world.repo.commit()

    async def body(engine: Engine):
        await engine.sync("startup")
        rolling = asyncio.Event()
        engine.executor.listener = lambda ev: rolling.set() if " updated, " in ev.message else None
        await rolling.wait()
        cancelled = await engine.stop(0.1)
        return cancelled, engine.store.history()

    cancelled, history = run_engine(world, body)
    assert [d.status for d in history] == ["cancelled"] and cancelled == [history[0].id]
    assert kube.image("deployments", "apps", "slow") == f"{REPO}:1.0"


def test_refused_credentials_change_nothing(tmp_path: Path, kube: FakeKube):
    world = KubeWorld(tmp_path, kube, token="not-the-token")
    world.set_version("1.1")

    async def body(engine: Engine):
        await settle(engine, "startup")
        return engine.store.history()[0]

    rec = run_engine(world, body)
    assert rec.status == "failed"
    assert rec.error_message == "validation failed: credentials: 401 Unauthorized: Unauthorized"
    assert rec.validation is not None and not rec.validation["ok"]
    assert kube.patches() == [] and world.image() == f"{REPO}:1.0"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_deploys_and_its_api_never_shows_the_token(tmp_path: Path, kube: FakeKube):
    world = KubeWorld(tmp_path, kube)
    world.set_version("1.1")
    port = free_port()
    world.config.write_text(
        world.config.read_text().replace(
            '[server]\nlisten = ""', f'[server]\nlisten = "127.0.0.1:{port}"'
        )
    )
    stderr = tmp_path / "daemon.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*RECONCILER, "--config", str(world.config), "run"],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def done() -> list[dict[str, Any]]:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited: {stderr.read_text()}")
        try:
            r = client.get("/api/v1/deployments")
        except httpx.TransportError:
            return []
        return [d for d in r.json() if d["status"] in ("completed", "failed")]

    try:
        [record] = wait_for(done, timeout=30, what="the deployment")
        shown = client.get(f"/api/v1/deployments/{record['id']}")
        status = client.get("/api/v1/status")
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert record["status"] == "completed", record
    assert world.image() == f"{REPO}:1.1"
    body = shown.json()
    assert any(" updated, " in p["message"] for p in body["progress"])
    for text in (shown.text, status.text, stderr.read_text()):
        assert TOKEN not in text
    assert "Traceback" not in stderr.read_text()


def test_reconciler_validate_reports_kubernetes_params_with_positions(
    tmp_path: Path, kube: FakeKube
):
    world = KubeWorld(tmp_path, kube)
    world.repo.write(
        "staging.yaml",
        'environment: staging\nprovider: k8s\nservices:\n  api:\n    version: "1.1"\n'
        "    params:\n      image: registry.local/api:1.0\n      kind: CronJob\n"
        "strategy:\n  type: canary\n",
    )
    world.repo.commit()
    out = subprocess.run(
        [*RECONCILER, "--config", str(world.config), "validate", str(world.repo.path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines() + out.stderr.splitlines()
    assert any(
        "staging.yaml:7:" in line
        and "services.api.params.image" in line
        and "not an image repository" in line
        for line in lines
    ), lines
    assert any("services.api.params.kind" in line for line in lines), lines
    assert any("strategy.type" in line and "supports rolling, not canary" in line for line in lines)
    assert "Traceback" not in out.stderr
