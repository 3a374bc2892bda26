"""The schema of one environment file (SPEC §2), as frozen pydantic models.

The models expect text-first input (every YAML scalar a ``str``, see :mod:`.yamltext`)
and convert per field: durations to seconds, ``suspended`` from ``true`` / ``false``.
They also accept the natural Python values (ints, bools) when built from code.
"""

from __future__ import annotations

import re
import zoneinfo
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .durations import parse_duration

__all__ = [
    "NAME_RE",
    "SERVICE_RE",
    "VERSION_RE",
    "EnvironmentSpec",
    "Service",
    "Strategy",
    "Window",
]

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
SERVICE_RE = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"

_NAME = re.compile(NAME_RE)
_SERVICE = re.compile(SERVICE_RE)
_VERSION = re.compile(VERSION_RE)

DURATION_PATTERN = r"^([0-9]+|([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?)$"

STRATEGY_TYPES = ("rolling", "blue_green", "canary")


def _error(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    # The message travels in the context so that braces in user text are never a template.
    return PydanticCustomError(kind, "{message}", {"message": message, **ctx})


def _describe(value: object) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"'{value}'"


# --- field types -------------------------------------------------------------------------


def _check_env_name(value: str) -> str:
    if _NAME.fullmatch(value) is None:
        raise _error(
            "environment_name",
            f"'{value}' is not a valid environment name: use lowercase letters, digits and -"
            " (at most 63, starting and ending with a letter or digit)",
        )
    return value


def _check_service_name(value: str) -> str:
    if _SERVICE.fullmatch(value) is None:
        raise _error(
            "service_name",
            f"'{value}' is not a valid service name: use letters, digits and . _ -"
            " (at most 63, starting and ending with a letter or digit)",
        )
    return value


def _check_version(value: str) -> str:
    if _VERSION.fullmatch(value) is None:
        if len(value) > 128:
            raise _error("version", f"'{value[:40]}...' is too long for a version: at most 128")
        raise _error(
            "version", f"'{value}' is not a valid version: use letters, digits and . _ + -"
        )
    return value


def _to_seconds(value: Any) -> int:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _error(
            "duration",
            f"expected a duration (seconds or 90s / 30m / 2h), got {_describe(value)}",
        )
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _error("duration", str(exc)) from None
    if seconds <= 0:
        raise _error("duration", f"bad duration '{value}': must be longer than 0 seconds")
    return seconds


def _text_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value == "true":
        return True
    if value == "false":
        return False
    raise _error("boolean", f"expected true or false, got {_describe(value)}")


def _none_as(default: Any) -> BeforeValidator:
    """An empty YAML value (``params:`` with every line commented out) means the default."""

    def convert(value: Any) -> Any:
        return default() if value is None else value

    return BeforeValidator(convert)


@lru_cache(maxsize=256)
def _cron_problem(expr: str) -> str | None:
    from croniter import croniter

    if len(expr.split()) != 5:
        return (
            f"'{expr}' is not a cron expression of 5 fields"
            " (minute hour day-of-month month day-of-week)"
        )
    try:
        croniter(expr)
    except Exception as exc:  # croniter raises several kinds, all "bad expression"
        detail = ": out of range" if "out of range" in str(exc) else ""
        return f"'{expr}' is not a valid cron expression{detail}"
    return None


def _check_cron(value: str) -> str:
    problem = _cron_problem(value)
    if problem is not None:
        raise _error("cron", problem)
    return value


@lru_cache(maxsize=256)
def _timezone_ok(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _check_timezone(value: str | None) -> str | None:
    if value is not None and not _timezone_ok(value):
        raise _error("timezone", f"unknown timezone '{value}': use an IANA name like Europe/Paris")
    return value


_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": DURATION_PATTERN, "minLength": 1},
    ],
}

EnvName = Annotated[
    str,
    AfterValidator(_check_env_name),
    WithJsonSchema({"type": "string", "pattern": NAME_RE}),
]
ServiceName = Annotated[
    str,
    AfterValidator(_check_service_name),
    WithJsonSchema({"type": "string", "pattern": SERVICE_RE}),
]
Version = Annotated[
    str,
    AfterValidator(_check_version),
    WithJsonSchema(
        {
            # Tools that read YAML with implicit types see `1.10` as a number; we read it
            # as the text "1.10". Both are therefore accepted here.
            "anyOf": [{"type": "string", "pattern": VERSION_RE}, {"type": "number"}],
        }
    ),
]
Duration = Annotated[int, BeforeValidator(_to_seconds), WithJsonSchema(_DURATION_SCHEMA)]
TextBool = Annotated[
    bool,
    BeforeValidator(_text_bool),
    WithJsonSchema({"enum": [True, False, "true", "false"]}),
]


# --- models ------------------------------------------------------------------------------


class Window(BaseModel):
    """Deployments start only while a window is open: from each cron time, for ``duration``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: Annotated[str, AfterValidator(_check_cron)] = Field(
        description="5-field cron expression (minute hour day-of-month month day-of-week);"
        " names like mon-fri are allowed",
        examples=["0 9 * * mon-fri"],
    )
    duration: Duration = Field(
        description="how long the window stays open: seconds or 90s / 30m / 2h / 1d",
        examples=["8h"],
    )
    timezone: Annotated[str | None, AfterValidator(_check_timezone)] = Field(
        default=None,
        description="IANA timezone of the cron expression; default: the daemon's timezone",
        examples=["Europe/Paris"],
    )


class Strategy(BaseModel):
    """How a provider rolls a version out; other keys are parameters kept as written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: Literal["rolling", "blue_green", "canary"] = Field(
        default="rolling",
        description="rolling | blue_green | canary; a provider may refuse a type",
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Service(BaseModel):
    """One deployable unit of an environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Version = Field(
        description="the version to deploy; always read as text (1.10 is '1.10')",
        examples=["1.4.2"],
    )
    params: Annotated[dict[str, Any], _none_as(dict)] = Field(
        default_factory=dict,
        description="provider-specific parameters, checked by the provider",
    )


class EnvironmentSpec(BaseModel):
    """One environment file: which version of each service runs in one environment."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="reconciler environment",
    )

    environment: EnvName = Field(
        description="the environment's name, unique in the repository", examples=["production"]
    )
    provider: Annotated[str, Field(min_length=1)] = Field(
        description="a provider name declared in the daemon configuration",
        examples=["k8s-prod"],
    )
    services: Annotated[dict[ServiceName, Service], Field(min_length=1)] = Field(
        description="at least one service; deployed in the order written",
    )
    timeout: Duration = Field(
        default=1800,
        description="deadline of one deployment: seconds or 90s / 30m / 2h / 1d",
    )
    strategy: Annotated[Strategy, _none_as(Strategy)] = Field(
        default_factory=Strategy,
        description="rollout strategy; other keys are parameters checked by the provider",
    )
    on_failure: Literal["stop", "rollback"] = Field(
        default="stop",
        description="stop: leave the failed version; rollback: deploy the previous version",
    )
    depends_on: Annotated[list[EnvName], _none_as(list)] = Field(
        default_factory=list,
        description="a version reaches this environment only after the same version of the"
        " same service completed in each listed environment",
        json_schema_extra={"uniqueItems": True},
    )
    windows: Annotated[list[Window], _none_as(list)] = Field(
        default_factory=list,
        description="deployments start only inside one of these windows (none: any time)",
    )
    suspended: TextBool = Field(default=False, description="true: record drift, deploy nothing")
    self_heal: TextBool = Field(
        default=False,
        description="true: a service whose live version drifted from the deployed one is"
        " redeployed (trigger drift)",
    )

    @field_validator("depends_on")
    @classmethod
    def _check_depends_on(cls, value: list[str], info: ValidationInfo) -> list[str]:
        own = info.data.get("environment")
        seen: set[str] = set()
        problems: list[tuple[int, str]] = []
        for index, name in enumerate(value):
            if name == own:
                problems.append((index, f"'{name}' cannot depend on itself"))
            elif name in seen:
                problems.append((index, f"'{name}' is listed twice"))
            seen.add(name)
        if problems:
            # One error for pydantic; the loader reports each item at its own position.
            raise _error("depends_on", problems[0][1], index=problems[0][0], items=problems)
        return value

    def strategy_dict(self) -> dict[str, Any]:
        """``{"type": ..., **params}``, as deployment records store it."""
        return {"type": self.strategy.type, **(self.strategy.model_extra or {})}
