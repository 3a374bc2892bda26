"""The `vercel` provider: production deployments from a git ref through Vercel's REST API.

A deployment is `POST /v13/deployments` (target production, `gitSource.ref` = the version),
followed through `readyState`. A rollback to a version that has a READY production
deployment is an instant rollback (`POST /v1/projects/{id}/rollback/{deployment}`), not a
rebuild. After an instant rollback Vercel stops auto-assigning the production domains to new
deployments, so every successful deployment checks the project's production target and
promotes itself (`POST /v10/projects/{id}/promote/{deployment}`) when it was not assigned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.config import ProviderConfig
from reconciler.providers.base import DeployContext, DeployRequest, Validation
from reconciler.providers.http_api import (
    ApiClient,
    ApiError,
    HostedProvider,
    account_and_target_checks,
    failed,
)

READY, FAILURES = frozenset({"READY"}), frozenset({"ERROR", "CANCELED"})
PERCENTS = {"QUEUED": 10, "INITIALIZING": 20, "BUILDING": 50, "UPLOADING": 80, "DEPLOYING": 85}


class VercelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, description="project id or name")
    repo: str = Field(pattern=r"^[^/\s]+/[^/\s]+$", description="org/name of the git repository")
    repo_type: Literal["github", "gitlab", "bitbucket"] = "github"


class VercelProvider(HostedProvider):
    type = "vercel"
    params_model = VercelParams
    default_api_url = "https://api.vercel.com"
    extra_settings = frozenset({"team_id"})

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        team = config.settings.get("team_id")
        if team is not None and (not isinstance(team, str) or not team):
            raise self.config_error("team_id", "expected a team id")
        self.team_id: str | None = team

    def _q(self, **extra: Any) -> dict[str, Any]:
        return {**({"teamId": self.team_id} if self.team_id else {}), **extra}

    async def validate(self, request: DeployRequest) -> Validation:
        checks = list((await super().validate(request)).checks)
        p: VercelParams = self.params(request.params)
        async with self.client() as api:
            checks += await account_and_target_checks(
                api, "/v2/user", "project", f"/v9/projects/{p.project}", self._q()
            )
        return Validation(tuple(checks))

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        p: VercelParams = self.params(params)
        async with self.client() as api:
            project = await api.request("GET", f"/v9/projects/{p.project}", params=self._q())
        production = (project.get("targets") or {}).get("production") or {}
        ref = (production.get("meta") or {}).get("githubCommitRef")
        return str(ref) if ref else None

    async def deploy(self, ctx: DeployContext) -> None:
        async with self.client(ctx) as api:
            try:
                await self._deploy(ctx, api)
            except ApiError as exc:
                raise failed(exc) from None

    async def _deploy(self, ctx: DeployContext, api: ApiClient) -> None:
        req = ctx.request
        p: VercelParams = self.params(req.params)
        project = await api.request("GET", f"/v9/projects/{p.project}", params=self._q())
        project_id = str(project["id"])
        if req.trigger == "rollback":
            previous = await self._ready_deployment(api, project_id, req.version)
            if previous is not None:
                await self._instant_rollback(ctx, api, project_id, previous)
                return
            ctx.log(f"no READY production deployment of {req.version}: building it", "stdout")
        known = {d["uid"] for d in await self._production_deployments(api, project_id)}

        async def lookup() -> Any:  # a create whose answer was lost: did it happen?
            for d in await self._production_deployments(api, project_id):
                if d["uid"] not in known and _ref(d) == req.version:
                    return {"id": d["uid"], "readyState": d.get("readyState") or d.get("state")}
            return None

        org, name = p.repo.split("/", 1)
        git: dict[str, Any] = {"type": p.repo_type, "ref": req.version}
        if p.repo_type == "github":
            git.update(org=org, repo=name)
        elif p.repo_type == "gitlab":
            git.update(projectId=p.repo)
        else:
            git.update(owner=org, slug=name)
        body = {
            "name": project["name"],
            "project": project_id,
            "target": "production",
            "gitSource": git,
        }
        created = await api.request(
            "POST", "/v13/deployments", params=self._q(), json=body, idempotent=False, lookup=lookup
        )
        dep_id = str(created["id"])
        ctx.log(f"vercel deployment {dep_id} created for {req.version}", "stdout")
        seen: set[str] = set()

        async def poll() -> tuple[str, str | None]:
            dep = await api.request("GET", f"/v13/deployments/{dep_id}", params=self._q())
            await self._events(ctx, api, dep_id, seen)
            return str(dep.get("readyState")), dep.get("errorMessage")

        async def cancel() -> None:
            await api.request("PATCH", f"/v12/deployments/{dep_id}/cancel", params=self._q())

        async with self.cancel_on_stop(ctx, api, lambda: f"deployment {dep_id}", cancel):
            await self.follow(ctx, f"deployment {dep_id}", poll, PERCENTS, READY, FAILURES)
        await self._ensure_production(ctx, api, project_id, dep_id)

    async def _events(
        self, ctx: DeployContext, api: ApiClient, dep_id: str, seen: set[str]
    ) -> None:
        """Build output into the run's log (each event once)."""
        events = await api.request("GET", f"/v3/deployments/{dep_id}/events", params=self._q())
        for i, ev in enumerate(events if isinstance(events, list) else []):
            payload = ev.get("payload") or {}
            key = str(payload.get("id") or ev.get("id") or i)
            text = payload.get("text") or ev.get("text")
            if key in seen or not text:
                continue
            seen.add(key)
            ctx.log(str(text), "stderr" if ev.get("type") == "stderr" else "stdout")

    async def _production_deployments(
        self, api: ApiClient, project_id: str
    ) -> list[dict[str, Any]]:
        out = await api.request(
            "GET",
            "/v6/deployments",
            params=self._q(projectId=project_id, target="production", limit=100),
        )
        return list(out.get("deployments") or [])

    async def _ready_deployment(
        self, api: ApiClient, project_id: str, version: str
    ) -> dict[str, Any] | None:
        for d in await self._production_deployments(api, project_id):  # newest first
            if _ref(d) == version and (d.get("readyState") or d.get("state")) == "READY":
                return d
        return None

    async def _instant_rollback(
        self, ctx: DeployContext, api: ApiClient, project_id: str, dep: dict[str, Any]
    ) -> None:
        dep_id = str(dep["uid"])
        project = await api.request("GET", f"/v9/projects/{project_id}", params=self._q())
        if _production_id(project) == dep_id:
            # The failed build never took the domains: rolling back to what already serves
            # production would only switch auto-assignment off.
            ctx.log(f"deployment {dep_id} ({_ref(dep)}) is still serving production", "stdout")
            return
        ctx.log(f"instant rollback to READY deployment {dep_id} ({_ref(dep)})", "stdout")
        await ctx.report_progress(
            50, f"rolling back to deployment {dep_id}", {"deployment": dep_id}
        )
        await api.request("POST", f"/v1/projects/{project_id}/rollback/{dep_id}", params=self._q())
        await self._wait_production(api, project_id, dep_id)

    async def _ensure_production(
        self, ctx: DeployContext, api: ApiClient, project_id: str, dep_id: str
    ) -> None:
        """A READY deployment that did not get the production domains (auto-assignment is off
        after an instant rollback) is promoted, so production is never left pinned."""
        project = await api.request("GET", f"/v9/projects/{project_id}", params=self._q())
        if _production_id(project) == dep_id:
            return
        ctx.log(
            f"deployment {dep_id} is READY but not serving production (pinned by an earlier "
            "rollback): promoting it",
            "stdout",
        )
        await api.request(
            "POST", f"/v10/projects/{project_id}/promote/{dep_id}", params=self._q(), json={}
        )
        await self._wait_production(api, project_id, dep_id)

    async def _wait_production(self, api: ApiClient, project_id: str, dep_id: str) -> None:
        """Promotion and rollback are asynchronous (201/202): wait for the domains to move."""
        while True:
            project = await api.request("GET", f"/v9/projects/{project_id}", params=self._q())
            if _production_id(project) == dep_id:
                return
            await asyncio.sleep(self.poll_interval)


def _ref(dep: Mapping[str, Any]) -> str | None:
    ref = (dep.get("meta") or {}).get("githubCommitRef")
    return str(ref) if ref else None


def _production_id(project: Mapping[str, Any]) -> str | None:
    production = (project.get("targets") or {}).get("production") or {}
    value = production.get("id")
    return str(value) if value else None
