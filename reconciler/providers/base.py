"""The provider interface: what every executor type (command, docker, kubernetes, ...) implements.

Providers know nothing of the store or the scheduler. They receive a :class:`DeployContext`
that carries the request and the ways to talk back (progress, log) and to learn that they
must stop (the deadline, cancellation: their task is cancelled, and they clean up in
``finally``/``except CancelledError`` before re-raising).
"""

from __future__ import annotations

import abc
import builtins
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from desired_state import EnvironmentSpec
from reconciler.config import ConfigError, ProviderConfig


class DeploymentFailed(Exception):
    """The run ended unsuccessfully; the message becomes the record's error_message."""


@dataclass(frozen=True)
class DeployRequest:
    environment: str
    service: str
    version: str
    previous_version: str | None
    deployment_id: int
    commit: str | None
    timeout_seconds: int
    strategy: Mapping[str, Any]
    params: Mapping[str, Any]
    trigger: str
    # The identity of the database's ledger, for the marker a run's processes carry
    # (`process.MARKER_LEDGER`): "" where the executor did not ask for it.
    ledger_id: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "message": self.message}


@dataclass(frozen=True)
class Validation:
    checks: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}

    def failure_message(self) -> str:
        bad = [f"{c.name}: {c.message}" if c.message else c.name for c in self.checks if not c.ok]
        return "validation failed: " + "; ".join(bad)


ProgressFn = Callable[[int | None, str, Mapping[str, Any] | None], Awaitable[None]]
LogFn = Callable[[str, str, int], None]
ProcessFn = Callable[[int], Awaitable[None]]


@dataclass
class DeployContext:
    request: DeployRequest
    deadline: float  # time.monotonic() value at which the run is stopped
    _progress: ProgressFn
    _log: LogFn
    kill_grace: float = 10.0
    _process: ProcessFn | None = None

    async def report_progress(
        self, percent: int | None, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        await self._progress(percent, message, details)

    def log(self, line: str, stream: str = "stdout", cut: int = 0) -> None:
        """One output line; ``cut``: bytes of it the provider did not keep (a line too long
        to hold). The run's log applies its own cap (SPEC §6)."""
        self._log(stream, line, cut)

    async def process_started(self, pgid: int) -> None:
        """A process group now runs for this deployment: recorded before anything else, so
        that a restart after a crash can end it (SPEC §4 rule 8)."""
        if self._process is not None:
            await self._process(pgid)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


_SECRET_KEY = re.compile(r"token|secret|password|passwd|credential|api_?key", re.IGNORECASE)

Problem = tuple[Sequence[str | int], str]  # (key path in the environment file, message)


def _pydantic_problems(prefix: tuple[str | int, ...], exc: ValidationError) -> list[Problem]:
    out: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        if err["type"] == "extra_forbidden":
            message = f"unknown key '{err['loc'][-1]}'"
            loc = (*loc, "[key]")
        elif err["type"] == "missing":  # placed at the nearest node that exists
            message = "required key missing"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        out.append((loc, message))
    return out


class Provider(abc.ABC):
    """A configured provider instance (one `[providers.NAME]` table)."""

    type: ClassVar[str]
    # The pydantic model of a service's `params` for this type (extra="forbid" recommended).
    # Values arrive as YAML text ("8080", "true"): pydantic's lax mode converts them.
    params_model: ClassVar[builtins.type[BaseModel] | None] = None
    # Strategy types this provider accepts (a per-instance override: supported_strategies).
    strategies: ClassVar[frozenset[str]] = frozenset({"rolling"})
    # `deploy` calls `ctx.process_started` as soon as its process runs (the command
    # provider): the executor then records `in_progress` with the process group in one
    # write, or with the terminal status when the process is gone by then. A provider that
    # may not call it must leave this False (its `in_progress` is written before `deploy`).
    reports_process: ClassVar[bool] = False

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        self.name = name
        self.config = config
        self.base_dir = base_dir
        self._secret_values: list[str] = []  # read from token files: redacted everywhere

    def config_error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"providers.{self.name}.{key}: {message}")

    def resolve(self, path: str) -> Path:
        """Like Config.resolve: `~` and `${VARS}` (e.g. ${CREDENTIALS_DIRECTORY}) expanded."""
        p = Path(os.path.expandvars(path)).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def read_token(self, key: str = "token_file") -> str | None:
        """The secret in the file named by setting `key` (None when the setting is absent).

        Read at start and at reload (a new instance); the value is redacted from logs."""
        path = self.config.settings.get(key)
        if path is None:
            return None
        if not isinstance(path, str) or not path:
            raise self.config_error(key, "expected a file path")
        file = self.resolve(path)
        try:
            value = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise self.config_error(key, f"cannot read {file}: {exc.strerror}") from None
        if not value:
            raise self.config_error(key, f"{file} is empty")
        self._secret_values.append(value)
        return value

    def supported_strategies(self) -> frozenset[str]:
        return self.strategies

    def params(self, params: Mapping[str, Any]) -> Any:
        """A service's params as this type's model (checked already at sync/validate)."""
        if self.params_model is None:
            return dict(params)
        return self.params_model.model_validate(dict(params))

    def check_strategy(self, strategy: Mapping[str, Any]) -> Iterable[Problem]:
        """Problems with the strategy's parameters; the type itself is checked already."""
        return ()

    def check_spec(self, spec: EnvironmentSpec) -> list[Problem]:
        """What this provider refuses in an environment file: an unsupported strategy, bad
        strategy parameters, params that do not match `params_model`. Reported by
        `reconciler validate` and by a sync as ``file:line:col: key.path: message``."""
        problems: list[Problem] = []
        kind = spec.strategy.type
        supported = self.supported_strategies()
        if kind not in supported:
            problems.append(
                (
                    ("strategy", "type"),
                    f"provider '{self.name}' ({self.type}) supports "
                    f"{', '.join(sorted(supported))}, not {kind}",
                )
            )
        else:
            problems.extend(self.check_strategy(spec.strategy_dict()))
        if self.params_model is not None:
            for name, service in spec.services.items():
                try:
                    self.params_model.model_validate(dict(service.params))
                except ValidationError as exc:
                    problems.extend(_pydantic_problems(("services", name, "params"), exc))
        return problems

    async def validate(self, request: DeployRequest) -> Validation:
        """Checks before the run; the default checks the strategy. Recorded in `validation`."""
        kind = str(request.strategy.get("type", "rolling"))
        supported = self.supported_strategies()
        ok = kind in supported
        msg = "" if ok else f"{self.type} supports {', '.join(sorted(supported))}, not {kind}"
        return Validation((Check("strategy", ok, msg),))

    @abc.abstractmethod
    async def deploy(self, ctx: DeployContext) -> None:
        """Bring the service to the version; raise DeploymentFailed on failure."""

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        """The version actually running, where the target can tell (for drift); None: unknown."""
        return None

    def secrets(self) -> list[str]:
        """Values to redact from logs: settings whose key looks secret, and token files."""
        out: list[str] = []
        for key, value in self.config.settings.items():
            if isinstance(value, str) and _SECRET_KEY.search(key):
                out.append(value)
            if isinstance(value, dict):
                out.extend(str(v) for k, v in value.items() if _SECRET_KEY.search(str(k)))
        out.extend(self._secret_values)
        return [s for s in out if len(s) >= 4]


@dataclass
class Redactor:
    secrets: list[str] = field(default_factory=list)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text
