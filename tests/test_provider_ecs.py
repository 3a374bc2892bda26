"""The `ecs` provider against moto (server mode, real boto3), through the real executor,
store and engine. ECS's deployment scheduler is played by `EcsScheduler` (tests/aws_support.py):
moto itself never moves a rollout."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from desired_state import EnvironmentSpec
from reconciler.config import ConfigError, ProviderConfig
from reconciler.engine import Engine
from reconciler.executor import Executor, Job
from reconciler.providers import DeployContext, DeployRequest
from reconciler.providers.ecs import EcsProvider
from reconciler.store import Store
from tests.aws_support import (
    REGION,
    AwsWorld,
    EcsScheduler,
    Moto,
    assert_no_credentials,
    settle,
    wait_progress,
)
from tests.support import RECONCILER, ROOT, cli_env

pytestmark = pytest.mark.timeout(60)

CLUSTER = "prod"


@pytest.fixture
def ecs(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A cluster with service `api` (2 tasks) on task definition api:1 = repo/api:1.0."""
    scheduler = EcsScheduler(monkeypatch)
    client = moto.client("ecs")
    client.create_cluster(clusterName=CLUSTER)
    client.register_task_definition(
        family="api",
        containerDefinitions=[
            {"name": "api", "image": "repo/api:1.0", "memory": 128},
            {"name": "proxy", "image": "envoy:1.30", "memory": 64},
        ],
        tags=[{"key": "team", "value": "core"}],
    )
    client.create_service(
        cluster=CLUSTER, serviceName="api", taskDefinition="api:1", desiredCount=2, launchType="EC2"
    )
    scheduler.settle(CLUSTER, "api")
    client.scheduler = scheduler
    return client


def provider_toml(url: str, **extra: Any) -> str:
    settings = {
        "type": "ecs",
        "region": REGION,
        "cluster": CLUSTER,
        "endpoint_url": url,
        "poll_interval": 0.05,
        "max_attempts": 2,
        **extra,
    }
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())


def env_body(version: str, *, timeout: int = 30, on_failure: str = "stop", **params: str) -> str:
    lines = ["services:", "  api:", f'    version: "{version}"', "    params:"]
    lines += [f"      {k}: {v}" for k, v in {"container": "api", **params}.items()]
    return "\n".join([*lines, f"timeout: {timeout}", f"on_failure: {on_failure}"]) + "\n"


def live(ecs: Any) -> tuple[str, str]:
    """(task definition revision, image of container api) the service runs."""
    arn = ecs.describe_services(cluster=CLUSTER, services=["api"])["services"][0]["taskDefinition"]
    td = ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]
    return arn.rsplit("/", 1)[-1], td["containerDefinitions"][0]["image"]


def revisions(ecs: Any) -> list[str]:
    arns = ecs.list_task_definitions(familyPrefix="api")["taskDefinitionArns"]
    return [a.rsplit("/", 1)[-1] for a in arns]


def records(engine: Engine) -> list[Any]:
    return [
        engine.store.get_deployment(d.id, with_progress=True, with_log=True)
        for d in engine.store.history()
    ]


def test_deploy_registers_a_revision_and_follows_our_deployment(tmp_path: Path, ecs, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("1.0"))

    async def body(engine: Engine):
        await settle(engine, "startup")  # already on 1.0: follows the completed deployment
        after_first = revisions(ecs)
        world.set_env("staging", env_body("2.0"))
        await settle(engine)
        drift = await engine.providers["aws"].current_version(
            "staging", "api", {"container": "api"}
        )
        return after_first, records(engine), drift

    after_first, (second, first), drift = world.run(body)
    assert after_first == ["api:1"] and first.status == "completed"
    assert second.status == "completed", second.error_message
    assert live(ecs) == ("api:2", "repo/api:2.0") and drift == "2.0"
    td = ecs.describe_task_definition(taskDefinition="api:2", include=["TAGS"])
    assert td["taskDefinition"]["containerDefinitions"][1]["image"] == "envoy:1.30"  # untouched
    assert td["tags"] == [{"key": "team", "value": "core"}]
    svc = ecs.describe_services(cluster=CLUSTER, services=["api"])["services"][0]
    breaker = svc["deploymentConfiguration"]["deploymentCircuitBreaker"]
    assert breaker == {"enable": True, "rollback": True}
    progress = [(p.percent, p.message) for p in second.progress if p.status == "in_progress"]
    assert (5, "task definition api:2") in progress
    assert (52, "1/2 tasks running") in progress
    assert progress[-1][0] == 100
    log = "\n".join(line.line for line in second.log)
    assert "registered task definition api:2 with repo/api:2.0" in log
    assert "(service api) has reached a steady state." in log  # the service's events
    checks = {c["name"]: c for c in second.validation["checks"]}
    assert checks["credentials"]["ok"] and checks["service"]["ok"] and checks["container"]["ok"]
    assert_no_credentials(*(json.dumps(r.to_json(), default=str) for r in (first, second)))


def test_circuit_breaker_failure_is_rolled_back_with_the_previous_revision(
    tmp_path: Path,
    ecs,
    moto,
):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("1.0", on_failure="rollback"))

    async def body(engine: Engine):
        await settle(engine, "startup")
        world.set_env("staging", env_body("2.0-fail", on_failure="rollback"))
        await settle(engine)
        return records(engine)

    rollback, failed, _ = world.run(body)
    assert failed.status == "rolled_back"
    assert "ECS deployment circuit breaker: tasks failed to start." in failed.error_message
    assert "rolled 'api' back to api:1" in failed.error_message
    assert "CannotPullContainerError" in "\n".join(line.line for line in failed.log)
    assert (rollback.trigger, rollback.version, rollback.status) == ("rollback", "1.0", "completed")
    assert live(ecs) == ("api:1", "repo/api:1.0")
    assert revisions(ecs) == ["api:1", "api:2"]  # the rollback registered nothing new


def test_deadline_mid_rollout_puts_the_service_back(tmp_path: Path, ecs, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0-hang", timeout=3))

    async def body(engine: Engine):
        await settle(engine, "startup")
        return records(engine)

    (rec,) = world.run(body)
    assert rec.status == "timed_out" and "deadline of 3s" in rec.error_message
    log = "\n".join(line.line for line in rec.log)
    # moto has no StopServiceDeployment: the fallback updates back to the previous revision.
    assert "updating back instead" in log and "updated back to api:1" in log
    assert live(ecs) == ("api:1", "repo/api:1.0")


def test_cancel_mid_rollout_puts_the_service_back(tmp_path: Path, ecs, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0-hang"))

    async def body(engine: Engine):
        await engine.sync("startup")
        await wait_progress(engine, "0/2 tasks running")
        cancelled = await engine.stop(0.1)
        return cancelled, records(engine)

    cancelled, (rec,) = world.run(body)
    assert rec.status == "cancelled" and cancelled == [rec.id]
    assert live(ecs) == ("api:1", "repo/api:1.0")


def test_validation_refusal_changes_nothing(tmp_path: Path, ecs, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0", service="nope"))

    async def body(engine: Engine):
        await settle(engine, "startup")
        return records(engine)

    (rec,) = world.run(body)
    assert rec.status == "failed"
    assert "service 'nope' not found in cluster 'prod' (MISSING)" in rec.error_message
    assert revisions(ecs) == ["api:1"] and live(ecs) == ("api:1", "repo/api:1.0")


def _spec(**extra: Any) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {
            "environment": "staging",
            "provider": "aws",
            "services": {"api": {"version": "1.0", "params": {"container": "api"}}},
            "timeout": 10,
            **extra,
        }
    )


def make(url: str, **settings: Any) -> EcsProvider:
    conf = ProviderConfig.model_validate(
        {
            "type": "ecs",
            "region": REGION,
            "cluster": CLUSTER,
            "endpoint_url": url,
            "poll_interval": 0.05,
            "max_attempts": 1,
            **settings,
        }
    )
    return EcsProvider("aws", conf, Path("."))


def test_unreachable_endpoint_is_a_validation_failure(tmp_path: Path, moto):
    async def main():
        store = Store.from_url(f"sqlite:///{tmp_path / 'r.db'}", migrate=True)
        executor = Executor(store, {"aws": make("http://127.0.0.1:9")})
        job = Job(spec=_spec(), service="api", version="1.0", previous_version=None, trigger="git")
        return await executor.run(job)

    rec = asyncio.run(main())
    assert rec.status == "failed"
    assert "credentials: Could not connect to the endpoint URL" in rec.error_message


def test_rollback_reuses_the_revision_that_ran_the_version(tmp_path: Path, ecs, moto):
    provider = make(moto.url)

    async def main():
        store = Store.from_url(f"sqlite:///{tmp_path / 'r.db'}", migrate=True)
        executor = Executor(store, {"aws": provider})
        spec = _spec()
        up = Job(spec=spec, service="api", version="2.0", previous_version="1.0", trigger="git")
        back = Job(
            spec=spec, service="api", version="1.0", previous_version="2.0", trigger="rollback"
        )
        return await executor.run(up), await executor.run(back), store

    up, back, store = asyncio.run(main())
    assert up.status == "completed" and back.status == "completed", back.error_message
    assert live(ecs) == ("api:1", "repo/api:1.0")
    assert revisions(ecs) == ["api:1", "api:2"]
    log = "\n".join(line.line for line in store.get_deployment(back.id, with_log=True).log)
    assert "rollback: reusing task definition api:1 (repo/api:1.0)" in log


def test_drift_reads_the_image_tag_after_an_out_of_band_change(ecs, moto):
    provider = make(moto.url)
    ecs.register_task_definition(
        family="api", containerDefinitions=[{"name": "api", "image": "repo/api:9.9", "memory": 1}]
    )
    ecs.update_service(cluster=CLUSTER, service="api", taskDefinition="api:2")
    got = asyncio.run(provider.current_version("staging", "api", {}))
    assert got == "9.9"


def test_stop_uses_stop_service_deployment_with_rollback_where_available(moto):
    provider = make("http://127.0.0.1:9")
    client = provider.ecs_once
    arn = "arn:aws:ecs:us-east-1:123456789012:service-deployment/prod/api/abc"
    with Stubber(client) as stub:
        stub.add_response(
            "list_service_deployments",
            {"serviceDeployments": [{"serviceDeploymentArn": arn, "status": "IN_PROGRESS"}]},
            {"cluster": CLUSTER, "service": "api", "status": ["PENDING", "IN_PROGRESS"]},
        )
        stub.add_response(
            "stop_service_deployment",
            {"serviceDeploymentArn": arn},
            {"serviceDeploymentArn": arn, "stopType": "ROLLBACK"},
        )
        lines: list[str] = []

        async def progress(*_: Any) -> None:
            return None

        request = DeployRequest("staging", "api", "2.0", "1.0", 1, None, 10, {}, {}, "git")
        ctx = DeployContext(request, 0.0, progress, lambda _s, line, _cut=0: lines.append(line))
        asyncio.run(provider._stop(ctx, "api", "ecs-svc/1", "arn:td/api:1"))
        stub.assert_no_pending_responses()
    assert lines == [f"stopped deployment ecs-svc/1 with rollback ({arn})"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clustr": "x"}, "providers.aws.clustr: unknown key for a ecs provider"),
        ({"poll_interval": "soon"}, "providers.aws.poll_interval: bad duration 'soon'"),
        ({"endpoint_url": "localhost:4566"}, "providers.aws.endpoint_url:"),
        ({"profile": "no-such-profile"}, "providers.aws.profile: The config profile"),
    ],
)
def test_setting_mistakes_are_one_line_config_errors(moto, settings, message):
    with pytest.raises(ConfigError) as err:
        make("http://127.0.0.1:9", **settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_missing_region_is_a_config_error(moto, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    conf = ProviderConfig.model_validate({"type": "ecs"})
    with pytest.raises(ConfigError, match=r"^providers\.aws\.region: no region: set it here"):
        EcsProvider("aws", conf, Path("."))


def test_strategy_other_than_rolling_is_refused(moto):
    provider = make("http://127.0.0.1:9")
    problems = provider.check_spec(_spec(strategy={"type": "canary", "steps": [10]}))
    assert problems == [(("strategy", "type"), "provider 'aws' (ecs) supports rolling, not canary")]
    problems = provider.check_spec(_spec(strategy={"type": "rolling", "max_surge": 1}))
    assert problems == [(("strategy", "max_surge", "[key]"), "unknown key 'max_surge' for rolling")]


def test_cli_sync_deploys_and_validate_reports_strategy_errors(tmp_path: Path, ecs, moto):
    """`reconciler sync` and `show` as real subprocesses (credentials from the environment),
    and `reconciler validate` of a folder with a strategy ecs refuses, with file:line:col."""
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0"))
    env = {**cli_env(), "PYTHONPATH": str(ROOT)}
    cli = [*RECONCILER, "--config", str(world.config)]
    synced = subprocess.run(
        [*cli, "sync", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert synced.returncode == 0, synced.stderr
    (dep,) = json.loads(synced.stdout)["deployments"]
    assert (dep["version"], dep["status"], dep["provider_type"]) == ("2.0", "completed", "ecs")
    assert live(ecs) == ("api:2", "repo/api:2.0")
    shown = subprocess.run(
        [*cli, "show", str(dep["id"]), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "has reached a steady state" in shown.stdout
    assert_no_credentials(synced.stdout, synced.stderr, shown.stdout, shown.stderr)

    folder = tmp_path / "check"
    folder.mkdir()
    (folder / "prod.yaml").write_text(
        "environment: prod\nprovider: aws\nservices:\n  api:\n    version: '1'\n"
        "strategy:\n  type: rolling\n  max_surge: 2\n"
    )
    checked = subprocess.run(
        [*cli, "validate", str(folder)], capture_output=True, text=True, env=env, timeout=60
    )
    assert checked.returncode == 1
    assert (
        "prod.yaml:8:3: strategy.max_surge: unknown key 'max_surge' for rolling" in checked.stderr
    )
