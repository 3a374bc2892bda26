"""The `lambda` provider against moto (server mode, real boto3), through the real executor,
store and engine; the states moto skips (Pending, InProgress) and the 409 "update in
progress" conflict with botocore's Stubber on the provider's own client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from moto.cloudwatch import models as moto_cloudwatch
from pydantic import ValidationError

from desired_state import EnvironmentSpec
from reconciler.config import ProviderConfig
from reconciler.engine import Engine
from reconciler.executor import Executor, Job
from reconciler.providers import DeployContext, DeploymentFailed, DeployRequest
from reconciler.providers.aws_lambda import LambdaProvider
from reconciler.store import Store
from tests.aws_support import (
    ACCOUNT,
    REGION,
    AwsWorld,
    Moto,
    assert_no_credentials,
    settle,
    wait_progress,
)

pytestmark = pytest.mark.timeout(60)

REPO = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/api"


@pytest.fixture
def lam(moto: Moto) -> Any:
    """Image function `api` with version 1 described "1.0", alias `staging` on it, and a
    CloudWatch alarm `api-errors` in OK."""
    role = moto.client("iam").create_role(RoleName="api", AssumeRolePolicyDocument="{}")
    client = moto.client("lambda")
    client.create_function(
        FunctionName="api",
        Role=role["Role"]["Arn"],
        PackageType="Image",
        Code={"ImageUri": f"{REPO}:1.0"},
    )
    v1 = client.publish_version(FunctionName="api", Description="1.0")["Version"]
    client.create_alias(FunctionName="api", Name="staging", FunctionVersion=v1)
    cw = moto.client("cloudwatch")
    cw.put_metric_alarm(
        AlarmName="api-errors",
        MetricName="Errors",
        Namespace="AWS/Lambda",
        Statistic="Sum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=1,
        ComparisonOperator="GreaterThanThreshold",
    )
    cw.set_alarm_state(AlarmName="api-errors", StateValue="OK", StateReason="fine")
    return client


def provider_toml(url: str) -> str:
    settings = {
        "type": "lambda",
        "region": REGION,
        "endpoint_url": url,
        "poll_interval": 0.05,
        "max_attempts": 2,
    }
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())


def env_body(
    version: str, *, timeout: int = 30, on_failure: str = "stop", strategy: str = "", **params: str
) -> str:
    lines = ["services:", "  api:", f'    version: "{version}"', "    params:"]
    lines += [f"      {k}: {v}" for k, v in {"image": REPO, **params}.items()]
    lines += [f"timeout: {timeout}", f"on_failure: {on_failure}"]
    if strategy:
        lines.append(f"strategy: {strategy}")
    return "\n".join(lines) + "\n"


def alias(lam: Any) -> tuple[str, dict[str, float]]:
    """(description of the version the alias points at, its weights)."""
    got = lam.get_alias(FunctionName="api", Name="staging")
    fn = lam.get_function(FunctionName="api", Qualifier=got["FunctionVersion"])
    weights = got.get("RoutingConfig", {}).get("AdditionalVersionWeights", {})
    return fn["Configuration"]["Description"], weights


def latest_image(lam: Any) -> str:
    return lam.get_function(FunctionName="api")["Code"]["ImageUri"]


def records(engine: Engine) -> list[Any]:
    return [
        engine.store.get_deployment(d.id, with_progress=True, with_log=True)
        for d in engine.store.history()
    ]


def log_of(rec: Any) -> str:
    return "\n".join(line.line for line in rec.log)


def set_alarm(state: str) -> None:
    """Out of band, in moto's CloudWatch backend (this process runs the server)."""
    backend = moto_cloudwatch.cloudwatch_backends[ACCOUNT][REGION]
    backend.set_alarm_state("api-errors", f"went {state}", None, state)


def test_rolling_publishes_a_version_and_moves_the_alias(tmp_path: Path, lam, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0"))

    async def body(engine: Engine):
        await settle(engine, "startup")
        drift = await engine.providers["aws"].current_version("staging", "api", {"image": REPO})
        return records(engine), drift

    (rec,), drift = world.run(body)
    assert rec.status == "completed", rec.error_message
    assert alias(lam) == ("2.0", {}) and drift == "2.0"
    assert latest_image(lam) == f"{REPO}:2.0"
    progress = [(p.percent, p.message) for p in rec.progress if p.status == "in_progress"]
    assert [m for _, m in progress][1:5] == [
        "code uploaded",
        "function updated",
        "version 2 published",
        "alias staging -> version 2",
    ]
    log = log_of(rec)
    assert f"UpdateFunctionCode api: ImageUri={REPO}:2.0" in log
    assert "PublishVersion api: version 2 described 2.0" in log
    checks = {c["name"]: c["ok"] for c in rec.validation["checks"]}
    assert checks == {"strategy": True, "credentials": True, "function": True, "alias": True}
    assert_no_credentials(json.dumps(rec.to_json(), default=str))


def test_canary_shifts_weights_through_the_steps(tmp_path: Path, lam, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env(
        "staging",
        env_body(
            "2.0", strategy='{type: canary, steps: [10, 50], interval: "0", alarms: [api-errors]}'
        ),
    )

    async def body(engine: Engine):
        await settle(engine, "startup")
        return records(engine)

    (rec,) = world.run(body)
    assert rec.status == "completed", rec.error_message
    assert alias(lam) == ("2.0", {})
    steps = [(p.percent, p.message) for p in rec.progress if "canary" in p.message]
    assert steps == [
        (64, "canary: 10% of staging on version 2"),
        (80, "canary: 50% of staging on version 2"),
    ]
    log = log_of(rec)
    assert "UpdateAlias api:staging -> version 1 + 2: 10%" in log
    assert "UpdateAlias api:staging -> version 2" in log.splitlines()[-1]
    assert {c["name"]: c["ok"] for c in rec.validation["checks"]}["alarms"]


def test_alarm_stops_the_canary_and_the_previous_version_is_rolled_back(
    tmp_path: Path,
    lam,
    moto,
):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    canary = '{type: canary, steps: [10, 50, 100], interval: "0", alarms: [api-errors]}'
    world.set_env("staging", env_body("1.0", on_failure="rollback", strategy=canary))

    async def body(engine: Engine):
        await settle(engine, "startup")
        world.set_env("staging", env_body("2.0", on_failure="rollback", strategy=canary))

        def on_event(ev: Any) -> None:
            if ev.message.startswith("canary: 10%"):  # the alarm goes off during the first step
                set_alarm("ALARM")

        engine.executor.listener = on_event
        await settle(engine)
        return records(engine)

    rollback, failed, first = world.run(body)
    assert first.status == "completed"
    assert failed.status == "rolled_back"
    assert failed.error_message.startswith(
        "alarm api-errors is in ALARM: went ALARM; alias staging"
    )
    assert "UpdateAlias api:staging -> version 1 + 2: 10%" in log_of(failed)
    assert "canary: 50%" not in [p.message for p in failed.progress]
    assert (rollback.trigger, rollback.version, rollback.status) == ("rollback", "1.0", "completed")
    # The alarm put the alias back already: the rollback finds version 1 live.
    assert rollback.progress[-2].message == "alias staging already on version 1 (1.0)"
    assert alias(lam) == ("1.0", {})


def test_rollback_points_the_alias_at_the_published_version_without_rebuilding(
    tmp_path: Path,
    lam,
    moto,
):
    provider = make(moto.url)
    spec = _spec()

    async def main():
        store = Store.from_url(f"sqlite:///{tmp_path / 'r.db'}", migrate=True)
        executor = Executor(store, {"aws": provider})
        params = {"image": REPO}
        spec2 = spec.model_copy(
            update={"services": {"api": spec.services["api"].model_copy(update={"params": params})}}
        )
        up = Job(spec=spec2, service="api", version="2.0", previous_version="1.0", trigger="git")
        back = Job(
            spec=spec2, service="api", version="1.0", previous_version="2.0", trigger="rollback"
        )
        done = await executor.run(up), await executor.run(back)
        return done, store.get_deployment(done[1].id, with_log=True)

    (up, back), logged = asyncio.run(main())
    assert up.status == "completed" and back.status == "completed", back.error_message
    assert alias(lam) == ("1.0", {})
    assert log_of(logged).startswith("rollback: version 1 of api is described 1.0")
    versions = lam.list_versions_by_function(FunctionName="api")["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST", "1", "2"]  # nothing rebuilt


def test_deadline_during_a_canary_restores_the_alias(tmp_path: Path, lam, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env(
        "staging", env_body("2.0", timeout=5, strategy="{type: canary, steps: [10], interval: 1m}")
    )

    async def body(engine: Engine):
        await settle(engine, "startup")
        return records(engine)

    (rec,) = world.run(body)
    assert rec.status == "timed_out"
    assert "UpdateAlias api:staging -> version 1 + 2: 10%" in log_of(rec)
    assert alias(lam) == ("1.0", {})


def test_cancel_during_a_canary_restores_the_alias(tmp_path: Path, lam, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0", strategy="{type: canary, steps: [10], interval: 1m}"))

    async def body(engine: Engine):
        await engine.sync("startup")
        await wait_progress(engine, "canary: 10%")
        assert alias(lam)[1] == {"2": 0.1}
        cancelled = await engine.stop(0.1)
        return cancelled, records(engine)

    cancelled, (rec,) = world.run(body)
    assert rec.status == "cancelled" and cancelled == [rec.id]
    assert alias(lam) == ("1.0", {})


def test_validation_refusal_changes_nothing(tmp_path: Path, lam, moto):
    world = AwsWorld(tmp_path, provider_toml(moto.url))
    world.set_env("staging", env_body("2.0", alias="nope"))

    async def body(engine: Engine):
        await settle(engine, "startup")
        return records(engine)

    (rec,) = world.run(body)
    assert rec.status == "failed"
    assert "alias: GetAlias: ResourceNotFoundException: Cannot find alias" in rec.error_message
    assert latest_image(lam) == f"{REPO}:1.0"  # no UpdateFunctionCode
    assert [
        v["Version"] for v in lam.list_versions_by_function(FunctionName="api")["Versions"]
    ] == [
        "$LATEST",
        "1",
    ]


def make(url: str, **settings: Any) -> LambdaProvider:
    conf = ProviderConfig.model_validate(
        {
            "type": "lambda",
            "region": REGION,
            "endpoint_url": url,
            "poll_interval": 0.01,
            "max_attempts": 1,
            **settings,
        }
    )
    return LambdaProvider("aws", conf, Path("."))


def test_drift_reads_the_description_of_the_aliased_version(lam, moto):
    lam.update_function_code(FunctionName="api", ImageUri=f"{REPO}:hotfix")
    v = lam.publish_version(FunctionName="api", Description="1.0-hotfix")["Version"]
    lam.update_alias(FunctionName="api", Name="staging", FunctionVersion=v)
    provider = make(moto.url)
    assert asyncio.run(provider.current_version("staging", "api", {"image": REPO})) == "1.0-hotfix"


def _spec(**extra: Any) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {
            "environment": "staging",
            "provider": "aws",
            "services": {
                "api": {
                    "version": "2.0",
                    "params": {"s3_bucket": "builds", "s3_key": "api-{version}.zip"},
                }
            },
            **extra,
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.progress: list[tuple[int | None, str]] = []

    def ctx(self, timeout: float, **request: Any) -> DeployContext:
        fields: dict[str, Any] = {
            "environment": "staging",
            "service": "api",
            "version": "2.0",
            "previous_version": "1.0",
            "deployment_id": 1,
            "commit": None,
            "timeout_seconds": int(timeout),
            "strategy": {"type": "rolling"},
            "params": {"s3_bucket": "builds", "s3_key": "api-{version}.zip"},
            "trigger": "git",
            **request,
        }

        async def progress(percent: int | None, message: str, _details: Any) -> None:
            self.progress.append((percent, message))

        return DeployContext(
            DeployRequest(**fields),
            time.monotonic() + timeout,
            progress,
            lambda _stream, line, _cut=0: self.lines.append(line),
        )


CONFLICT = (
    "ResourceConflictException",
    "The operation cannot be performed at this time. An update is in progress for resource: "
    "arn:aws:lambda:us-east-1:123456789012:function:api",
)


def test_pending_states_are_waited_for_and_conflicts_retried():
    """Lambda's real sequence, which moto skips: an update InProgress, a version Pending, and
    409 conflicts on both UpdateFunctionCode and PublishVersion."""
    provider = make("http://127.0.0.1:9")
    client = provider.lam
    fn = {"FunctionName": "api"}
    rec = Recorder()
    with Stubber(client) as stub:
        stub.add_response(
            "get_alias", {"FunctionVersion": "1", "Name": "staging"}, {**fn, "Name": "staging"}
        )
        stub.add_response(
            "get_function_configuration", {"Description": "1.0"}, {**fn, "Qualifier": "1"}
        )
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "InProgress"}, fn)
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "Successful"}, fn)
        stub.add_client_error("update_function_code", *CONFLICT, http_status_code=409)
        code = {**fn, "S3Bucket": "builds", "S3Key": "api-2.0.zip"}
        stub.add_response("update_function_code", {"CodeSha256": "abc"}, code)
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "InProgress"}, fn)
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "Successful"}, fn)
        publish = {**fn, "Description": "2.0", "CodeSha256": "abc"}
        stub.add_client_error("publish_version", *CONFLICT, http_status_code=409)
        stub.add_response("publish_version", {"Version": "2", "State": "Pending"}, publish)
        version = {**fn, "Qualifier": "2"}
        stub.add_response("get_function_configuration", {"State": "Pending"}, version)
        stub.add_response("get_function_configuration", {"State": "Active"}, version)
        routing = {"AdditionalVersionWeights": {}}
        alias_move = {**fn, "Name": "staging", "FunctionVersion": "2", "RoutingConfig": routing}
        stub.add_response("update_alias", {"FunctionVersion": "2"}, alias_move)
        asyncio.run(provider.deploy(rec.ctx(10)))
        stub.assert_no_pending_responses()
    assert (
        sum("ResourceConflictException" in line and "retrying" in line for line in rec.lines) == 2
    )
    assert "update of api: LastUpdateStatus InProgress" in rec.lines
    assert "version 2 of api: State Pending" in rec.lines
    assert rec.progress[-1] == (100, "alias staging -> version 2")


def test_a_conflict_that_outlasts_the_deadline_fails_with_lambdas_text():
    provider = make("http://127.0.0.1:9", poll_interval=0.2)
    client = provider.lam
    fn = {"FunctionName": "api"}
    rec = Recorder()
    with Stubber(client) as stub:
        stub.add_response("get_alias", {"FunctionVersion": "1"}, {**fn, "Name": "staging"})
        stub.add_response(
            "get_function_configuration", {"Description": "1.0"}, {**fn, "Qualifier": "1"}
        )
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "Successful"}, fn)
        for _ in range(5):
            stub.add_client_error("update_function_code", *CONFLICT, http_status_code=409)
        with pytest.raises(DeploymentFailed) as err:
            asyncio.run(provider.deploy(rec.ctx(0.5)))
    assert str(err.value).startswith(
        "UpdateFunctionCode: ResourceConflictException: The operation cannot be performed"
    )


def test_failed_update_fails_with_lambdas_reason():
    provider = make("http://127.0.0.1:9")
    fn = {"FunctionName": "api"}
    rec = Recorder()
    with Stubber(provider.lam) as stub:
        stub.add_response("get_alias", {"FunctionVersion": "1"}, {**fn, "Name": "staging"})
        stub.add_response(
            "get_function_configuration", {"Description": "1.0"}, {**fn, "Qualifier": "1"}
        )
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "Successful"}, fn)
        stub.add_response(
            "update_function_code",
            {"CodeSha256": "abc"},
            {**fn, "S3Bucket": "builds", "S3Key": "api-2.0.zip"},
        )
        stub.add_response(
            "get_function_configuration",
            {
                "LastUpdateStatus": "Failed",
                "LastUpdateStatusReasonCode": "InvalidImage",
                "LastUpdateStatusReason": "image manifest not found",
            },
            fn,
        )
        with pytest.raises(DeploymentFailed) as err:
            asyncio.run(provider.deploy(rec.ctx(10)))
    assert str(err.value) == "update of api failed: InvalidImage image manifest not found"


@pytest.mark.parametrize(
    ("strategy", "problem"),
    [
        (
            {"type": "canary", "steps": ["50", "10"]},
            (("strategy",), "steps must increase, e.g. [10, 50, 100]"),
        ),
        (
            {"type": "canary", "steps": ["0"]},
            (("strategy", "steps", 0), "Input should be greater than or equal to 1"),
        ),
        (
            {"type": "canary", "alarm": ["x"]},
            (("strategy", "alarm", "[key]"), "unknown key 'alarm' for canary"),
        ),
        (
            {"type": "blue_green"},
            (
                ("strategy", "type"),
                "provider 'aws' (lambda) supports canary, rolling, not blue_green",
            ),
        ),
    ],
)
def test_strategy_mistakes_are_refused(strategy, problem):
    provider = make("http://127.0.0.1:9")
    assert provider.check_spec(_spec(strategy=strategy)) == [problem]


def test_a_bad_interval_is_refused_by_the_format_itself():
    with pytest.raises(ValidationError, match="bad duration 'soon'"):
        _spec(strategy={"type": "canary", "interval": "soon"})


def test_params_need_one_code_source():
    provider = make("http://127.0.0.1:9")
    spec = EnvironmentSpec.model_validate(
        {
            "environment": "s",
            "provider": "aws",
            "services": {"api": {"version": "1", "params": {"function": "f"}}},
        }
    )
    assert provider.check_spec(spec) == [
        (("services", "api", "params"), "needs image, or s3_bucket and s3_key")
    ]


def test_credentials_are_redacted_from_what_is_recorded(tmp_path: Path, moto):
    """An AWS error that echoes the access key (as SignatureDoesNotMatch does) is recorded
    without it."""
    from tests.aws_support import ACCESS_KEY

    provider = make("http://127.0.0.1:9")
    assert ACCESS_KEY in provider.secrets()

    async def main():
        store = Store.from_url(f"sqlite:///{tmp_path / 'r.db'}", migrate=True)
        with Stubber(provider.lam) as stub, Stubber(provider.sts) as sts:
            sts.add_response("get_caller_identity", {"Arn": "arn:aws:iam::1:user/x"}, {})
            stub.add_client_error(
                "get_function_configuration",
                "SignatureDoesNotMatch",
                f"Credential={ACCESS_KEY}/20261129/us-east-1/lambda/aws4_request",
                http_status_code=403,
            )
            job = Job(
                spec=_spec(), service="api", version="2.0", previous_version=None, trigger="git"
            )
            rec = await Executor(store, {"aws": provider}).run(job)
        return store.get_deployment(rec.id, with_progress=True, with_log=True)

    rec = asyncio.run(main())
    assert rec.status == "failed" and "Credential=***/20261129" in rec.error_message
    assert_no_credentials(json.dumps(rec.to_json(), default=str))


def test_an_error_mid_canary_puts_the_alias_back():
    provider = make("http://127.0.0.1:9")
    fn = {"FunctionName": "api"}
    rec = Recorder()
    canary = {"type": "canary", "steps": [10, 50], "interval": "0"}

    def move(version: str, weights: dict[str, float]) -> dict[str, Any]:
        routing = {"AdditionalVersionWeights": weights}
        return {**fn, "Name": "staging", "FunctionVersion": version, "RoutingConfig": routing}

    with Stubber(provider.lam) as stub:
        stub.add_response("get_alias", {"FunctionVersion": "1"}, {**fn, "Name": "staging"})
        stub.add_response(
            "get_function_configuration", {"Description": "1.0"}, {**fn, "Qualifier": "1"}
        )
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "Successful"}, fn)
        code = {**fn, "S3Bucket": "builds", "S3Key": "api-2.0.zip"}
        stub.add_response("update_function_code", {"CodeSha256": "abc"}, code)
        stub.add_response("get_function_configuration", {"LastUpdateStatus": "Successful"}, fn)
        publish = {**fn, "Description": "2.0", "CodeSha256": "abc"}
        stub.add_response("publish_version", {"Version": "2"}, publish)
        stub.add_response(
            "get_function_configuration", {"State": "Active"}, {**fn, "Qualifier": "2"}
        )
        stub.add_response("update_alias", {}, move("1", {"2": 0.1}))
        stub.add_client_error("update_alias", "ServiceException", "internal", http_status_code=500)
        stub.add_response("update_alias", {}, move("1", {}))
        with pytest.raises(DeploymentFailed) as err:
            asyncio.run(provider.deploy(rec.ctx(10, strategy=canary)))
        stub.assert_no_pending_responses()
    assert str(err.value) == "UpdateAlias: ServiceException: internal"
    assert rec.lines[-1] == "UpdateAlias api:staging -> version 1"
