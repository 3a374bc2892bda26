"""The docker provider against a real Docker Engine (tests/dockerd.py starts one).

Each test uses environment names of its own: the engine is shared by the whole session.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from desired_state import EnvironmentSpec
from reconciler.config import ConfigError, ProviderConfig
from reconciler.engine import Engine
from reconciler.executor import Executor, Job
from reconciler.providers.docker import DockerParams, DockerProvider
from reconciler.store import Store
from tests import support
from tests.dockerd import NETWORK, Dockerd, free_port
from tests.support import Repo

pytestmark = pytest.mark.timeout(120)

FAST = {"poll_interval": 0.05, "ready_seconds": 0.3}


def provider(host: str, **settings: Any) -> DockerProvider:
    conf = ProviderConfig.model_validate({"type": "docker", "host": host, **FAST, **settings})
    return DockerProvider("local", conf, Path("."))


def spec(env: str, services: dict[str, str], params: dict[str, Any] | None = None, **extra: Any):
    return EnvironmentSpec.model_validate(
        {
            "environment": env,
            "provider": "local",
            "services": {
                s: {"version": v, "params": params or {"image": "app"}} for s, v in services.items()
            },
            **extra,
        }
    )


def env_file(env: str, services: dict[str, str], params: dict[str, Any] | None = None, **extra):
    doc: dict[str, Any] = {
        "environment": env,
        "provider": "local",
        "services": {
            s: {"version": v, "params": params or {"image": "app"}} for s, v in services.items()
        },
        **extra,
    }
    return yaml.safe_dump(doc, sort_keys=False)


async def run_job(store: Store, prov: DockerProvider, job: Job):
    executor = Executor(store, {"local": prov}, kill_grace=1.0)
    return await executor.run(job)


def live(dockerd: Dockerd, name: str) -> tuple[str, str, str] | None:
    """(container id, image, version label) of the running container `name`."""
    info = dockerd.container(name)
    if info is None or not info["State"]["Running"]:
        return None
    return info["Id"], info["Config"]["Image"], info["Config"]["Labels"]["reconciler.version"]


def candidates(dockerd: Dockerd, prefix: str) -> list[str]:
    return [n for n in dockerd.names(prefix) if ".next-" in n]


@pytest.fixture
def store(tmp_path: Path):
    s = Store.from_url(f"sqlite:///{tmp_path / 'r.db'}", migrate=True)
    yield s
    s.engine.dispose()


# ---- configuration and params (no engine needed) ------------------------------------


def test_settings_and_params_are_checked():
    with pytest.raises(ConfigError, match=r"providers.local.pull: expected missing"):
        provider("unix:///x", pull="sometimes")
    with pytest.raises(ConfigError, match=r"providers.local.colour: unknown key"):
        provider("unix:///x", colour="blue")
    p = provider("unix:///x")
    bad = spec("p1", {"api": "1.0"}, {"image": "app", "ports": ["127.0.0.1:x:80"]})
    problems = p.check_spec(bad)
    assert problems == [
        (("services", "api", "params", "ports"), "'127.0.0.1:x:80': host port must be a number")
    ]
    missing = spec("p1", {"api": "1.0"}, {"container": "x"})
    assert [msg for _, msg in p.check_spec(missing)] == ["required key missing"]
    side_by_side = DockerParams(image="app", ports=["8080", "127.0.0.1::80"])
    assert not side_by_side.holds_host_ports()
    assert DockerParams(image="app", ports=["127.0.0.1:8080:80"]).holds_host_ports()
    assert DockerParams(image="app", ports=["8080:80/udp"]).holds_host_ports()
    assert DockerParams(image="app", network="host").holds_host_ports()
    canary = spec("p1", {"api": "1.0"}, strategy={"type": "canary"})
    assert "supports blue_green, rolling, not canary" in p.check_spec(canary)[0][1]


# ---- through a real executor --------------------------------------------------------


def test_validation_refuses_an_unreachable_engine_and_a_missing_image(
    dockerd: Dockerd, store: Store
):
    before = dockerd.names("")
    bad = provider("unix:///nonexistent/docker.sock")
    rec = asyncio.run(
        run_job(store, bad, Job(spec("v1", {"api": "1.0"}), "api", "1.0", None, "git"))
    )
    assert rec.status == "failed"
    assert rec.error_message is not None and rec.error_message.startswith(
        "validation failed: engine: unix:///nonexistent/docker.sock:"
    )
    never = provider(dockerd.host, pull="never")
    rec = asyncio.run(
        run_job(store, never, Job(spec("v1", {"api": "9.9"}), "api", "9.9", None, "git"))
    )
    assert rec.status == "failed"
    assert rec.error_message == "validation failed: image: app:9.9: not present and pull = never"
    assert rec.validation is not None and rec.validation["checks"][1]["name"] == "engine"
    assert dockerd.names("") == before  # nothing changed on the engine


def test_cancellation_removes_the_new_container_and_the_old_keeps_serving(
    dockerd: Dockerd, store: Store
):
    prov = provider(dockerd.host)
    s = spec("c1", {"api": "1.0"})

    async def body():
        first = await run_job(store, prov, Job(s, "api", "1.0", None, "git"))
        old = live(dockerd, "c1-api")
        task = asyncio.create_task(run_job(store, prov, Job(s, "api", "2.0-slow", "1.0", "git")))
        while not candidates(dockerd, "c1-api"):  # the new container waits for its health
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return first, old

    first, old = asyncio.run(body())
    assert first.status == "completed"
    assert old is not None and old[1:] == ("app:1.0", "1.0")
    assert candidates(dockerd, "c1-api") == []
    assert live(dockerd, "c1-api") == old  # same container, never stopped
    assert store.history(environment="c1")[0].status == "cancelled"


def test_leftover_new_container_of_a_killed_run_is_removed(dockerd: Dockerd, store: Store):
    dockerd.cli(
        "create", "--name", "l1-api.next-99", "--label", "reconciler.container=l1-api", "app:1.0"
    )
    prov = provider(dockerd.host)
    rec = asyncio.run(
        run_job(store, prov, Job(spec("l1", {"api": "1.0"}), "api", "1.0", None, "git"))
    )
    assert rec.status == "completed"
    assert dockerd.names("l1-api") == ["l1-api"]


def test_blue_green_keeps_the_old_container_running_while_the_new_fails(
    dockerd: Dockerd, store: Store
):
    prov = provider(dockerd.host)
    s = spec("b1", {"api": "1.0"}, strategy={"type": "blue_green"})

    async def body():
        await run_job(store, prov, Job(s, "api", "1.0", None, "git"))
        started = dockerd.container("b1-api")["State"]["StartedAt"]  # type: ignore[index]
        rec = await run_job(store, prov, Job(s, "api", "2.0-unhealthy", "1.0", "git"))
        return started, rec

    started, rec = asyncio.run(body())
    assert rec.status == "failed"
    assert rec.error_message is not None
    assert rec.error_message.startswith("container b1-api.next-")
    assert "is unhealthy (healthcheck exit code 1)" in rec.error_message
    info = dockerd.container("b1-api")
    assert info is not None and info["State"]["Running"]
    assert info["State"]["StartedAt"] == started  # never stopped: no gap
    assert candidates(dockerd, "b1-api") == []


def test_rolling_with_fixed_host_ports_stops_the_old_first_and_restarts_it_on_failure(
    dockerd: Dockerd, store: Store
):
    port = free_port()
    params = {
        "image": "app",
        "network": NETWORK,
        "ports": [f"127.0.0.1:{port}:8080"],
        "command": ["httpd", "-f", "-p", "8080", "-h", "/"],
    }
    prov = provider(dockerd.host)
    s = spec("r1", {"web": "1.0"}, params)

    def serves() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/bin/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # httpd answered
        except OSError:
            return False

    async def body():
        a = await run_job(store, prov, Job(s, "web", "1.0", None, "git"))
        up_a = serves()
        b = await run_job(store, prov, Job(s, "web", "1.1", "1.0", "git"))
        up_b = serves()
        id_b = live(dockerd, "r1-web")
        c = await run_job(store, prov, Job(s, "web", "2.0-unhealthy", "1.1", "git"))
        return a, up_a, b, up_b, id_b, c

    a, up_a, b, up_b, id_b, c = asyncio.run(body())
    assert (a.status, b.status, c.status) == ("completed", "completed", "failed")
    assert up_a and up_b
    assert c.error_message is not None
    assert c.error_message.endswith("is unhealthy (healthcheck exit code 1)")
    assert live(dockerd, "r1-web") == id_b  # the stopped old container was started again
    assert serves()
    full = store.get_deployment(c.id, with_log=True)
    assert full is not None and full.log is not None
    text = "\n".join(line.line for line in full.log)
    assert "stopping old container r1-web to free its host ports" in text
    assert "restarted old container r1-web" in text


def test_no_healthcheck_means_running_for_ready_seconds(dockerd: Dockerd, store: Store):
    prov = provider(dockerd.host)
    s = spec("n1", {"api": "1.0"}, {"image": "plain", "ready_seconds": "0.2"})
    rec = asyncio.run(run_job(store, prov, Job(s, "api", "1.0", None, "git")))
    assert rec.status == "completed"
    assert live(dockerd, "n1-api") is not None
    full = store.get_deployment(rec.id, with_log=True)
    assert full is not None and full.log is not None
    assert any("has been running for 0.2s (no healthcheck)" in ln.line for ln in full.log)


def test_pull_reports_bytes_and_the_registry_password_never_shows(
    dockerd: Dockerd, registry: str, store: Store, tmp_path: Path
):
    secret = tmp_path / "registry-password"
    secret.write_text("s3cret-registry-pw\n")
    prov = provider(dockerd.host, username="deployer", password_file=str(secret), registry=registry)
    s = spec("pl1", {"api": "5.0"}, {"image": registry})
    rec = asyncio.run(run_job(store, prov, Job(s, "api", "5.0", None, "git")))
    assert rec.status == "completed", rec.error_message
    assert live(dockerd, "pl1-api") is not None
    full = store.get_deployment(rec.id, with_progress=True, with_log=True)
    assert full is not None and full.progress is not None and full.log is not None
    pulls = [e for e in full.progress if e.message == f"pulling {registry}:5.0" and e.details]
    assert pulls, "no byte-count progress from the pull"
    assert pulls[-1].details["bytes"] == pulls[-1].details["total_bytes"] > 1 << 20
    assert [e.percent for e in pulls] == sorted(e.percent for e in pulls)
    assert any("Pull complete" in ln.line for ln in full.log)
    # A failed pull carries the engine's text, and the password is nowhere.
    bad = spec("pl1", {"api": "6.6"}, {"image": registry})
    failed = asyncio.run(run_job(store, prov, Job(bad, "api", "6.6", "5.0", "git")))
    assert failed.status == "failed"
    assert failed.error_message is not None
    assert failed.error_message.startswith(f"pull {registry}:6.6: ")
    assert "not found" in failed.error_message
    raw = (tmp_path / "r.db").read_bytes()
    assert b"s3cret-registry-pw" not in raw
    for r in store.history(environment="pl1"):
        doc = store.get_deployment(r.id, with_progress=True, with_log=True)
        assert doc is not None and "s3cret-registry-pw" not in str(doc.to_json())


def test_current_version_reads_the_label_of_the_running_container(dockerd: Dockerd):
    prov = provider(dockerd.host)
    params = {"image": "app", "container": "cv-{service}"}
    assert asyncio.run(prov.current_version("cv", "api", params)) is None  # no container
    dockerd.cli("run", "-d", "--name", "cv-api", "--label", "reconciler.version=0.9", "app:1.0")
    assert asyncio.run(prov.current_version("cv", "api", params)) == "0.9"
    dockerd.cli("stop", "-t", "0", "cv-api")
    assert asyncio.run(prov.current_version("cv", "api", params)) is None  # not running


# ---- through the engine, from a real git repository ---------------------------------


def write_config(tmp: Path, host: str, **settings: Any) -> Path:
    config = tmp / "reconciler.toml"
    extra = "\n".join(
        f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
        for k, v in {**FAST, **settings}.items()
    )
    config.write_text(f"""
[repository]
url = "desired"
branch = "main"
poll_interval = "0"
watch = false

[daemon]
state_dir = "state"
timezone = "UTC"
retries = 1
retry_backoff = "1s"
kill_grace = "1s"

[server]
listen = ""

[providers.local]
type = "docker"
host = "{host}"
{extra}
""")
    return config


def run_engine(config_path: Path, body: Callable[[Engine], Awaitable[Any]]) -> Any:
    return support.run_engine(config_path, body)


async def settle(engine: Engine) -> None:
    await engine.sync("manual")
    await engine.idle()


def test_engine_deploys_replaces_and_rolls_back_on_a_real_engine(dockerd: Dockerd, tmp_path: Path):
    repo = Repo(tmp_path / "desired")
    config = write_config(tmp_path, dockerd.host)

    def commit(version: str) -> None:
        repo.write("e2e.yaml", env_file("e2e", {"api": version}, on_failure="rollback"))
        repo.commit(f"api {version}")

    async def body(engine: Engine):
        commit("1.0")
        await settle(engine)
        first = live(dockerd, "e2e-api")
        commit("1.1")
        await settle(engine)
        second = live(dockerd, "e2e-api")
        commit("2.0-exits")
        await settle(engine)
        third = live(dockerd, "e2e-api")
        return first, second, third, engine.store.history(environment="e2e")

    first, second, third, history = run_engine(config, body)
    assert first is not None and first[1:] == ("app:1.0", "1.0")
    assert second is not None and second[1:] == ("app:1.1", "1.1") and second[0] != first[0]
    assert third is not None and third[1:] == ("app:1.1", "1.1")
    assert [(d.version, d.status, d.trigger) for d in history] == [
        ("1.1", "completed", "rollback"),
        ("2.0-exits", "rolled_back", "git"),
        ("1.1", "completed", "git"),
        ("1.0", "completed", "git"),
    ]
    labels = dockerd.container("e2e-api")["Config"]["Labels"]  # type: ignore[index]
    assert labels == {
        "reconciler.environment": "e2e",
        "reconciler.service": "api",
        "reconciler.version": "1.1",
        "reconciler.deployment": str(history[0].id),
        "reconciler.container": "e2e-api",
    }
    assert dockerd.names("e2e-api") == ["e2e-api"]


def test_engine_deadline_mid_rollout_is_timed_out_and_the_old_keeps_serving(
    dockerd: Dockerd, tmp_path: Path
):
    repo = Repo(tmp_path / "desired")
    config = write_config(tmp_path, dockerd.host)

    async def body(engine: Engine):
        repo.write("t1.yaml", env_file("t1", {"api": "1.0"}, timeout="2s"))
        repo.commit()
        await settle(engine)
        before = live(dockerd, "t1-api")
        repo.write("t1.yaml", env_file("t1", {"api": "2.0-slow"}, timeout="2s"))
        repo.commit()
        await settle(engine)
        return before, engine.store.history(environment="t1")

    before, history = run_engine(config, body)
    assert history[0].status == "timed_out"
    assert live(dockerd, "t1-api") == before
    assert candidates(dockerd, "t1-api") == []


def test_engine_drift_out_of_band_container_then_self_heal(dockerd: Dockerd, tmp_path: Path):
    repo = Repo(tmp_path / "desired")
    config = write_config(tmp_path, dockerd.host)

    def replace_out_of_band(version: str) -> None:
        dockerd.cli("rm", "-f", "dr-api")
        dockerd.cli(
            "run", "-d", "--name", "dr-api", "--label", f"reconciler.version={version}", "app:1.0"
        )

    async def body(engine: Engine):
        repo.write("dr.yaml", env_file("dr", {"api": "1.0"}))
        repo.commit()
        await settle(engine)
        replace_out_of_band("0.9")
        await engine.drift.check()
        drifted = [(d.state, d.message) for d in await engine.decisions()]
        repo.write("dr.yaml", env_file("dr", {"api": "1.0"}, self_heal=True))
        repo.commit("self-heal on")
        await settle(engine)
        await engine.drift.check()  # wakes the environment: redeploy 1.0
        await engine.idle()
        after = [(d.state, d.message) for d in await engine.decisions()]
        return drifted, after, engine.store.history(environment="dr")

    drifted, after, history = run_engine(config, body)
    assert drifted == [("drifted", "live version is 0.9, deployed 1.0")]
    assert [(d.version, d.trigger, d.status) for d in history] == [
        ("1.0", "drift", "completed"),
        ("1.0", "git", "completed"),
    ]
    assert after == [("synced", "")]
    assert live(dockerd, "dr-api") is not None
    assert live(dockerd, "dr-api")[2] == "1.0"  # type: ignore[index]
    assert dockerd.names("dr-api") == ["dr-api"]


def test_engine_validation_refusal_and_stop_mid_rollout(dockerd: Dockerd, tmp_path: Path):
    repo = Repo(tmp_path / "desired")
    config = write_config(tmp_path, dockerd.host, pull="never")

    async def body(engine: Engine):
        repo.write("sv.yaml", env_file("sv", {"api": "1.0"}))
        repo.commit()
        await settle(engine)
        before = live(dockerd, "sv-api")
        repo.write("sv.yaml", env_file("sv", {"api": "7.7"}))  # not in the engine; never pull
        repo.commit()
        await settle(engine)
        refused = engine.store.history(environment="sv")[0]
        after_refusal = dockerd.names("sv-api")
        repo.write("sv.yaml", env_file("sv", {"api": "2.0-slow"}))
        repo.commit()
        await engine.sync("manual")
        while not candidates(dockerd, "sv-api"):  # the new container waits for its health
            await asyncio.sleep(0.02)
        cancelled = await engine.stop(0.1)  # the grace runs out: the run is cancelled
        return before, refused, after_refusal, cancelled, engine.store.history(environment="sv")

    before, refused, after_refusal, cancelled, history = run_engine(config, body)
    assert refused.status == "failed"
    assert (
        refused.error_message == "validation failed: image: app:7.7: not present and pull = never"
    )
    assert after_refusal == ["sv-api"] and before is not None
    assert cancelled == [history[0].id] and history[0].status == "cancelled"
    assert live(dockerd, "sv-api") == before  # untouched by both
    assert candidates(dockerd, "sv-api") == []


def test_blue_green_with_a_fixed_host_port_refuses_to_stop_the_old(dockerd: Dockerd, store: Store):
    params = {
        "image": "app",
        "network": NETWORK,
        "ports": [f"127.0.0.1:{free_port()}:8080"],
        "command": ["httpd", "-f", "-p", "8080", "-h", "/"],
    }
    prov = provider(dockerd.host)
    s = spec("bg2", {"web": "1.0"}, params, strategy={"type": "blue_green"})

    async def body():
        await run_job(store, prov, Job(s, "web", "1.0", None, "git"))
        before = live(dockerd, "bg2-web")
        rec = await run_job(store, prov, Job(s, "web", "1.1", "1.0", "git"))
        return before, rec

    before, rec = asyncio.run(body())
    assert rec.status == "failed"
    assert rec.error_message is not None and "port is already allocated" in rec.error_message
    assert live(dockerd, "bg2-web") == before
    assert candidates(dockerd, "bg2-web") == []
