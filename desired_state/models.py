"""The schema of one environment file (SPEC §2), as frozen pydantic models.

The models expect text-first input (every YAML scalar a ``str``, see :mod:`.yamltext`)
and convert per field: durations to seconds, ``suspended`` from ``true`` / ``false``.
They also accept the natural Python values (ints, bools) when built from code.

Every check they run is a function of :mod:`.checks`, which `validate DIR` also runs
without Pydantic through :mod:`.format_schema`, generated from these models: after
changing a model or a check, run ``scripts/gen_format_schema.py``
(``tests/test_validate_format.py`` fails until then).
"""

from __future__ import annotations

import weakref
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    WithJsonSchema,
    model_validator,
)

from .checks import (
    DURATION_PATTERN,
    MAX_PARAM_BYTES,
    MAX_PARAMS_BYTES,
    MAX_STEPS,
    MAX_TIMEOUT,
    MAX_WINDOW,
    NAME_RE,
    PARAM_KEY_RE,
    SERVICE_RE,
    STRATEGY_TYPES,
    VERSION_RE,
    check_cron,
    check_depends_on,
    check_env_name,
    check_params,
    check_service_name,
    check_strategy,
    check_timezone,
    check_version,
    none_as_dict,
    none_as_list,
    text_bool,
    timeout_seconds,
    window_seconds,
)

__all__ = [
    "DURATION_PATTERN",
    "MAX_PARAMS_BYTES",
    "MAX_PARAM_BYTES",
    "MAX_STEPS",
    "MAX_TIMEOUT",
    "MAX_WINDOW",
    "NAME_RE",
    "SERVICE_RE",
    "STRATEGY_TYPES",
    "VERSION_RE",
    "EnvironmentSpec",
    "Service",
    "Strategy",
    "Window",
]


def _duration_schema(maximum: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": maximum},
                {"type": "string", "pattern": DURATION_PATTERN, "minLength": 1},
            ],
        }
    )


EnvName = Annotated[
    str,
    AfterValidator(check_env_name),
    WithJsonSchema({"type": "string", "pattern": NAME_RE}),
]
ServiceName = Annotated[
    str,
    AfterValidator(check_service_name),
    WithJsonSchema({"type": "string", "pattern": SERVICE_RE}),
]
Version = Annotated[
    str,
    AfterValidator(check_version),
    WithJsonSchema(
        {
            # Tools that read YAML with implicit types see `1.10` as a number; we read it
            # as the text "1.10". Both are therefore accepted here.
            "anyOf": [{"type": "string", "pattern": VERSION_RE}, {"type": "number"}],
        }
    ),
]
Timeout = Annotated[int, BeforeValidator(timeout_seconds), _duration_schema(MAX_TIMEOUT)]
WindowDuration = Annotated[int, BeforeValidator(window_seconds), _duration_schema(MAX_WINDOW)]
TextBool = Annotated[
    bool,
    BeforeValidator(text_bool),
    WithJsonSchema({"enum": [True, False, "true", "false"]}),
]


# --- models ------------------------------------------------------------------------------


class Window(BaseModel):
    """Deployments start only while a window is open: from each cron time, for ``duration``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: Annotated[str, AfterValidator(check_cron)] = Field(
        description="5-field cron expression (minute hour day-of-month month day-of-week);"
        " names like mon-fri are allowed",
        examples=["0 9 * * mon-fri"],
    )
    duration: WindowDuration = Field(
        description="how long the window stays open: seconds or 90s / 30m / 2h / 1d; at most 366d",
        examples=["8h"],
    )
    timezone: Annotated[str | None, AfterValidator(check_timezone)] = Field(
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

    # the same function checks the generated schema's strategies (checks.py)
    _bounded = model_validator(mode="after")(check_strategy)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# A service's YAML of at most this many characters (as repr) is a key of the shared ones.
_SHARED_MAX = 2048


# Equal services are one object (Service._shared): a fleet runs the same version with the
# same params in many environments, and a daemon keeps every environment's desired state in
# memory (a model with its params is ~700 bytes; 20,000 of them were 14 MB). Services are
# frozen, so sharing is invisible, and validating a service seen before is skipped.
class Service(BaseModel):
    """One deployable unit of an environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Version = Field(
        description="the version to deploy; always read as text (1.10 is '1.10')",
        examples=["1.4.2"],
    )
    params: Annotated[
        dict[str, Any], BeforeValidator(none_as_dict), AfterValidator(check_params)
    ] = Field(
        default_factory=dict,
        description="provider-specific parameters, checked by the provider; each at most"
        " 32 KiB, 128 KiB in all",
        json_schema_extra={"propertyNames": {"pattern": PARAM_KEY_RE}},
    )

    @model_validator(mode="wrap")
    @classmethod
    def _shared(cls, data: Any, handler: ModelWrapValidatorHandler[Service]) -> Service:
        # repr of what YAML (or JSON) makes (text, numbers, None, lists, mappings) tells
        # any two different values apart, and costs a microsecond, in C.
        key = repr(data) if type(data) is dict else ""
        if not key or len(key) > _SHARED_MAX:
            return handler(data)
        found = _SERVICES.get(key)
        if found is None:
            found = handler(data)  # raises for an invalid one, which is never kept
            _SERVICES[key] = found
        return found


# Every service alive, by its YAML; an entry goes with the last desired state using it.
_SERVICES: weakref.WeakValueDictionary[str, Service] = weakref.WeakValueDictionary()


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
    timeout: Timeout = Field(
        default=1800,
        description="deadline of one deployment: seconds or 90s / 30m / 2h / 1d; at most 7d",
    )
    strategy: Annotated[Strategy, BeforeValidator(none_as_dict)] = Field(
        default_factory=Strategy,
        description="rollout strategy; other keys are parameters checked by the provider",
    )
    on_failure: Literal["stop", "rollback"] = Field(
        default="stop",
        description="stop: leave the failed version; rollback: deploy the previous version",
    )
    depends_on: Annotated[
        list[EnvName], BeforeValidator(none_as_list), AfterValidator(check_depends_on)
    ] = Field(
        default_factory=list,
        description="a version reaches this environment only after the same version of the"
        " same service completed in each listed environment",
        json_schema_extra={"uniqueItems": True},
    )
    windows: Annotated[list[Window], BeforeValidator(none_as_list)] = Field(
        default_factory=list,
        description="deployments start only inside one of these windows (none: any time)",
    )
    suspended: TextBool = Field(default=False, description="true: record drift, deploy nothing")
    self_heal: TextBool = Field(
        default=False,
        description="true: a service whose live version drifted from the deployed one is"
        " redeployed (trigger drift)",
    )

    def strategy_dict(self) -> dict[str, Any]:
        """``{"type": ..., **params}``, as deployment records store it."""
        return {"type": self.strategy.type, **(self.strategy.model_extra or {})}
