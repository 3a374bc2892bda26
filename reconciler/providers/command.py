"""The `command` provider (SPEC §6): run any program, no shell, in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reconciler.config import ProviderConfig
from reconciler.providers.base import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Provider,
    Validation,
)

STDERR_TAIL = 5
# Lines longer than this are cut in the log: a runaway program must not fill the database.
MAX_LINE = 64 * 1024


def _param_env_name(key: str) -> str:
    return "RECONCILER_PARAM_" + key.upper().replace("-", "_")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_progress(line: str) -> tuple[int, str, dict[str, Any]] | None:
    """A stdout line that is a JSON object with integer `progress` 0–100 and string `message`."""
    s = line.strip()
    if not (s.startswith("{") and s.endswith("}")):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    progress, message = obj.get("progress"), obj.get("message")
    if isinstance(progress, bool) or not isinstance(progress, int) or not isinstance(message, str):
        return None
    if not 0 <= progress <= 100:
        return None
    details = {k: v for k, v in obj.items() if k not in ("progress", "message")}
    return progress, message, details


class CommandProvider(Provider):
    type = "command"

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        s = config.settings
        command = s.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) for c in command)
        ):
            raise self.config_error("command", "expected a non-empty list of strings")
        self.command: list[str] = command
        env = s.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise self.config_error("env", "expected a table of strings")
        self.env: dict[str, str] = {str(k): v for k, v in env.items()}
        workdir = s.get("workdir")
        if workdir is not None and not isinstance(workdir, str):
            raise self.config_error("workdir", "expected a path")
        self.workdir: Path | None = self.resolve(workdir) if workdir else None
        strategies = s.get("strategies", ["rolling", "blue_green", "canary"])
        if not isinstance(strategies, list) or not all(isinstance(x, str) for x in strategies):
            raise self.config_error("strategies", "expected a list of strategy names")
        self._strategies = frozenset(strategies)
        probe = s.get("current_version_command")
        if probe is not None and (
            not isinstance(probe, list) or not probe or not all(isinstance(c, str) for c in probe)
        ):
            raise self.config_error(
                "current_version_command", "expected a non-empty list of strings"
            )
        self.current_version_command: list[str] | None = probe
        # For the drift monitor: without the setting there is nothing to ask.
        self.reads_live_version = probe is not None
        timeout = s.get("current_version_timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise self.config_error("current_version_timeout", "expected a number of seconds")
        self.current_version_timeout = float(timeout)
        unknown = set(s) - {
            "command",
            "env",
            "workdir",
            "strategies",
            "current_version_command",
            "current_version_timeout",
        }
        if unknown:
            raise self.config_error(sorted(unknown)[0], "unknown key for a command provider")

    def supported_strategies(self) -> frozenset[str]:
        return self._strategies

    def argv(self, req: DeployRequest) -> list[str]:
        return _substitute(
            self.command,
            {
                "{environment}": req.environment,
                "{service}": req.service,
                "{version}": req.version,
                "{previous_version}": req.previous_version or "",
            },
        )

    def environment(self, req: DeployRequest) -> dict[str, str]:
        env = self._base_environment(req.environment, req.service, req.params)
        env.update(
            {
                "RECONCILER_VERSION": req.version,
                "RECONCILER_PREVIOUS_VERSION": req.previous_version or "",
                "RECONCILER_DEPLOYMENT_ID": str(req.deployment_id),
                "RECONCILER_COMMIT": req.commit or "",
                "RECONCILER_TIMEOUT": str(req.timeout_seconds),
                "RECONCILER_STRATEGY": json.dumps(dict(req.strategy), sort_keys=True),
            }
        )
        return env

    def _base_environment(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> dict[str, str]:
        """What every program this provider runs sees: the host's environment, `env`, the
        environment and service names, and the params as RECONCILER_PARAM_*."""
        env = dict(os.environ)
        env.update(self.env)
        env["RECONCILER_ENVIRONMENT"] = environment
        env["RECONCILER_SERVICE"] = service
        for key, value in params.items():
            env[_param_env_name(key)] = _text(value)
        return env

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        """The first line `current_version_command` prints (None without the setting, or
        when it prints nothing). A failure or the timeout raises: the version is unknown."""
        if self.current_version_command is None:
            return None
        argv = _substitute(
            self.current_version_command,
            {"{environment}": environment, "{service}": service},
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._base_environment(environment, service, params),
                cwd=self.workdir,
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeError(f"cannot start {argv[0]}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.current_version_timeout)
        except BaseException:
            await self._stop(proc, 0.0)
            raise
        if proc.returncode != 0:
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise RuntimeError(
                f"{argv[0]} failed with exit status {proc.returncode}"
                + (f": {last[0]}" if last[0] else "")
            )
        lines = [ln.strip() for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[0] if lines else None

    def _program(self, argv0: str) -> str | None:
        if "/" in argv0:
            p = Path(argv0) if Path(argv0).is_absolute() else (self.workdir or Path.cwd()) / argv0
            return str(p) if os.access(p, os.X_OK) and p.is_file() else None
        return shutil.which(argv0)

    async def validate(self, request: DeployRequest) -> Validation:
        base = await super().validate(request)
        argv0 = self.argv(request)[0]
        found = self._program(argv0) is not None
        checks = [
            *base.checks,
            Check("executable", found, "" if found else f"{argv0}: not found or not executable"),
        ]
        if self.workdir is not None:
            ok = self.workdir.is_dir()
            checks.append(Check("workdir", ok, "" if ok else f"{self.workdir}: no such directory"))
        return Validation(tuple(checks))

    async def deploy(self, ctx: DeployContext) -> None:
        req = ctx.request
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(req),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(req),
                cwd=self.workdir,
                start_new_session=True,  # its own process group: a deadline kills the children too
                limit=MAX_LINE,
            )
        except OSError as exc:
            raise DeploymentFailed(f"cannot start {self.command[0]}: {exc.strerror}") from None
        tail: deque[str] = deque(maxlen=STDERR_TAIL)
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(self._read(proc.stdout, "stdout", ctx, tail)),
            asyncio.create_task(self._read(proc.stderr, "stderr", ctx, tail)),
        ]
        try:
            await asyncio.gather(*readers)
            code = await proc.wait()
        except BaseException:
            await self._stop(proc, ctx.kill_grace)
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            raise
        if code != 0:
            what = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
            last = " | ".join(line.strip() for line in tail if line.strip())
            raise DeploymentFailed(
                f"{self.command[0]} failed with {what}" + (f": {last}" if last else "")
            )

    async def _read(
        self, stream: asyncio.StreamReader, name: str, ctx: DeployContext, tail: deque[str]
    ) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than MAX_LINE: keep its start
                raw = await stream.read(MAX_LINE)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            ctx.log(line, name)
            if name == "stderr":
                tail.append(line)
            else:
                event = parse_progress(line)
                if event is not None:
                    await ctx.report_progress(event[0], event[1], event[2])

    @staticmethod
    async def _stop(proc: asyncio.subprocess.Process, grace: float) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace` seconds (SPEC §4 rule 7)."""
        if proc.returncode is not None:
            _killpg(proc.pid, signal.SIGKILL)  # leftover children of a finished leader
            return
        _killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        _killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _substitute(template: list[str], values: Mapping[str, str]) -> list[str]:
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
