"""The `railway` provider: deploy an image tag to a Railway service through its GraphQL API.

`serviceInstanceUpdate` (source image = `image:version`) only stages the change;
`serviceInstanceDeployV2` deploys it and returns the deployment id, followed through
`deployment(id){status}`. A rollback to a version with an earlier successful deployment is
`deploymentRollback` of it. GraphQL errors arrive with HTTP 200 in `errors`: every answer is
checked. The documents below use a small subset of Railway's public schema (the tests
validate them against a hand-written copy of it, tests/fakes/railway.graphql).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.config import ProviderConfig
from reconciler.providers.base import Check, DeployContext, DeployRequest, Validation
from reconciler.providers.http_api import ApiClient, ApiError, HostedProvider, Lookup, failed

SUCCESS = frozenset({"SUCCESS"})
FAILURES = frozenset({"FAILED", "CRASHED", "REMOVED", "SKIPPED"})
PERCENTS = {"QUEUED": 10, "WAITING": 10, "INITIALIZING": 20, "BUILDING": 40, "DEPLOYING": 70}

INSTANCE = """query Instance($serviceId: String!, $environmentId: String!) {
  serviceInstance(serviceId: $serviceId, environmentId: $environmentId) {
    id serviceName source { image }
  }
}"""
STAGE = """mutation Stage($serviceId: String!, $environmentId: String!, $input: ServiceInstanceUpdateInput!) {
  serviceInstanceUpdate(serviceId: $serviceId, environmentId: $environmentId, input: $input)
}"""
DEPLOY = """mutation Deploy($serviceId: String!, $environmentId: String!) {
  serviceInstanceDeployV2(serviceId: $serviceId, environmentId: $environmentId)
}"""
STATUS = """query Status($id: String!) { deployment(id: $id) { id status } }"""
DEPLOYMENTS = """query Deployments($input: DeploymentListInput!, $first: Int) {
  deployments(input: $input, first: $first) {
    edges { node { id status createdAt meta canRollback } }
  }
}"""
CANCEL = """mutation Cancel($id: String!) { deploymentCancel(id: $id) }"""
ROLLBACK = """mutation Rollback($id: String!) { deploymentRollback(id: $id) }"""
LOGS = """query Logs($deploymentId: String!, $limit: Int) {
  buildLogs(deploymentId: $deploymentId, limit: $limit) { message severity }
}"""

LOG_LINES = 200


class RailwayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service_id: str = Field(min_length=1)
    environment_id: str = Field(min_length=1)
    image: str = Field(pattern=r"^[^\s:@]+(:\d+/[^\s:@]+)?$", description="repository, no tag")


def image_tag(ref: str | None) -> str | None:
    """The tag of `registry[:port]/repo:tag` (None without a tag)."""
    if not ref:
        return None
    name, sep, tag = ref.rpartition(":")
    return tag if sep and "/" not in tag and name else None


class RailwayProvider(HostedProvider):
    type = "railway"
    params_model = RailwayParams
    default_api_url = "https://backboard.railway.com/graphql/v2"
    extra_settings = frozenset({"token_type"})

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        kind = config.settings.get("token_type", "account")
        if kind not in ("account", "project"):
            raise self.config_error("token_type", "expected 'account' or 'project'")
        self.token_type: str = kind

    def auth_headers(self) -> dict[str, str]:
        # Account and workspace tokens are bearer tokens; project tokens have their own header.
        if self.token_type == "project":
            return {"Project-Access-Token": self.token}
        return {"Authorization": f"Bearer {self.token}"}

    async def gql(
        self,
        api: ApiClient,
        document: str,
        variables: Mapping[str, Any],
        *,
        idempotent: bool = True,
        lookup: Lookup | None = None,
    ) -> Any:
        """`data` of a GraphQL answer; its `errors` (sent with HTTP 200) raise ApiError."""
        operation = document.split("{", 1)[0].split("(", 1)[0].strip()  # "mutation Deploy"
        out = await api.request(
            "POST",
            "",
            json={"query": document, "variables": dict(variables)},
            idempotent=idempotent,
            lookup=lookup,
            what=operation,
        )
        errors = (out or {}).get("errors") if isinstance(out, dict) else None
        if errors:
            messages = "; ".join(str(e.get("message", e)) for e in errors if isinstance(e, dict))
            raise ApiError(messages or "GraphQL error")
        return (out or {}).get("data") or {}

    def _ids(self, p: RailwayParams) -> dict[str, str]:
        return {"serviceId": p.service_id, "environmentId": p.environment_id}

    async def validate(self, request: DeployRequest) -> Validation:
        checks = list((await super().validate(request)).checks)
        p: RailwayParams = self.params(request.params)
        async with self.client() as api:
            try:
                await self.gql(api, INSTANCE, self._ids(p))
                checks += [Check("credentials", True), Check("service", True)]
            except ApiError as exc:
                text = str(exc)
                auth = exc.status in (401, 403) or "authorized" in text.lower()
                name = "api" if not exc.reached else "credentials" if auth else "service"
                checks.append(Check(name, False, text))
        return Validation(tuple(checks))

    async def _deployments(
        self, api: ApiClient, p: RailwayParams, statuses: list[str] | None = None, first: int = 50
    ) -> list[dict[str, Any]]:
        where: dict[str, Any] = dict(self._ids(p))
        if statuses:
            where["status"] = {"in": statuses}
        data = await self.gql(api, DEPLOYMENTS, {"input": where, "first": first})
        return [e["node"] for e in data["deployments"]["edges"]]  # newest first

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        p: RailwayParams = self.params(params)
        async with self.client() as api:
            latest = await self._deployments(api, p, ["SUCCESS"], first=1)
        return image_tag((latest[0].get("meta") or {}).get("image")) if latest else None

    async def deploy(self, ctx: DeployContext) -> None:
        async with self.client(ctx) as api:
            try:
                await self._deploy(ctx, api)
            except ApiError as exc:
                raise failed(exc) from None

    async def _deploy(self, ctx: DeployContext, api: ApiClient) -> None:
        req = ctx.request
        p: RailwayParams = self.params(req.params)
        ref = f"{p.image}:{req.version}"
        history = await self._deployments(api, p)
        known = {d["id"] for d in history}

        async def lookup() -> Any:
            """A deploy or rollback whose answer was lost: the answer it would have given,
            when a deployment made since we listed them exists."""
            for d in await self._deployments(api, p, first=10):
                if d["id"] not in known:
                    return {
                        "data": {"serviceInstanceDeployV2": d["id"], "deploymentRollback": True}
                    }
            return None

        dep_id: str | None = None
        if req.trigger == "rollback":
            kept = next(
                (
                    d
                    for d in history
                    if (d.get("meta") or {}).get("image") == ref and d.get("canRollback")
                ),
                None,
            )
            if kept is not None:
                ctx.log(f"rolling back to deployment {kept['id']} ({ref})", "stdout")
                await self.gql(api, ROLLBACK, {"id": kept["id"]}, idempotent=False, lookup=lookup)
                dep_id = await self._new_deployment(api, p, known)
            else:
                ctx.log(f"no earlier deployment of {ref} to roll back to: deploying it", "stdout")
        if dep_id is None:
            await self.gql(api, STAGE, {**self._ids(p), "input": {"source": {"image": ref}}})
            ctx.log(f"staged source image {ref}", "stdout")
            data = await self.gql(api, DEPLOY, self._ids(p), idempotent=False, lookup=lookup)
            dep_id = str(data["serviceInstanceDeployV2"])
        ctx.log(f"railway deployment {dep_id} started for {ref}", "stdout")
        deployment = dep_id

        async def poll() -> tuple[str, str | None]:
            data = await self.gql(api, STATUS, {"id": deployment})
            status = str(data["deployment"]["status"])
            return status, (await self._logs(ctx, api, deployment) if status in FAILURES else None)

        async def cancel() -> None:
            await self.gql(api, CANCEL, {"id": deployment})

        async with self.cancel_on_stop(ctx, api, lambda: f"deployment {deployment}", cancel):
            await self.follow(ctx, f"deployment {deployment}", poll, PERCENTS, SUCCESS, FAILURES)

    async def _new_deployment(self, api: ApiClient, p: RailwayParams, known: set[str]) -> str:
        """deploymentRollback answers a Boolean: the deployment it made is the new one."""
        while True:
            for d in await self._deployments(api, p, first=10):
                if d["id"] not in known:
                    return str(d["id"])
            await asyncio.sleep(self.poll_interval)

    async def _logs(self, ctx: DeployContext, api: ApiClient, dep_id: str) -> str | None:
        """The build log into the run's log; its last error line is the failure's text."""
        try:
            data = await self.gql(api, LOGS, {"deploymentId": dep_id, "limit": LOG_LINES})
        except ApiError as exc:
            ctx.log(f"build log unavailable: {exc}", "stderr")
            return None
        last = None
        for entry in data.get("buildLogs") or []:
            error = entry.get("severity") == "error"
            ctx.log(str(entry.get("message", "")), "stderr" if error else "stdout")
            if error:
                last = str(entry.get("message", ""))
        return last
