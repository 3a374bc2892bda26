"""The `ecs` provider: a new task-definition revision with the version's image, rolled out by
ECS's own deployment (circuit breaker on), followed by its id to COMPLETED or FAILED.

Following *our* deployment by id matters: "the service is stable" is also true after the
circuit breaker rolled a failed deployment back, which a waiter would report as success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.config import ProviderConfig
from reconciler.providers._aws import (
    AwsError,
    AwsProvider,
    AwsSettings,
    image_ref,
    split_image,
    strategy_problems,
)
from reconciler.providers.base import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Problem,
    Validation,
)

if TYPE_CHECKING:
    from mypy_boto3_ecs import ECSClient

# RegisterTaskDefinition's inputs that DescribeTaskDefinition returns: a revision is the
# current one with only the container's image changed.
_REGISTER_KEYS = (
    "family",
    "taskRoleArn",
    "executionRoleArn",
    "networkMode",
    "containerDefinitions",
    "volumes",
    "placementConstraints",
    "requiresCompatibilities",
    "cpu",
    "memory",
    "pidMode",
    "ipcMode",
    "proxyConfiguration",
    "inferenceAccelerators",
    "ephemeralStorage",
    "runtimePlatform",
    "enableFaultInjection",
)
# How many recent revisions a rollback looks through for one that runs the version.
ROLLBACK_SEARCH = 10

Json = Mapping[str, Any]


class EcsSettings(AwsSettings):
    cluster: str = Field(default="default", min_length=1)


class EcsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str | None = Field(default=None, min_length=1)
    container: str | None = Field(default=None, min_length=1)
    image: str | None = Field(default=None, min_length=1)


class _Rolling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["rolling"]


def _container(task_definition: Json, name: str | None) -> Json:
    containers: Sequence[Json] = task_definition.get("containerDefinitions", [])
    if not containers:
        raise DeploymentFailed(f"{task_definition.get('taskDefinitionArn')} has no containers")
    if name is None:
        return containers[0]
    for c in containers:
        if c.get("name") == name:
            return c
    names = ", ".join(str(c.get("name")) for c in containers)
    raise DeploymentFailed(
        f"no container '{name}' in {task_definition.get('taskDefinitionArn')} (has {names})"
    )


def _revision(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


class EcsProvider(AwsProvider):
    type = "ecs"
    params_model = EcsParams
    settings_model = EcsSettings

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        assert isinstance(self.settings, EcsSettings)
        self.cluster = self.settings.cluster

    @property
    def ecs(self) -> ECSClient:
        client: ECSClient = self.client("ecs")
        return client

    @property
    def ecs_once(self) -> ECSClient:
        client: ECSClient = self.client("ecs", retry=False)
        return client

    def check_strategy(self, strategy: Mapping[str, Any]) -> Iterable[Problem]:
        return strategy_problems(_Rolling, strategy)

    # -- reads ---------------------------------------------------------------------------

    async def _service(self, name: str) -> Json:
        out = await self.call(
            lambda: self.ecs.describe_services(cluster=self.cluster, services=[name])
        )
        for svc in out.get("services", []):
            return svc
        reasons = ", ".join(str(f.get("reason")) for f in out.get("failures", []))
        raise DeploymentFailed(
            f"service '{name}' not found in cluster '{self.cluster}'"
            + (f" ({reasons})" if reasons else "")
        )

    async def _task_definition(self, arn: str) -> tuple[Json, list[Any]]:
        out = await self.call(
            lambda: self.ecs.describe_task_definition(taskDefinition=arn, include=["TAGS"])
        )
        return out["taskDefinition"], list(out.get("tags", []))

    # -- validate ------------------------------------------------------------------------

    async def validate(self, request: DeployRequest) -> Validation:
        checks = list((await super().validate(request)).checks)
        problems = list(self.check_strategy(request.strategy))
        if problems:
            checks.append(Check("strategy", False, "; ".join(m for _, m in problems)))
        checks.append(await self.credentials_check())
        params = self.params(request.params)
        name = params.service or request.service
        try:
            svc = await self._service(name)
        except DeploymentFailed as exc:
            checks.append(Check("service", False, str(exc)))
            return Validation(tuple(checks))
        status = svc.get("status")
        controller = svc.get("deploymentController", {}).get("type", "ECS")
        if status != "ACTIVE":
            checks.append(Check("service", False, f"service '{name}' is {status}, not ACTIVE"))
        elif controller != "ECS":
            checks.append(
                Check(
                    "service",
                    False,
                    f"service '{name}' uses the {controller} deployment controller; "
                    "the ecs provider drives ECS rolling deployments",
                )
            )
        else:
            checks.append(Check("service", True, str(svc.get("serviceArn", name))))
            try:
                td, _ = await self._task_definition(svc["taskDefinition"])
                c = _container(td, params.container)
                checks.append(Check("container", True, str(c.get("name"))))
            except DeploymentFailed as exc:
                checks.append(Check("container", False, str(exc)))
        return Validation(tuple(checks))

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, ctx: DeployContext) -> None:
        req = ctx.request
        params = self.params(req.params)
        name = params.service or req.service
        svc = await self._service(name)
        previous_arn: str = svc["taskDefinition"]
        seen_events = {e.get("id") for e in svc.get("events", [])}
        td, tags = await self._task_definition(previous_arn)
        container = _container(td, params.container)
        image = image_ref(params.image, container.get("image"), req.version)

        target: str | None = None
        if container.get("image") == image:
            target = previous_arn  # already this image: follow its deployment, register nothing
        elif req.trigger == "rollback":
            target = await self._revision_with(td, str(container.get("name")), image)
            if target is not None:
                ctx.log(f"rollback: reusing task definition {_revision(target)} ({image})")
        if target is None:
            target = await self._register(td, tags, str(container.get("name")), image)
            ctx.log(f"registered task definition {_revision(target)} with {image}")
        await ctx.report_progress(5, f"task definition {_revision(target)}", {"image": image})

        if target == previous_arn:
            deployment = _primary(svc, target)
            if deployment is None:
                raise DeploymentFailed(
                    f"service '{name}' is on {_revision(target)} but has no deployment of it"
                )
            ctx.log(f"following deployment {deployment['id']} already running {_revision(target)}")
            await self._follow(ctx, name, str(deployment["id"]), seen_events)
            return
        config = dict(svc.get("deploymentConfiguration") or {})
        config["deploymentCircuitBreaker"] = {"enable": True, "rollback": True}
        deployment_id: str | None = None
        try:
            # Inside the try: a cancel while UpdateService is on its way still undoes it
            # (the call itself completes in its thread).
            updated = await self.call(
                lambda: self.ecs.update_service(
                    cluster=self.cluster,
                    service=name,
                    taskDefinition=target,
                    deploymentConfiguration=config,  # type: ignore[arg-type]
                )
            )
            deployment = _primary(updated["service"], target)
            if deployment is None:
                await self._stop(ctx, name, None, previous_arn)
                raise DeploymentFailed(
                    f"UpdateService started no deployment of {_revision(target)} on '{name}'"
                )
            deployment_id = str(deployment["id"])
            ctx.log(f"UpdateService: deployment {deployment_id} of {_revision(target)} started")
            await self._follow(ctx, name, deployment_id, seen_events)
        except asyncio.CancelledError:
            await self._stop(ctx, name, deployment_id, previous_arn)
            raise

    async def _revision_with(self, td: Json, container: str, image: str) -> str | None:
        """A recent ACTIVE revision of the family whose container runs `image` (rollback)."""
        family = str(td.get("family"))
        out = await self.call(
            lambda: self.ecs.list_task_definitions(
                familyPrefix=family, status="ACTIVE", sort="DESC", maxResults=ROLLBACK_SEARCH
            )
        )
        for arn in out.get("taskDefinitionArns", []):
            candidate, _ = await self._task_definition(arn)
            if candidate.get("family") != family:
                continue
            for c in candidate.get("containerDefinitions", []):
                if c.get("name") == container and c.get("image") == image:
                    return arn
        return None

    async def _register(self, td: Json, tags: list[Any], container: str, image: str) -> str:
        kwargs: dict[str, Any] = {k: td[k] for k in _REGISTER_KEYS if td.get(k) is not None}
        kwargs["containerDefinitions"] = [
            {**c, "image": image} if c.get("name") == container else c
            for c in td.get("containerDefinitions", [])
        ]
        if tags:
            kwargs["tags"] = tags
        out = await self.call(lambda: self.ecs.register_task_definition(**kwargs))
        return out["taskDefinition"]["taskDefinitionArn"]

    async def _follow(
        self, ctx: DeployContext, name: str, deployment_id: str, seen_events: set[Any]
    ) -> None:
        """Poll the service until our deployment's rolloutState is COMPLETED or FAILED."""
        last: tuple[Any, ...] | None = None
        while True:
            svc = await self._service(name)
            events = [e for e in svc.get("events", []) if e.get("id") not in seen_events]
            for e in reversed(events):  # ECS lists the newest first
                seen_events.add(e.get("id"))
                at = e.get("createdAt")
                stamp = at.isoformat() if isinstance(at, datetime) else ""
                ctx.log(f"{stamp} {e.get('message', '')}".strip())
            ours = next(
                (d for d in svc.get("deployments", []) if d.get("id") == deployment_id), None
            )
            if ours is None:
                primary = _primary(svc, None)
                current = (
                    f"{primary['id']} of {_revision(str(primary.get('taskDefinition')))}"
                    if primary
                    else "none"
                )
                raise DeploymentFailed(
                    f"ECS deployment {deployment_id} is no longer on service '{name}' "
                    f"(PRIMARY now: {current})"
                )
            state = ours.get("rolloutState")
            running, desired = int(ours.get("runningCount", 0)), int(ours.get("desiredCount", 0))
            reason = str(ours.get("rolloutStateReason") or "")
            if state == "COMPLETED":
                await ctx.report_progress(
                    100, reason or f"{running}/{desired} tasks running", _details(ours)
                )
                return
            if state == "FAILED":
                primary = _primary(svc, None)
                back = ""
                if primary is not None and primary.get("id") != deployment_id:
                    back = (
                        f"; the circuit breaker rolled '{name}' back to "
                        f"{_revision(str(primary.get('taskDefinition')))}"
                    )
                raise DeploymentFailed(
                    f"ECS deployment {deployment_id} failed: {reason or 'rolloutState FAILED'}{back}"
                )
            now = (state, running, desired, int(ours.get("failedTasks", 0)))
            if now != last:
                last = now
                percent = min(99, 5 + running * 95 // desired) if desired else None
                await ctx.report_progress(
                    percent, f"{running}/{desired} tasks running", _details(ours)
                )
            await asyncio.sleep(self.poll_interval)

    async def _stop(
        self, ctx: DeployContext, name: str, deployment_id: str | None, previous_arn: str
    ) -> None:
        """Undo a rollout that must not go on (deadline, cancel): StopServiceDeployment with
        ROLLBACK where the API has it, else UpdateService back to the previous revision."""
        try:
            arn = await self._service_deployment_arn(name)
            if arn is not None:
                await self.call(
                    lambda: self.ecs_once.stop_service_deployment(
                        serviceDeploymentArn=arn, stopType="ROLLBACK"
                    )
                )
                ctx.log(f"stopped deployment {deployment_id} with rollback ({arn})")
                return
        except AwsError as exc:
            ctx.log(f"StopServiceDeployment unavailable ({exc}); updating back instead", "stderr")
        try:
            await self.call(
                lambda: self.ecs.update_service(
                    cluster=self.cluster, service=name, taskDefinition=previous_arn
                )
            )
            ctx.log(f"stopped: service '{name}' updated back to {_revision(previous_arn)}")
        except AwsError as exc:
            ctx.log(f"could not put '{name}' back on {_revision(previous_arn)}: {exc}", "stderr")

    async def _service_deployment_arn(self, name: str) -> str | None:
        """The ARN of the service deployment in progress (the one UpdateService started)."""
        out = await self.call(
            lambda: self.ecs_once.list_service_deployments(
                cluster=self.cluster, service=name, status=["PENDING", "IN_PROGRESS"]
            )
        )
        arns = [d["serviceDeploymentArn"] for d in out.get("serviceDeployments", [])]
        return arns[0] if len(arns) == 1 else None

    # -- drift ---------------------------------------------------------------------------

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        p = self.params(params)
        svc = await self._service(p.service or service)
        td, _ = await self._task_definition(svc["taskDefinition"])
        image = _container(td, p.container).get("image")
        return split_image(str(image))[1] if image else None


def _primary(svc: Json, task_definition: str | None) -> Json | None:
    """The PRIMARY deployment (of `task_definition`, when given)."""
    deployments: list[Json] = svc.get("deployments", [])
    for d in deployments:
        if d.get("status") == "PRIMARY" and (
            task_definition is None or d.get("taskDefinition") == task_definition
        ):
            return d
    return None


def _details(d: Json) -> dict[str, Any]:
    return {
        "deployment": d.get("id"),
        "task_definition": _revision(str(d.get("taskDefinition"))),
        "rollout_state": d.get("rolloutState"),
        "running": d.get("runningCount"),
        "desired": d.get("desiredCount"),
        "pending": d.get("pendingCount"),
        "failed_tasks": d.get("failedTasks"),
    }
