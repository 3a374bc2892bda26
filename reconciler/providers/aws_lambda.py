"""The `lambda` provider: new code, a published version described by the version, and the
alias moved to it (at once, or through canary weights watched by CloudWatch alarms).

Lambda refuses a change while another is being applied (`ResourceConflictException`, "an
update is in progress"), the failure deploy tools report most: every step waits for the
previous one to settle, and a conflict is retried with backoff inside the deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reconciler.providers._aws import (
    AwsError,
    AwsProvider,
    Seconds,
    image_ref,
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
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_lambda import LambdaClient

T = TypeVar("T")
CONFLICT = "ResourceConflictException"
MAX_BACKOFF = 30.0


class LambdaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str | None = Field(default=None, min_length=1)
    alias: str | None = Field(default=None, min_length=1)
    image: str | None = Field(default=None, min_length=1)
    s3_bucket: str | None = Field(default=None, min_length=1)
    s3_key: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> LambdaParams:
        s3 = self.s3_bucket is not None or self.s3_key is not None
        if self.image is not None and s3:
            raise ValueError("give either image or s3_bucket + s3_key, not both")
        if self.image is None and not (self.s3_bucket and self.s3_key):
            raise ValueError("needs image, or s3_bucket and s3_key")
        return self


class _Rolling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["rolling"]


class _Canary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["canary"]
    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [10, 50, 100], min_length=1
    )
    interval: Seconds = 60.0
    alarms: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _increasing(self) -> _Canary:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must increase, e.g. [10, 50, 100]")
        return self


def _strategy_model(strategy: Mapping[str, Any]) -> type[BaseModel]:
    return _Canary if strategy.get("type") == "canary" else _Rolling


class LambdaProvider(AwsProvider):
    type = "lambda"
    params_model = LambdaParams
    strategies = frozenset({"rolling", "canary"})

    @property
    def lam(self) -> LambdaClient:
        client: LambdaClient = self.client("lambda")
        return client

    @property
    def cloudwatch(self) -> CloudWatchClient:
        client: CloudWatchClient = self.client("cloudwatch")
        return client

    def check_strategy(self, strategy: Mapping[str, Any]) -> Iterable[Problem]:
        return strategy_problems(_strategy_model(strategy), strategy)

    def _names(self, request: DeployRequest) -> tuple[LambdaParams, str, str]:
        p: LambdaParams = self.params(request.params)
        return p, p.function or request.service, p.alias or request.environment

    # -- validate ------------------------------------------------------------------------

    async def validate(self, request: DeployRequest) -> Validation:
        checks = list((await super().validate(request)).checks)
        problems = list(self.check_strategy(request.strategy))
        if problems:
            checks.append(Check("strategy", False, "; ".join(m for _, m in problems)))
        checks.append(await self.credentials_check())
        p, fn, alias = self._names(request)
        try:
            cfg = await self.call(lambda: self.lam.get_function_configuration(FunctionName=fn))
        except AwsError as exc:
            checks.append(Check("function", False, str(exc)))
            return Validation(tuple(checks))
        package = cfg.get("PackageType", "Zip")
        wanted = "Image" if p.image is not None else "Zip"
        if package != wanted:
            checks.append(
                Check(
                    "function",
                    False,
                    f"function '{fn}' is a {package} function; params give "
                    + ("an image" if wanted == "Image" else "an S3 zip"),
                )
            )
        else:
            checks.append(Check("function", True, str(cfg.get("FunctionArn", fn))))
        try:
            got = await self.call(lambda: self.lam.get_alias(FunctionName=fn, Name=alias))
            checks.append(Check("alias", True, f"{alias} -> version {got.get('FunctionVersion')}"))
        except AwsError as exc:
            checks.append(Check("alias", False, str(exc)))
        if not problems and request.strategy.get("type") == "canary":
            alarms = _Canary.model_validate(dict(request.strategy)).alarms
            if alarms:
                try:
                    found = await self.call(lambda: self._alarm_states(alarms))
                    missing = [a for a in alarms if a not in found]
                    msg = f"no such alarm: {', '.join(missing)}" if missing else ""
                    checks.append(Check("alarms", not missing, msg))
                except AwsError as exc:
                    checks.append(Check("alarms", False, str(exc)))
        return Validation(tuple(checks))

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, ctx: DeployContext) -> None:
        req = ctx.request
        p, fn, alias = self._names(req)
        current = await self.call(lambda: self.lam.get_alias(FunctionName=fn, Name=alias))
        old = current["FunctionVersion"]
        weights = current.get("RoutingConfig", {}).get("AdditionalVersionWeights", {})
        live = await self.call(
            lambda: self.lam.get_function_configuration(FunctionName=fn, Qualifier=old)
        )
        if live.get("Description") == req.version and not weights:
            await ctx.report_progress(
                100, f"alias {alias} already on version {old} ({req.version})"
            )
            return
        if req.trigger == "rollback":
            kept = await self.call(lambda: self._published(fn, req.version))
            if kept is not None:
                ctx.log(f"rollback: version {kept} of {fn} is described {req.version}")
                await self._point(ctx, fn, alias, kept, {})
                await ctx.report_progress(100, f"alias {alias} -> version {kept}")
                return
        new = await self._publish(ctx, p, fn)
        if new == old:
            await self._point(ctx, fn, alias, new, {})  # clears weights of a stopped canary
            await ctx.report_progress(100, f"alias {alias} already on version {new}")
            return
        if req.strategy.get("type") == "canary":
            await self._canary(ctx, fn, alias, old, new, _Canary.model_validate(dict(req.strategy)))
            return
        try:
            await self._point(ctx, fn, alias, new, {})
            await ctx.report_progress(100, f"alias {alias} -> version {new}")
        except asyncio.CancelledError:  # the move may have been applied: not completed, undo
            await self._restore(ctx, fn, alias, old)
            raise

    async def _publish(self, ctx: DeployContext, p: LambdaParams, fn: str) -> str:
        """UpdateFunctionCode, wait until updated, PublishVersion, wait until active."""
        version = ctx.request.version
        code: dict[str, str]
        if p.image is not None:
            code = {"ImageUri": image_ref(p.image, None, version)}
        else:
            assert p.s3_bucket is not None and p.s3_key is not None
            code = {
                "S3Bucket": p.s3_bucket.replace("{version}", version),
                "S3Key": p.s3_key.replace("{version}", version),
            }
        where = " ".join(f"{k}={v}" for k, v in code.items())
        # A previous change may still be applying: wait for it first (a conflict otherwise).
        await self._wait(
            ctx, fn, None, "LastUpdateStatus", "Successful", "update", settle_only=True
        )
        updated = await self._retrying(
            ctx,
            "UpdateFunctionCode",
            lambda: self.lam.update_function_code(FunctionName=fn, **code),  # type: ignore[arg-type]
        )
        sha = updated.get("CodeSha256", "")
        ctx.log(f"UpdateFunctionCode {fn}: {where} (CodeSha256 {sha})")
        await ctx.report_progress(10, "code uploaded", {"function": fn, **code})
        await self._wait(ctx, fn, None, "LastUpdateStatus", "Successful", "update")
        await ctx.report_progress(40, "function updated", {"function": fn})
        published = await self._retrying(
            ctx,
            "PublishVersion",
            lambda: (
                self.lam.publish_version(FunctionName=fn, Description=version, CodeSha256=sha)
                if sha
                else self.lam.publish_version(FunctionName=fn, Description=version)
            ),
        )
        new = published["Version"]
        ctx.log(f"PublishVersion {fn}: version {new} described {version}")
        await self._wait(ctx, fn, new, "State", "Active", f"version {new}")
        await ctx.report_progress(60, f"version {new} published", {"function_version": new})
        return new

    async def _canary(
        self, ctx: DeployContext, fn: str, alias: str, old: str, new: str, strategy: _Canary
    ) -> None:
        """Shift the alias's weight to `new` step by step; an alarm in ALARM (checked before
        each step), the deadline or a cancel puts the alias back on `old` alone."""
        steps = list(strategy.steps)
        if steps[-1] != 100:
            steps.append(100)
        shifted = False  # set before each alias change: a cancel during the call undoes it
        try:
            for i, weight in enumerate(steps):
                if strategy.alarms:
                    firing = await self.call(lambda: self._firing(strategy.alarms))
                    if firing is not None:
                        raise DeploymentFailed(
                            f"alarm {firing[0]} is in ALARM: {firing[1]}; alias {alias} "
                            f"back on version {old}"
                        )
                shifted = True
                if weight >= 100:
                    await self._point(ctx, fn, alias, new, {})
                    await ctx.report_progress(100, f"alias {alias} -> version {new}")
                    return
                await self._point(ctx, fn, alias, old, {new: weight / 100})
                await ctx.report_progress(
                    60 + weight * 40 // 100,
                    f"canary: {weight}% of {alias} on version {new}",
                    {"step": i + 1, "steps": len(steps), "weight": weight},
                )
                await asyncio.sleep(strategy.interval)
        except BaseException:  # an alarm, an error, the deadline, a cancel
            if shifted:
                await self._restore(ctx, fn, alias, old)
            raise

    async def _restore(self, ctx: DeployContext, fn: str, alias: str, old: str) -> None:
        try:
            await self._point(ctx, fn, alias, old, {})
        except AwsError as exc:
            ctx.log(f"could not put alias {alias} back on version {old}: {exc}", "stderr")

    async def _point(
        self, ctx: DeployContext, fn: str, alias: str, version: str, weights: dict[str, float]
    ) -> None:
        await self._retrying(
            ctx,
            "UpdateAlias",
            lambda: self.lam.update_alias(
                FunctionName=fn,
                Name=alias,
                FunctionVersion=version,
                RoutingConfig={"AdditionalVersionWeights": weights},
            ),
        )
        spread = ", ".join(f"{v}: {w:.0%}" for v, w in weights.items())
        ctx.log(
            f"UpdateAlias {fn}:{alias} -> version {version}" + (f" + {spread}" if spread else "")
        )

    async def _retrying(self, ctx: DeployContext, what: str, fn: Callable[[], T]) -> T:
        """One call, retried with backoff while Lambda says an update is in progress, as
        long as the deadline leaves time for the next try."""
        delay = self.poll_interval
        while True:
            try:
                return await self.call(fn)
            except AwsError as exc:
                if exc.code != CONFLICT or ctx.remaining() <= delay:
                    raise
                ctx.log(f"{exc} (retrying in {delay:g}s)", "stderr")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _wait(
        self,
        ctx: DeployContext,
        fn: str,
        qualifier: str | None,
        key: str,
        good: str,
        what: str,
        *,
        settle_only: bool = False,
    ) -> None:
        """Poll the function (or a version) until `key` is `good`; Failed fails with the
        reason Lambda gives."""
        last = None
        while True:
            cfg: Mapping[str, Any] = await self.call(
                lambda: (
                    self.lam.get_function_configuration(FunctionName=fn, Qualifier=qualifier)
                    if qualifier
                    else self.lam.get_function_configuration(FunctionName=fn)
                )
            )
            state = cfg.get(key)
            if state in (good, None):
                return
            if state == "Failed":
                if settle_only:
                    return  # an earlier failed update does not block a new one
                reason_key = (
                    "LastUpdateStatusReason" if key == "LastUpdateStatus" else "StateReason"
                )
                code, reason = cfg.get(f"{reason_key}Code") or "", cfg.get(reason_key) or ""
                raise DeploymentFailed(f"{what} of {fn} failed: {code} {reason}".strip())
            if state != last:
                last = state
                ctx.log(f"{what} of {fn}: {key} {state}")
            await asyncio.sleep(self.poll_interval)

    def _published(self, fn: str, description: str) -> str | None:
        """The newest published version described `description` (in a worker thread)."""
        best: int | None = None
        for page in self.lam.get_paginator("list_versions_by_function").paginate(FunctionName=fn):
            for v in page.get("Versions", []):
                number = v.get("Version", "")
                if number.isdigit() and v.get("Description") == description:
                    best = max(best or 0, int(number))
        return str(best) if best is not None else None

    def _alarm_states(self, names: list[str]) -> dict[str, tuple[str, str]]:
        out = self.cloudwatch.describe_alarms(AlarmNames=names)
        states: dict[str, tuple[str, str]] = {}
        for a in [*out.get("MetricAlarms", []), *out.get("CompositeAlarms", [])]:
            states[a.get("AlarmName", "")] = (a.get("StateValue", ""), a.get("StateReason", ""))
        return states

    def _firing(self, names: list[str]) -> tuple[str, str] | None:
        for name, (state, reason) in self._alarm_states(names).items():
            if state == "ALARM":
                return name, reason
        return None

    # -- drift ---------------------------------------------------------------------------

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        p: LambdaParams = self.params(params)
        fn, alias = p.function or service, p.alias or environment
        got = await self.call(lambda: self.lam.get_alias(FunctionName=fn, Name=alias))
        version = got["FunctionVersion"]
        cfg = await self.call(
            lambda: self.lam.get_function_configuration(FunctionName=fn, Qualifier=version)
        )
        return cfg.get("Description") or None
