"""The `docker` provider (PROVIDERS.md): one container per service, through the Docker Engine
API (the official `docker` SDK's low-level client, each call in a worker thread).

A deployment pulls the image as the `pull` setting says (byte counts become progress), starts
the new container under a temporary name beside the old one, waits until its HEALTHCHECK says
healthy (no healthcheck: running for `ready_seconds`), then removes the old container and
gives the new one the service's name. A new container that fails, a cancellation or the
deadline removes the new container; the old one keeps serving. `rolling` with fixed host ports
(or the host's network) must stop the old container first (the new one could not bind): on
failure the old one is started again, so it resumes serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.utils import kwargs_from_env, parse_repository_tag
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reconciler.config import ProviderConfig
from reconciler.providers.base import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Provider,
    Validation,
)

LABEL_VERSION = "reconciler.version"
LABEL_ENVIRONMENT = "reconciler.environment"
LABEL_SERVICE = "reconciler.service"
LABEL_DEPLOYMENT = "reconciler.deployment"
# The service's container name, on every container a deployment makes: one under another
# name is a new container that a killed run (the reconciler's own process) left behind, and
# the next run removes it.
LABEL_CONTAINER = "reconciler.container"

T = TypeVar("T")

PULL_SHARE = 40  # percent of the progress bar the pull takes
LOG_TAIL = 10  # lines of a failed container's output kept in the error and the run's log
SETTINGS = {"type", "host", "pull", "ready_seconds", "poll_interval", "api_timeout"}
SETTINGS |= {"username", "password_file", "registry"}


def parse_port(spec: str) -> tuple[str, int | tuple[str, int] | tuple[str] | None]:
    """`docker run -p` syntax: `80`, `8080:80`, `127.0.0.1:8080:80`, `127.0.0.1::80`, with
    an optional `/udp`. Returns (container port key, host binding for port_bindings)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"'{spec}': expected [ip:][host_port:]container_port[/proto]")
    container, _, proto = parts[-1].partition("/")
    proto = proto or "tcp"
    if not container.isdigit() or proto not in ("tcp", "udp", "sctp"):
        raise ValueError(f"'{spec}': container port must be a number, optionally /tcp or /udp")
    key = f"{int(container)}/{proto}"
    host = parts[-2] if len(parts) >= 2 else ""
    if host and not host.isdigit():
        raise ValueError(f"'{spec}': host port must be a number")
    if len(parts) == 3:
        ip = parts[0]
        return key, (ip, int(host)) if host else (ip,)
    return key, int(host) if host else None


class DockerParams(BaseModel):
    """A service's `params` for the docker type."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="image repository; deployed as image:version")
    container: str | None = Field(default=None, description="default {environment}-{service}")
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[str] = Field(default_factory=list)
    network: str | None = None
    volumes: list[str] = Field(default_factory=list)
    command: list[str] | str | None = None
    restart: Literal["no", "always", "unless-stopped", "on-failure"] = "unless-stopped"
    ready_seconds: float | None = Field(default=None, ge=0)

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_port(spec)
        return value

    @field_validator("volumes")
    @classmethod
    def _check_volumes(cls, value: list[str]) -> list[str]:
        for spec in value:
            if len(spec.split(":")) not in (2, 3):
                raise ValueError(f"'{spec}': expected source:target[:ro|rw]")
        return value

    def image_ref(self, version: str) -> str:
        """`{version}` in `image` is replaced; otherwise the version is the tag."""
        if "{version}" in self.image:
            return self.image.replace("{version}", version)
        return f"{self.image}:{version}"

    def container_name(self, environment: str, service: str) -> str:
        name = self.container or "{environment}-{service}"
        return name.replace("{environment}", environment).replace("{service}", service)

    def port_bindings(self) -> dict[int | str, Any]:
        return dict(parse_port(spec) for spec in self.ports)

    def holds_host_ports(self) -> bool:
        """Whether two containers of this service could not run side by side: a published
        fixed host port, or the host's network (every port it listens on is the host's)."""
        return self.network == "host" or any(
            isinstance(b, int) or (isinstance(b, tuple) and len(b) == 2)
            for b in self.port_bindings().values()
        )


def _explain(exc: BaseException) -> str:
    """The engine's own error text (APIError's `explanation`), not the SDK's wrapping."""
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


async def _finishing(call: Awaitable[T]) -> T:
    """Await a call made in a worker thread; if the run is cancelled meanwhile, wait for the
    call to end before re-raising. A thread cannot be stopped: this way the engine's state
    (a container created or not) is settled when the cleanup looks at it."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
        raise


def _is_layer_status(status: str) -> bool:
    return status in (
        "Pulling fs layer",
        "Waiting",
        "Downloading",
        "Download complete",
        "Verifying Checksum",
        "Extracting",
        "Pull complete",
        "Already exists",
    )


class DockerProvider(Provider):
    type = "docker"
    params_model = DockerParams
    strategies = frozenset({"rolling", "blue_green"})

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        s = config.settings
        unknown = set(s) - SETTINGS
        if unknown:
            raise self.config_error(sorted(unknown)[0], "unknown key for a docker provider")
        host = s.get("host")
        if host is not None and (not isinstance(host, str) or not host):
            raise self.config_error("host", "expected a URL such as unix:///var/run/docker.sock")
        self.host: str | None = host
        pull = s.get("pull", "missing")
        if pull not in ("missing", "always", "never"):
            raise self.config_error("pull", "expected missing, always or never")
        self.pull: str = pull
        self.ready_seconds = self._seconds("ready_seconds", 5.0)
        self.poll_interval = self._seconds("poll_interval", 0.5)
        self.api_timeout = self._seconds("api_timeout", 60.0)
        username = s.get("username")
        if username is not None and not isinstance(username, str):
            raise self.config_error("username", "expected a string")
        password = self.read_token("password_file")
        if (username is None) != (password is None):
            raise self.config_error("username", "username and password_file go together")
        self.auth: dict[str, str] | None = None
        if username is not None and password is not None:
            self.auth = {"username": username, "password": password}
            registry = s.get("registry")
            if registry is not None:
                self.auth["serveraddress"] = str(registry)
        self._api: docker.APIClient | None = None
        self._api_lock = threading.Lock()

    def _seconds(self, key: str, default: float) -> float:
        value = self.config.settings.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.config_error(key, "expected a number of seconds (0 or more)")
        return float(value)

    # ---- the engine connection (worker threads) ---------------------------------------

    def _client(self) -> docker.APIClient:
        """One client per provider instance, made on first use (it asks the engine for its
        API version, so it cannot be made on the event loop or at configuration time)."""
        with self._api_lock:
            if self._api is None:
                kwargs: dict[str, Any]
                if self.host is not None:
                    kwargs = {"base_url": self.host}
                else:  # DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH, as the CLI reads them
                    kwargs = dict(kwargs_from_env())
                self._api = docker.APIClient(timeout=int(self.api_timeout), **kwargs)
            return self._api

    async def _api_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            return getattr(self._client(), method)(*args, **kwargs)

        return await _finishing(asyncio.to_thread(run))

    # ---- validate ---------------------------------------------------------------------

    async def validate(self, request: DeployRequest) -> Validation:
        base = await super().validate(request)
        checks = list(base.checks)
        try:
            version = await self._api_call("version")
        except DockerException as exc:
            where = self.host or "$DOCKER_HOST or the local socket"
            checks.append(Check("engine", False, f"{where}: {_explain(exc)}"))
            return Validation(tuple(checks))
        checks.append(Check("engine", True, f"Docker {version.get('Version', '?')}"))
        p: DockerParams = self.params(request.params)
        if self.pull == "never":
            ref = p.image_ref(request.version)
            try:
                await self._api_call("inspect_image", ref)
                checks.append(Check("image", True, ref))
            except ImageNotFound:
                checks.append(Check("image", False, f"{ref}: not present and pull = never"))
        if (
            p.network
            and p.network not in ("host", "none", "bridge", "default")
            and not (p.network.startswith("container:"))
        ):
            try:
                await self._api_call("inspect_network", p.network)
                checks.append(Check("network", True, p.network))
            except NotFound:
                checks.append(Check("network", False, f"network {p.network} not found"))
        return Validation(tuple(checks))

    # ---- deploy -----------------------------------------------------------------------

    async def deploy(self, ctx: DeployContext) -> None:
        req = ctx.request
        p: DockerParams = self.params(req.params)
        name = p.container_name(req.environment, req.service)
        ref = p.image_ref(req.version)
        try:
            await self._ensure_image(ctx, ref)
            await self._remove_leftovers(ctx, name)
            old = await self._inspect(name)
        except DockerException as exc:
            raise DeploymentFailed(_explain(exc)) from None
        old_id: str | None = old["Id"] if old else None
        old_running = bool(old and old["State"]["Running"])
        stop_first = (
            str(req.strategy.get("type", "rolling")) == "rolling"
            and old_running
            and p.holds_host_ports()
        )
        new_id: str | None = None
        created: list[str] = []  # set in the worker thread as soon as the engine made it
        old_stopped = False
        switch: asyncio.Task[None] | None = None
        try:
            if stop_first:
                assert old_id is not None
                await ctx.report_progress(PULL_SHARE + 2, f"stopping {name} (host ports)")
                ctx.log(f"stopping old container {name} to free its host ports")
                old_stopped = True
                await self._api_call("stop", old_id, timeout=int(ctx.kill_grace))
            new_name = f"{name}.next-{req.deployment_id}"
            await ctx.report_progress(PULL_SHARE + 5, f"starting {ref} as {new_name}")
            new_id = await self._create(p, req, ref, name, new_name, created)
            await self._api_call("start", new_id)
            ctx.log(f"started container {new_name} ({new_id[:12]}) from {ref}")
            await self._wait_ready(ctx, p, new_id, new_name)
            await ctx.report_progress(90, f"{new_name} is ready; switching")
            # From here the old container goes away: the switch runs to its end even if the
            # run is cancelled, so that something always serves.
            switch = asyncio.create_task(self._switch(ctx, old_id, new_id, name))
            await asyncio.shield(switch)
        except BaseException as exc:
            if switch is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(switch)
            else:
                new_id = new_id or (created[0] if created else None)
                undo = asyncio.create_task(
                    self._undo(ctx, new_id, old_id if old_stopped else None, name)
                )
                with contextlib.suppress(Exception):
                    await asyncio.shield(undo)
            if isinstance(exc, DockerException):
                raise DeploymentFailed(_explain(exc)) from None
            raise
        await ctx.report_progress(100, f"{name} runs {ref}")

    async def _inspect(self, name: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self._api_call("inspect_container", name)
        except NotFound:
            return None
        return info

    async def _ensure_image(self, ctx: DeployContext, ref: str) -> None:
        present = True
        try:
            await self._api_call("inspect_image", ref)
        except ImageNotFound:
            present = False
        if self.pull == "never" or (self.pull == "missing" and present):
            if not present:
                raise DeploymentFailed(f"image {ref} is not present and pull = never")
            await ctx.report_progress(PULL_SHARE, f"image {ref} present")
            return
        await self._pull(ctx, ref)

    async def _pull(self, ctx: DeployContext, ref: str) -> None:
        """Pull in a worker thread; its JSON messages come back through a queue. Byte counts
        of the layers (current/total) become the percentage of the pull's share."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        repo, tag = parse_repository_tag(ref)

        def put(item: dict[str, Any] | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def worker() -> None:
            try:
                stream: Iterator[dict[str, Any]] = self._client().pull(
                    repo, tag=tag, stream=True, decode=True, auth_config=self.auth
                )
                for event in stream:
                    if stop.is_set():
                        break
                    put(event)
                put(None)
            except BaseException as exc:  # handed to the loop, which raises it
                put(exc)

        await ctx.report_progress(0, f"pulling {ref}")
        thread = threading.Thread(target=worker, name=f"pull:{ref}", daemon=True)
        thread.start()
        # layer id -> [bytes downloaded, bytes in all (0: not known yet), finished]
        layers: dict[str, list[int]] = {}
        last_percent = -1
        last_status: dict[str, str] = {}
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, DockerException):
                        raise DeploymentFailed(f"pull {ref}: {_explain(item)}")
                    raise item
                if "error" in item:
                    raise DeploymentFailed(f"pull {ref}: {item['error']}")
                status = str(item.get("status", ""))
                layer = str(item.get("id", ""))
                if status != last_status.get(layer):  # one log line per layer and step
                    last_status[layer] = status
                    ctx.log(f"{layer}: {status}" if layer else status)
                if not layer or not _is_layer_status(status):
                    continue
                state = layers.setdefault(layer, [0, 0, 0])
                detail = item.get("progressDetail") or {}
                if status == "Downloading" and detail.get("total"):
                    state[0], state[1] = int(detail.get("current", 0)), int(detail["total"])
                elif status in ("Download complete", "Pull complete", "Already exists"):
                    state[0], state[2] = state[1], 1
                # Each layer counts for its share, by its bytes: the engine announces every
                # layer first but tells a layer's size only when its download starts.
                fraction = sum(
                    1.0 if done else (cur / total if total else 0.0)
                    for cur, total, done in layers.values()
                ) / len(layers)
                percent = int(PULL_SHARE * fraction)
                if percent > last_percent:
                    last_percent = percent
                    await ctx.report_progress(
                        percent,
                        f"pulling {ref}",
                        {
                            "bytes": sum(v[0] for v in layers.values()),
                            "total_bytes": sum(v[1] for v in layers.values()),
                            "layers": len(layers),
                        },
                    )
        finally:
            stop.set()
        await ctx.report_progress(PULL_SHARE, f"pulled {ref}")

    async def _remove_leftovers(self, ctx: DeployContext, name: str) -> None:
        """New containers of a run that never ended (the reconciler was killed)."""
        found = await self._api_call(
            "containers", all=True, filters={"label": f"{LABEL_CONTAINER}={name}"}
        )
        for c in found:
            if c["Names"][0].lstrip("/") == name:
                continue
            ctx.log(f"removing leftover container {c['Names'][0].lstrip('/')} of an earlier run")
            await self._api_call("remove_container", c["Id"], force=True)

    async def _create(
        self,
        p: DockerParams,
        req: DeployRequest,
        ref: str,
        name: str,
        new_name: str,
        created: list[str],
    ) -> str:
        def create() -> str:
            api = self._client()
            bindings = p.port_bindings()
            host_config = api.create_host_config(
                port_bindings=bindings or None,
                binds=p.volumes or None,
                network_mode=p.network,
                restart_policy={"Name": p.restart} if p.restart != "no" else None,
            )
            made = api.create_container(
                ref,
                command=p.command,
                name=new_name,
                environment=p.env or None,
                ports=[tuple(str(k).split("/")) for k in bindings] or None,
                host_config=host_config,
                labels={
                    LABEL_ENVIRONMENT: req.environment,
                    LABEL_SERVICE: req.service,
                    LABEL_VERSION: req.version,
                    LABEL_DEPLOYMENT: str(req.deployment_id),
                    LABEL_CONTAINER: name,
                },
            )
            created.append(str(made["Id"]))
            return created[0]

        return await _finishing(asyncio.to_thread(create))

    async def _wait_ready(
        self, ctx: DeployContext, p: DockerParams, cid: str, new_name: str
    ) -> None:
        """Healthy by its HEALTHCHECK, or running for `ready_seconds` without one. Exiting,
        restarting or an unhealthy verdict fails with the engine's words."""
        ready_seconds = self.ready_seconds if p.ready_seconds is None else p.ready_seconds
        running_since: float | None = None
        said: str | None = None
        while True:
            info = await self._api_call("inspect_container", cid)
            state = info["State"]
            if not state["Running"] or state.get("Restarting") or info.get("RestartCount"):
                await self._fail_exited(ctx, cid, new_name, state)
            health = state.get("Health")
            if health is not None:
                status = health.get("Status")
                if status == "healthy":
                    ctx.log(f"{new_name} is healthy")
                    return
                if status == "unhealthy":
                    probes = health.get("Log") or []
                    output = str(probes[-1].get("Output", "")).strip() if probes else ""
                    for line in output.splitlines()[-LOG_TAIL:]:
                        ctx.log(f"healthcheck: {line}", "stderr")
                    code = probes[-1].get("ExitCode") if probes else None
                    raise DeploymentFailed(
                        f"container {new_name} is unhealthy (healthcheck exit code {code})"
                        + (f": {output.splitlines()[-1]}" if output else "")
                    )
                if said != "health":
                    said = "health"
                    await ctx.report_progress(60, f"waiting for {new_name} to be healthy")
            else:
                now = time.monotonic()
                running_since = running_since or now
                if now - running_since >= ready_seconds:
                    ctx.log(f"{new_name} has been running for {ready_seconds:g}s (no healthcheck)")
                    return
                if said != "running":
                    said = "running"
                    await ctx.report_progress(
                        60, f"waiting {ready_seconds:g}s for {new_name} to keep running"
                    )
            await self._pause()

    async def _pause(self) -> None:
        """Between two looks at the new container (the platform's time, not ours)."""
        await asyncio.sleep(self.poll_interval)

    async def _fail_exited(
        self, ctx: DeployContext, cid: str, new_name: str, state: Mapping[str, Any]
    ) -> None:
        raw = await self._api_call("logs", cid, stdout=True, stderr=True, tail=LOG_TAIL)
        lines = [ln for ln in bytes(raw).decode("utf-8", "replace").splitlines() if ln.strip()]
        for line in lines:
            ctx.log(f"{new_name}: {line}", "stderr")
        what = f"exited with code {state.get('ExitCode')}"
        if state.get("Restarting") or state["Running"]:
            what = "restarted"
        error = str(state.get("Error") or "") or (lines[-1] if lines else "")
        raise DeploymentFailed(f"container {new_name} {what}" + (f": {error}" if error else ""))

    async def _switch(self, ctx: DeployContext, old_id: str | None, new_id: str, name: str) -> None:
        if old_id is not None:
            await self._api_call("stop", old_id, timeout=int(ctx.kill_grace))
            await self._api_call("remove_container", old_id, force=True)
            ctx.log(f"removed old container {name} ({old_id[:12]})")
        await self._api_call("rename", new_id, name)
        ctx.log(f"container {new_id[:12]} is now {name}")

    async def _undo(
        self, ctx: DeployContext, new_id: str | None, restart_old: str | None, name: str
    ) -> None:
        """Remove the new container; start the old one again if this run stopped it."""
        if new_id is not None:
            with contextlib.suppress(NotFound):
                await self._api_call("remove_container", new_id, force=True)
            ctx.log(f"removed new container {new_id[:12]}")
        if restart_old is not None:
            await self._api_call("start", restart_old)
            ctx.log(f"restarted old container {name}")

    # ---- drift ------------------------------------------------------------------------

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        p: DockerParams = self.params(params)
        info = await self._inspect(p.container_name(environment, service))
        if info is None or not info["State"]["Running"]:
            return None
        labels = info["Config"].get("Labels") or {}
        version = labels.get(LABEL_VERSION)
        return str(version) if version is not None else None
