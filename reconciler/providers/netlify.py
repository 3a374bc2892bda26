"""The `netlify` provider: deploy a zip that CI built through Netlify's REST API.

A deployment uploads the zip at `artifact` (`POST /sites/{site}/deploys`, `Content-Type:
application/zip`, `title` = the version) and follows the deploy's `state` to `ready` or
`error`. A rollback to a version that has a ready deploy restores it
(`POST /sites/{site}/deploys/{id}/restore`) instead of uploading again. The live version
is the `title` of the site's published deploy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.providers.base import Check, DeployContext, DeployRequest, Validation
from reconciler.providers.http_api import (
    ApiClient,
    ApiError,
    HostedProvider,
    account_and_target_checks,
    failed,
)

READY, FAILURES = frozenset({"ready"}), frozenset({"error", "rejected"})
PERCENTS = {
    "new": 5,
    "uploading": 10,
    "uploaded": 20,
    "preparing": 30,
    "prepared": 40,
    "processing": 60,
    "processed": 80,
}


class NetlifyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str = Field(min_length=1, description="site id")
    artifact: str = Field(min_length=1, description="path of the zip CI built; {version} expands")


class NetlifyProvider(HostedProvider):
    type = "netlify"
    params_model = NetlifyParams
    default_api_url = "https://api.netlify.com/api/v1"

    def artifact(self, params: NetlifyParams, version: str) -> Path:
        return self.resolve(params.artifact.replace("{version}", version))

    async def validate(self, request: DeployRequest) -> Validation:
        checks = list((await super().validate(request)).checks)
        p: NetlifyParams = self.params(request.params)
        async with self.client() as api:
            account = await account_and_target_checks(api, "/user", "site", f"/sites/{p.site}")
        checks += account
        if not account[0].ok:  # no answer, or the token refused: nothing else to check
            return Validation(tuple(checks))
        if request.trigger != "rollback":  # a rollback restores a kept deploy when it can
            zip_path = self.artifact(p, request.version)
            ok = zip_path.is_file()
            checks.append(Check("artifact", ok, "" if ok else f"{zip_path}: no such file"))
        return Validation(tuple(checks))

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        p: NetlifyParams = self.params(params)
        async with self.client() as api:
            site = await api.request("GET", f"/sites/{p.site}")
        title = (site.get("published_deploy") or {}).get("title")
        return str(title) if title else None

    async def deploy(self, ctx: DeployContext) -> None:
        async with self.client(ctx) as api:
            try:
                await self._deploy(ctx, api)
            except ApiError as exc:
                raise failed(exc) from None

    async def _deploys(self, api: ApiClient, site: str) -> list[dict[str, Any]]:
        out = await api.request("GET", f"/sites/{site}/deploys", params={"per_page": 100})
        return list(out or [])

    async def _deploy(self, ctx: DeployContext, api: ApiClient) -> None:
        req = ctx.request
        p: NetlifyParams = self.params(req.params)
        deploys = await self._deploys(api, p.site)  # newest first
        if req.trigger == "rollback":
            kept = next(
                (d for d in deploys if d.get("title") == req.version and d.get("state") == "ready"),
                None,
            )
            site = await api.request("GET", f"/sites/{p.site}")
            if kept is not None and (site.get("published_deploy") or {}).get("id") == kept["id"]:
                ctx.log(f"deploy {kept['id']} ({req.version}) is still published", "stdout")
                return
            if kept is not None:
                ctx.log(f"restoring ready deploy {kept['id']} ({req.version})", "stdout")
                await ctx.report_progress(
                    50, f"restoring deploy {kept['id']}", {"deploy": kept["id"]}
                )
                await self._publish(api, p.site, str(kept["id"]))
                return
            ctx.log(f"no ready deploy of {req.version}: uploading it again", "stdout")
        zip_path = self.artifact(p, req.version)
        try:
            data = await asyncio.to_thread(zip_path.read_bytes)
        except OSError as exc:
            raise failed(ApiError(f"{zip_path}: {exc.strerror}")) from None
        known = {d["id"] for d in deploys}

        async def lookup() -> Any:  # a create whose answer was lost: did it happen?
            for d in await self._deploys(api, p.site):
                if d["id"] not in known and d.get("title") == req.version:
                    return d
            return None

        created = await api.request(
            "POST",
            f"/sites/{p.site}/deploys",
            params={"title": req.version},
            content=data,
            headers={"Content-Type": "application/zip"},
            idempotent=False,
            lookup=lookup,
        )
        deploy_id = str(created["id"])
        ctx.log(
            f"netlify deploy {deploy_id} created for {req.version} ({len(data)} bytes)", "stdout"
        )

        async def poll() -> tuple[str, str | None]:
            d = await api.request("GET", f"/deploys/{deploy_id}")
            return str(d.get("state")), d.get("error_message")

        async def cancel() -> None:
            await api.request("POST", f"/deploys/{deploy_id}/cancel", idempotent=True)

        async with self.cancel_on_stop(ctx, api, lambda: f"deploy {deploy_id}", cancel):
            await self.follow(ctx, f"deploy {deploy_id}", poll, PERCENTS, READY, FAILURES)
        site = await api.request("GET", f"/sites/{p.site}")
        if (site.get("published_deploy") or {}).get("id") != deploy_id:
            # Auto publishing is locked on the site: publish this deploy explicitly.
            ctx.log(f"deploy {deploy_id} is ready but not published: publishing it", "stdout")
            await self._publish(api, p.site, deploy_id)

    async def _publish(self, api: ApiClient, site: str, deploy_id: str) -> None:
        await api.request("POST", f"/sites/{site}/deploys/{deploy_id}/restore", idempotent=True)
        while True:
            current = await api.request("GET", f"/sites/{site}")
            if (current.get("published_deploy") or {}).get("id") == deploy_id:
                return
            await asyncio.sleep(self.poll_interval)
