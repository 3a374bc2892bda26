"""What the `ecs` and `lambda` providers share: settings, a boto3 session, calls in threads.

boto3 is synchronous; every call runs in a worker thread (`AwsProvider.call`) so the event
loop never waits on AWS. A call that is cancelled (deadline, stop) still finishes in its
thread, which is what the clean-up paths rely on: an undo that was sent is completed.
Errors become `AwsError` carrying AWS's own code and message, never a traceback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from desired_state import parse_duration
from reconciler.config import ProviderConfig
from reconciler.providers.base import Check, DeploymentFailed, Provider, Redactor

if TYPE_CHECKING:
    from mypy_boto3_sts import STSClient

T = TypeVar("T")


def seconds(value: Any) -> float:
    """A duration as users write it (``90``, ``"90s"``, ``"5m"``) or a number of seconds
    (``0.05``): polling intervals in tests are fractions of a second."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s or 1m")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = float(parse_duration(value))
    else:
        raise ValueError("expected a duration such as 5s or 1m")
    if number < 0:
        raise ValueError("a duration cannot be negative")
    return number


Seconds = Annotated[float, BeforeValidator(seconds)]


class AwsSettings(BaseModel):
    """`[providers.NAME]` keys common to the AWS types (besides `type`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str | None = Field(default=None, min_length=1)
    profile: str | None = Field(default=None, min_length=1)
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    poll_interval: Annotated[Seconds, Field(gt=0)] = 5.0
    # botocore's own retries (throttling, 5xx, connection errors) in its "standard" mode.
    max_attempts: int = Field(default=5, ge=1, le=20)


class AwsError(DeploymentFailed):
    """An AWS call that failed; the message is AWS's own (`Operation: Code: message`)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def aws_error(exc: Exception) -> AwsError:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Error")
        message = str(err.get("Message") or "").strip().splitlines()
        text = message[0] if message else str(exc)
        return AwsError(f"{exc.operation_name}: {code}: {text}", code)
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return AwsError(text or type(exc).__name__, type(exc).__name__)


def split_image(ref: str) -> tuple[str, str | None]:
    """`registry:5000/repo:tag@sha256:...` -> (`registry:5000/repo`, `tag`)."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, None


def image_ref(param: str | None, current: str | None, version: str) -> str:
    """The image to deploy: the param (a repository; `{version}` is replaced, a tag in it is
    replaced by the version) or, without it, the current image's repository at the version."""
    base = param if param is not None else current
    if base is None:
        raise DeploymentFailed("no image: set params.image")
    if "{version}" in base:
        return base.replace("{version}", version)
    return f"{split_image(base)[0]}:{version}"


class AwsProvider(Provider):
    """Base of the AWS types: settings checked at start, one session, clients per service."""

    settings_model: type[AwsSettings] = AwsSettings

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        try:
            self.settings = self.settings_model.model_validate(config.settings)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            key = str(err["loc"][0]) if err["loc"] else "type"
            if err["type"] == "extra_forbidden":
                raise self.config_error(key, f"unknown key for a {self.type} provider") from None
            message = str(err["msg"]).removeprefix("Value error, ")
            raise self.config_error(key, message) from None
        try:
            self.session = boto3.Session(
                profile_name=self.settings.profile, region_name=self.settings.region
            )
        except botocore.exceptions.BotoCoreError as exc:  # e.g. ProfileNotFound
            raise self.config_error("profile", str(exc)) from None
        if self.session.region_name is None:
            raise self.config_error(
                "region", "no region: set it here or in AWS_REGION / the profile"
            )
        self.region: str = self.session.region_name
        self.poll_interval = self.settings.poll_interval
        self._boto_config = BotoConfig(
            retries={"mode": "standard", "max_attempts": self.settings.max_attempts},
            connect_timeout=10,
            read_timeout=60,
            user_agent_extra="reconciler",
        )
        # Undo calls at a deadline or a cancel: one attempt each, the fallback comes at once.
        self._once_config = self._boto_config.merge(
            BotoConfig(retries={"mode": "standard", "max_attempts": 1})
        )
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()  # a boto3 Session is not thread-safe; clients are
        self._credential_values: list[str] | None = None

    def client(self, service: str, *, retry: bool = True) -> Any:
        """The (cached) client of an AWS service; first made in a worker thread.
        `retry=False`: a client that tries each call once (for undo paths)."""
        key = service if retry else f"{service}/once"
        with self._lock:
            found = self._clients.get(key)
            if found is None:
                found = self._clients[key] = self.session.client(
                    service,  # type: ignore[call-overload]
                    endpoint_url=self.settings.endpoint_url,
                    config=self._boto_config if retry else self._once_config,
                )
            return found

    @property
    def sts(self) -> STSClient:
        client: STSClient = self.client("sts")
        return client

    async def call(self, fn: Callable[[], T]) -> T:
        """Run one boto3 call (or a few) in a worker thread; AWS errors become AwsError,
        with the credentials redacted (an error may echo the access key, and validation
        messages are recorded as they are)."""
        return await asyncio.to_thread(self._guarded, fn)

    def _guarded(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            err = aws_error(exc)
            raise AwsError(Redactor(self.secrets())(str(err)), err.code) from None

    async def credentials_check(self) -> Check:
        try:
            who = await self.call(self.sts.get_caller_identity)
        except AwsError as exc:
            return Check("credentials", False, str(exc))
        return Check("credentials", True, str(who.get("Arn", "")))

    def secrets(self) -> list[str]:
        """The resolved AWS credentials too: an error text that echoes them is redacted."""
        with self._lock:  # the chain is resolved once, as boto3 itself does
            if self._credential_values is None:
                values: list[str] = []
                try:
                    creds = self.session.get_credentials()
                    if creds is not None:
                        frozen = creds.get_frozen_credentials()
                        values = [
                            v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v
                        ]
                except botocore.exceptions.BotoCoreError:
                    values = []
                self._credential_values = values
            resolved = self._credential_values
        return [*super().secrets(), *(v for v in resolved if len(v) >= 4)]


def strategy_problems(
    model: type[BaseModel], strategy: Mapping[str, Any]
) -> Iterable[tuple[tuple[str | int, ...], str]]:
    """A strategy's parameters checked by a model, as (key path, message) problems."""
    try:
        model.model_validate(dict(strategy))
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc: tuple[str | int, ...] = ("strategy", *err["loc"])
            if err["type"] == "extra_forbidden":
                yield (*loc, "[key]"), f"unknown key '{err['loc'][-1]}' for {strategy.get('type')}"
            else:
                yield loc, str(err["msg"]).removeprefix("Value error, ")
