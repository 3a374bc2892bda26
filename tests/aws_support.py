"""AWS test backend: moto in server mode on 127.0.0.1, driven through real boto3.

moto answers the ECS, Lambda, CloudWatch, IAM and STS APIs, but it never moves an ECS
rollout on its own (`rolloutState` stays IN_PROGRESS, and `UpdateService` adds no new
deployment). `EcsScheduler` stands in for ECS's deployment scheduler: it runs inside this
test process, next to the `ThreadedMotoServer`, and changes moto's backend objects directly
(`moto.ecs.models.ecs_backends[account][region].services[...]`) the way ECS would:
UpdateService starts a new PRIMARY deployment, and each DescribeServices call moves every
IN_PROGRESS deployment one step. The image tag decides how a rollout goes:
`*-fail` fails (the circuit breaker then rolls the service back), `*-hang` never finishes,
anything else completes after one step per desired task.

moto also applies a Lambda function's code update at once (`LastUpdateStatus` is always
Successful). `LambdaUpdates` stands in for Lambda's asynchronous update the same way: the
image tag of the function's $LATEST code decides what `GetFunctionConfiguration` says,
`*-fail` Failed (with Lambda's reason code and text), `*-hang` InProgress for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.engine import Engine
from tests.support import Repo, run_engine

ACCOUNT = "123456789012"
REGION = "us-east-1"
# Fake credentials: the provider reads them from the standard chain (the environment); the
# tests check that they never reach a stored log, record or API answer.
ACCESS_KEY = "AKIAFAKEKEY7EXAMPLE1"
SECRET_KEY = "fAkE/sEcReT+KeY/for/the/tests/only123456"


class Moto:
    """A running moto server and boto3 clients on it (the test's own, out-of-band hands)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self, service: str) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(retries={"max_attempts": 1}),
        )


@pytest.fixture(scope="module")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer  # imported here: conftest loads this module

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto(_moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask the instance metadata
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    try:
        yield Moto(_moto_server)
    finally:
        httpx.post(f"{_moto_server}/moto-api/reset")


# -- ECS -----------------------------------------------------------------------------------


def _moto_ecs() -> Any:
    from moto.ecs import models

    return models


class EcsScheduler:
    """ECS's deployment scheduler, which moto lacks (see the module docstring)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids = count(1000)
        cls = _moto_ecs().EC2ContainerServiceBackend
        original_update = cls.update_service
        original_describe = cls.describe_services
        scheduler = self

        def update_service(backend: Any, props: dict[str, Any]) -> Any:
            task_definition = props.get("task_definition")
            service = original_update(backend, props)
            if task_definition:
                scheduler.start(backend, service, backend.describe_task_definition(task_definition))
            return service

        def describe_services(backend: Any, cluster: str, names: list[str]) -> Any:
            services, failures = original_describe(backend, cluster, names)
            for service in services:
                scheduler.tick(backend, service)
            return services, failures

        monkeypatch.setattr(cls, "update_service", update_service)
        monkeypatch.setattr(cls, "describe_services", describe_services)

    def backend(self) -> Any:
        return _moto_ecs().ecs_backends[ACCOUNT][REGION]

    def service(self, cluster: str, name: str) -> Any:
        return self.backend().services[f"{cluster}:{name}"]

    def settle(self, cluster: str, name: str) -> None:
        """The service's current deployment finished (a freshly created service)."""
        for d in self.service(cluster, name).deployments:
            d.update(rolloutState="COMPLETED", runningCount=d["desiredCount"], pendingCount=0)

    def _event(self, service: Any, message: str) -> None:
        service.events.insert(
            0,
            {
                "id": f"ev-{next(self.ids)}",
                "createdAt": datetime.now(UTC),
                "message": f"(service {service.name}) {message}",
            },
        )

    def start(self, backend: Any, service: Any, task_definition: Any, reason: str = "") -> None:
        for d in service.deployments:
            if d["status"] == "PRIMARY":
                d["status"] = "ACTIVE"
        deployment_id = f"ecs-svc/{next(self.ids)}"
        service.task_definition = task_definition.arn
        service.deployments.insert(
            0,
            {
                "id": deployment_id,
                "status": "PRIMARY",
                "taskDefinition": task_definition.arn,
                "desiredCount": service.desired_count,
                "pendingCount": 0,
                "runningCount": 0,
                "failedTasks": 0,
                "createdAt": datetime.now(UTC),
                "updatedAt": datetime.now(UTC),
                "rolloutState": "IN_PROGRESS",
                "rolloutStateReason": reason or f"ECS deployment {deployment_id} in progress.",
            },
        )
        self._event(service, f"has started 0 tasks: deployment {deployment_id}.")

    def tick(self, backend: Any, service: Any) -> None:
        for d in list(service.deployments):
            if d["rolloutState"] != "IN_PROGRESS":
                continue
            image = backend.describe_task_definition(d["taskDefinition"]).container_definitions[0][
                "image"
            ]
            if image.endswith("-hang"):
                continue
            if image.endswith("-fail"):
                if d["failedTasks"] == 0:
                    d["failedTasks"] = 1
                    self._event(service, "task stopped: CannotPullContainerError: not found")
                    continue
                d.update(
                    rolloutState="FAILED",
                    rolloutStateReason="ECS deployment circuit breaker: tasks failed to start.",
                    status="ACTIVE",
                )
                previous = next(
                    (
                        x
                        for x in service.deployments
                        if x is not d and x["rolloutState"] == "COMPLETED"
                    ),
                    None,
                )
                if previous is not None:  # rollback: true
                    self._event(service, f"deployment {d['id']} failed: rolling back")
                    self.start(
                        backend,
                        service,
                        backend.describe_task_definition(previous["taskDefinition"]),
                    )
                continue
            d["runningCount"] += 1
            if d["runningCount"] >= d["desiredCount"]:
                d.update(
                    rolloutState="COMPLETED",
                    rolloutStateReason=f"ECS deployment {d['id']} completed.",
                )
                service.deployments[:] = [
                    x for x in service.deployments if x is d or x["status"] == "PRIMARY"
                ]
                self._event(service, "has reached a steady state.")
            else:
                self._event(
                    service, f"has started 1 tasks: {d['runningCount']}/{d['desiredCount']}."
                )


# -- Lambda --------------------------------------------------------------------------------


class LambdaUpdates:
    """Lambda's asynchronous code update, which moto applies at once (module docstring)."""

    REASON_CODE = "InvalidImage"
    REASON = "image manifest not found: the image tag does not exist in the repository"

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.awslambda.models import LambdaFunction

        self.code_updates = 0  # UpdateFunctionCode calls: deployments started
        original = LambdaFunction.get_configuration
        original_update = LambdaFunction.update_function_code
        updates = self
        reason = {
            "LastUpdateStatusReasonCode": self.REASON_CODE,
            "LastUpdateStatusReason": self.REASON,
        }

        def get_configuration(fn: Any, on_create: bool = False) -> dict[str, Any]:
            config: dict[str, Any] = original(fn, on_create)
            image = str(fn.code.get("ImageUri", "")) if fn.version == "$LATEST" else ""
            if "LastUpdateStatus" in config and image.endswith("-fail"):
                config.update(LastUpdateStatus="Failed", **reason)
            elif "LastUpdateStatus" in config and image.endswith("-hang"):
                config["LastUpdateStatus"] = "InProgress"
            return config

        def update_function_code(fn: Any, spec: dict[str, Any]) -> dict[str, Any]:
            updates.code_updates += 1
            result: dict[str, Any] = original_update(fn, spec)
            return result

        monkeypatch.setattr(LambdaFunction, "get_configuration", get_configuration)
        monkeypatch.setattr(LambdaFunction, "update_function_code", update_function_code)


# -- the engine ----------------------------------------------------------------------------


class AwsWorld:
    """A desired-state repository and a daemon configuration whose provider is on moto."""

    def __init__(self, tmp: Path, provider_toml: str) -> None:
        self.tmp = tmp
        self.repo = Repo(tmp / "desired")
        self.config = tmp / "reconciler.toml"
        self.config.write_text(f"""
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
shutdown_grace = "10s"
kill_grace = "1s"

[server]
listen = ""

[providers.aws]
{provider_toml}
""")

    def set_env(self, name: str, body: str) -> str:
        self.repo.write(f"{name}.yaml", f"environment: {name}\nprovider: aws\n{body}")
        return self.repo.commit(f"{name}")

    def run(self, body: Callable[[Engine], Awaitable[Any]]) -> Any:
        return run_engine(self.config, body)


async def settle(engine: Engine, trigger: str = "watch") -> Any:
    outcome = await engine.sync(trigger)
    await engine.idle()
    return outcome


async def wait_progress(engine: Engine, text: str) -> None:
    """Wait until a deployment reports progress whose message contains `text`."""
    seen = asyncio.Event()
    engine.executor.listener = lambda ev: seen.set() if text in ev.message else None
    await seen.wait()


def assert_no_credentials(*texts: str) -> None:
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text
