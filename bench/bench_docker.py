"""Reconciler's own overhead per deployment on the `docker` type, beside the `command` type.

Starts a dockerd of its own (as tests/dockerd.py does: vfs storage, images built offline
from busybox) and runs N deployments of one service through a real `Executor` and a real
SQLite `Store`, alternating two versions of a healthy image (HEALTHCHECK every 300 ms), with
`poll_interval = 0.05`. The same N deployments then run with the `command` type and a
deploy program that does nothing (`/bin/true`).

Each deployment's wall time is split:

* platform: the time inside Engine API calls (each one timed where the provider makes it,
  in its worker thread) and the pauses between looks at the new container's health — for
  `command`, the deploy program's life, from spawn to exit;
* executor + store: everything outside `provider.validate` / `provider.deploy` (records,
  status changes, progress events, log lines, the deadline);
* provider: the rest, the provider's own work on the event loop.

    .venv/bin/python bench/bench_docker.py            # 10 deployments each
    .venv/bin/python bench/bench_docker.py --full     # 40
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Table, machine, median, ms, ratio, say

from desired_state import EnvironmentSpec
from reconciler.config import ProviderConfig
from reconciler.executor import Executor, Job
from reconciler.providers.base import DeployContext, DeployRequest, Validation
from reconciler.providers.command import CommandProvider
from reconciler.providers.docker import DockerProvider
from reconciler.store import Store
from tests.dockerd import EngineUnavailable, running_dockerd


class Clock:
    def __init__(self) -> None:
        self.platform = 0.0
        self.inside = 0.0  # validate + deploy
        self.calls = 0


class TimedDocker(DockerProvider):
    clock = Clock()

    async def _api_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await super()._api_call(method, *args, **kwargs)
        finally:
            self.clock.platform += time.perf_counter() - started
            self.clock.calls += 1

    async def validate(self, request: DeployRequest) -> Validation:
        started = time.perf_counter()
        try:
            return await super().validate(request)
        finally:
            self.clock.inside += time.perf_counter() - started

    async def _pause(self) -> None:  # between two looks at the new container's health
        started = time.perf_counter()
        try:
            await super()._pause()
        finally:
            self.clock.platform += time.perf_counter() - started

    async def deploy(self, ctx: DeployContext) -> None:
        started = time.perf_counter()
        try:
            await super().deploy(ctx)
        finally:
            self.clock.inside += time.perf_counter() - started


class TimedCommand(CommandProvider):
    clock = Clock()

    async def validate(self, request: DeployRequest) -> Validation:
        started = time.perf_counter()
        try:
            return await super().validate(request)
        finally:
            self.clock.inside += time.perf_counter() - started

    async def deploy(self, ctx: DeployContext) -> None:
        started = time.perf_counter()
        real = asyncio.create_subprocess_exec

        async def spawn(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            proc = await real(*args, **kwargs)
            wait = proc.wait

            async def timed_wait() -> int:
                code = await wait()
                self.clock.platform += time.perf_counter() - t
                return code

            proc.wait = timed_wait  # type: ignore[method-assign]
            return proc

        asyncio.create_subprocess_exec = spawn
        try:
            await super().deploy(ctx)
        finally:
            asyncio.create_subprocess_exec = real
            self.clock.inside += time.perf_counter() - started


def spec(env: str) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {
            "environment": env,
            "provider": "p",
            "services": {"api": {"version": "1.0", "params": {"image": "app"}}},
        }
    )


async def run(provider: Any, store: Store, env: str, n: int) -> list[tuple[float, float, float]]:
    """Per deployment: (total, executor + store, platform)."""
    executor = Executor(store, {"p": provider}, kill_grace=1.0)
    out = []
    previous = None
    for i in range(n + 1):  # the first one (a cold start) is not counted
        version = "1.0" if i % 2 == 0 else "1.1"
        clock = provider.clock
        clock.platform = clock.inside = 0.0
        started = time.perf_counter()
        rec = await executor.run(Job(spec(env), "api", version, previous, "git"))
        total = time.perf_counter() - started
        if rec.status != "completed":
            raise SystemExit(f"deployment {rec.id} {rec.status}: {rec.error_message}")
        previous = version
        if i:
            out.append((total, total - clock.inside, clock.platform))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("-n", type=int, default=None, help="deployments per type")
    args = parser.parse_args()
    n = args.n or (40 if args.full else 10)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with running_dockerd() as engine:
                say(f"dockerd up at {engine.host}; {n} deployments per type")
                store = Store.from_url(f"sqlite:///{Path(tmp) / 'r.db'}", migrate=True)
                conf = ProviderConfig.model_validate(
                    {"type": "docker", "host": engine.host, "poll_interval": 0.05}
                )
                docker_rows = asyncio.run(run(TimedDocker("p", conf, Path(tmp)), store, "d", n))
                calls = TimedDocker.clock.calls / (n + 1)
                cconf = ProviderConfig.model_validate({"type": "command", "command": ["/bin/true"]})
                command_rows = asyncio.run(run(TimedCommand("p", cconf, Path(tmp)), store, "c", n))
                store.engine.dispose()
        except EngineUnavailable as exc:
            raise SystemExit(f"cannot run: {exc}") from None

    def col(rows: list[tuple[float, float, float]], i: int) -> float:
        return median([r[i] for r in rows])

    def own(rows: list[tuple[float, float, float]]) -> float:
        return median([t - ex - pl for t, ex, pl in rows])

    table = Table(f"docker vs command, per deployment (median of {n}) — {machine()}")
    d_total, c_total = col(docker_rows, 0), col(command_rows, 0)
    d_exec, c_exec = col(docker_rows, 1), col(command_rows, 1)
    d_own, c_own = own(docker_rows), own(command_rows)
    table.add("wall time, end to end", ms(d_total), ms(c_total), ratio(d_total, c_total))
    table.add(
        "platform (API calls + health waits | program)",
        ms(col(docker_rows, 2)),
        ms(col(command_rows, 2)),
    )
    table.add(
        "executor + store (outside the provider)", ms(d_exec), ms(c_exec), ratio(d_exec, c_exec)
    )
    table.add("provider's own work on the loop", ms(d_own), ms(c_own), ratio(d_own, c_own))
    table.add(
        "reconciler overhead (executor + provider)",
        ms(d_exec + d_own),
        ms(c_exec + c_own),
        ratio(d_exec + d_own, c_exec + c_own),
    )
    table.note(f"docker: {calls:.0f} Engine API calls per deployment; health checked every 0.05 s")
    table.note("columns: reconciler = docker type, baseline = command type (/bin/true)")
    table.note(
        "provider's own work includes the progress events it reports (each one a store write)"
        " and the hops to the SDK's worker threads"
    )
    table.print()


if __name__ == "__main__":
    main()
