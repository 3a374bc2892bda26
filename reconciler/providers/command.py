"""The `command` provider (SPEC §6): run any program, no shell, in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reconciler.config import ProviderConfig
from reconciler.providers.base import (
    _SECRET_KEY,
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Provider,
    Validation,
)
from reconciler.providers.process import MARKER_DEPLOYMENT, MARKER_LEDGER, killpg

STDERR_TAIL = 5
# Output is read in chunks of this size; a line is held up to READ_LIMIT bytes (the run's
# log cuts it at 16 KiB after redaction; the slack keeps a secret across the cut whole).
CHUNK = 64 * 1024
READ_LIMIT = 32 * 1024
# After the leader exits, output still in the pipes gets this long before the group ends.
READER_GRACE_SECONDS = 1.0
# How long a SIGKILLed leader may take to be reaped before the run ends without it.
KILLED_EXIT_SECONDS = 5.0
# What a command inherits from the daemon (SPEC §6); everything else is built.
INHERITED_ENV = frozenset({"PATH", "HOME", "LANG", "TZ"})


_BRACED_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: str) -> str:
    """``${NAME}`` replaced by the daemon's variable; unset ones are left as written."""
    return _BRACED_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)


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
    reports_process = True  # `deploy` reports its process group right after the spawn
    reader_grace = READER_GRACE_SECONDS

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
        # `${VAR}` of the daemon's environment, as in paths: the one way to hand a command
        # something of the daemon's (e.g. "${CREDENTIALS_DIRECTORY}/deploy-token").
        self.env: dict[str, str] = {str(k): _expand(v) for k, v in env.items()}
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

    def secrets(self) -> list[str]:
        """Also the expanded values: `API_TOKEN = "${TOKEN}"` is redacted as the token."""
        expanded = [v for k, v in self.env.items() if _SECRET_KEY.search(k) and len(v) >= 4]
        return [*super().secrets(), *expanded]

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
                MARKER_DEPLOYMENT: str(req.deployment_id),
                "RECONCILER_COMMIT": req.commit or "",
                "RECONCILER_TIMEOUT": str(req.timeout_seconds),
                "RECONCILER_STRATEGY": json.dumps(dict(req.strategy), sort_keys=True),
            }
        )
        if req.ledger_id:  # with the deployment id: how recovery finds the run's processes
            env[MARKER_LEDGER] = req.ledger_id
        return env

    def _base_environment(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> dict[str, str]:
        """What every program this provider runs sees: built, not inherited — the daemon's
        settings (its database URL) and credentials never reach a command, nor a log that
        prints its environment. The allowlisted host variables, `env`, the environment and
        service names, and the params as RECONCILER_PARAM_*."""
        # Names first, values of the few kept: reading every value (``items()``) decodes
        # the whole environment at each deployment (issue 12).
        environ = os.environ
        env = {k: environ[k] for k in environ if k in INHERITED_ENV or k.startswith("LC_")}
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
            killpg(proc.pid, signal.SIGKILL)  # a reading has no grace: end the whole group
            await proc.wait()
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
        loop = asyncio.get_running_loop()
        spawn = asyncio.ensure_future(
            loop.subprocess_exec(
                lambda: _Protocol(CHUNK, loop),
                *self.argv(req),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(req),
                cwd=self.workdir,
                start_new_session=True,  # its own process group: a stop ends the children too
            )
        )
        try:
            transport, protocol = await asyncio.shield(spawn)
        except OSError as exc:
            raise DeploymentFailed(f"cannot start {self.command[0]}: {exc.strerror}") from None
        except asyncio.CancelledError:
            # Stopped while starting: asyncio would kill the leader alone, so the command is
            # let start and then stopped like any run (SIGKILLed if cancelled once more).
            try:
                await asyncio.wait([spawn])
            except asyncio.CancelledError:
                spawn.add_done_callback(_kill_spawned)
                raise
            if not spawn.cancelled() and spawn.exception() is None:
                started, started_protocol = spawn.result()
                try:
                    await self._stop(started_protocol, started.get_pid(), ctx.kill_grace)
                finally:
                    started.close()
            raise
        pgid = transport.get_pid()
        tail: deque[str] = deque(maxlen=STDERR_TAIL)
        readers: list[asyncio.Task[None]] = []
        try:
            await ctx.process_started(pgid)
            assert protocol.stdout is not None and protocol.stderr is not None
            readers = [
                asyncio.create_task(self._read(protocol.stdout, "stdout", ctx, tail)),
                asyncio.create_task(self._read(protocol.stderr, "stderr", ctx, tail)),
            ]
            # The leader's exit ends the run, not the end of its output: a background child
            # may hold the pipes open for good. A reader's error (the store gave up) stops it.
            waiting: set[asyncio.Future[None]] = {protocol.exited, *readers}
            while not protocol.exited.done():
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            code = transport.get_returncode()
            # Output still in the pipes gets a moment; then nothing of the run outlives it.
            await asyncio.wait(readers, timeout=self.reader_grace)
            killpg(pgid, signal.SIGKILL)
            unfinished = [r for r in readers if not r.done()]
            if unfinished:  # a process outside the group holds the pipes
                await asyncio.wait(unfinished, timeout=self.reader_grace)
            for r in readers:
                if r.done():
                    r.result()
        except BaseException:
            await self._stop(protocol, pgid, ctx.kill_grace)
            raise
        finally:
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            transport.close()
        assert code is not None
        if code != 0:
            what = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
            last = " | ".join(line.strip() for line in tail if line.strip())
            raise DeploymentFailed(
                f"{self.command[0]} failed with {what}" + (f": {last}" if last else "")
            )

    async def _read(
        self, stream: asyncio.StreamReader, name: str, ctx: DeployContext, tail: deque[str]
    ) -> None:
        """Read in chunks (a line of any length costs at most READ_LIMIT bytes of memory);
        a progress line is reported before the next chunk is read, so a slow store slows
        the command down instead of filling memory."""
        lines = LineSplitter(READ_LIMIT)
        while True:
            chunk = await stream.read(CHUNK)
            for raw, cut in lines.feed(chunk) if chunk else lines.end():
                line = raw.decode("utf-8", "replace").rstrip("\r")
                ctx.log(line, name, cut)
                if name == "stderr":
                    tail.append(line)
                elif not cut and line.endswith("}"):
                    event = parse_progress(line)
                    if event is not None:
                        await ctx.report_progress(event[0], event[1], event[2])
            if not chunk:
                return

    @staticmethod
    async def _stop(protocol: _Protocol, pgid: int, grace: float) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds (SPEC §4 rule 7).

        The SIGKILL is in ``finally``: a second cancellation (a second Ctrl-C) during the
        grace ends the group at once instead of leaving it running.
        """
        try:
            if not protocol.exited.done():
                killpg(pgid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(protocol.exited), grace)
        finally:
            killpg(pgid, signal.SIGKILL)  # also leftover children of a finished leader
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(protocol.exited), KILLED_EXIT_SECONDS)


def _kill_spawned(spawn: asyncio.Future[tuple[asyncio.SubprocessTransport, _Protocol]]) -> None:
    if not spawn.cancelled() and spawn.exception() is None:
        transport = spawn.result()[0]
        killpg(transport.get_pid(), signal.SIGKILL)
        transport.close()


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol plus a future for the leader's exit: `Process.wait()` also
    waits for the pipes to close, which a background child can put off until the deadline."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class LineSplitter:
    """Splits a byte stream into lines, keeping at most ``limit`` bytes of each line and
    counting what it cut, so a line of any length neither fills memory nor swallows the
    lines after it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._cut = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        parts = data.split(b"\n")
        out: list[tuple[bytes, int]] = []
        for part in parts[:-1]:
            if self._buf or self._cut:
                self._add(part)
                out.append((bytes(self._buf), self._cut))
                self._buf.clear()
                self._cut = 0
            elif len(part) > self.limit:
                out.append((part[: self.limit], len(part) - self.limit))
            else:
                out.append((part, 0))
        self._add(parts[-1])
        return out

    def end(self) -> list[tuple[bytes, int]]:
        """The last line, if the output did not end with a newline."""
        if not self._buf and not self._cut:
            return []
        line = (bytes(self._buf), self._cut)
        self._buf.clear()
        self._cut = 0
        return [line]

    def _add(self, part: bytes) -> None:
        room = max(self.limit - len(self._buf), 0)
        if len(part) > room:
            self._buf += part[:room]
            self._cut += len(part) - room
        else:
            self._buf += part


def _substitute(template: list[str], values: Mapping[str, str]) -> list[str]:
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out
