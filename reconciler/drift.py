"""Drift: what actually runs on the targets, read off the deployment path.

The engine owns a :class:`DriftMonitor`; the daemon starts it. It reads every service's live
version (`Provider.current_version`) after each sync that applied a commit and every
`[daemon] drift_interval`, in a task of its own with bounded concurrency and a timeout per
read, so a slow target never holds a runner or a sync. Each reading is stored
(`live_versions`) with the service's latest deployment id at the time; the planner compares
it with the deployed version (`plan.drifted_from`): a difference is state `drifted`, and
with `self_heal: true` a redeploy with trigger `drift`. A provider that fails or returns
None leaves the live version unknown, which is not drift. Services with a deployment
running are not read (the target is changing under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime

from desired_state import EnvironmentSpec
from reconciler.providers import Provider, Redactor
from reconciler.store import DriftEvent, LiveObservation, ServiceState, Store

log = logging.getLogger(__name__)

CONCURRENCY = 8  # live-version reads at once
READ_TIMEOUT = 30.0  # seconds one read may take before it counts as unknown


def reads_live_version(provider: Provider) -> bool:
    """Whether asking this provider is worth it: its type implements `current_version`
    (and, for types where it is optional, the instance is configured for it)."""
    if type(provider).current_version is Provider.current_version:
        return False
    return bool(getattr(provider, "reads_live_version", True))


class DriftMonitor:
    def __init__(
        self,
        store: Store,
        specs: Callable[[], Mapping[str, EnvironmentSpec]],
        providers: Callable[[], Mapping[str, Provider]],
        *,
        wake: Callable[[Iterable[str]], None],
        clock: Callable[[], datetime],
        interval: float = 300.0,
        concurrency: int = CONCURRENCY,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.store = store
        self.specs = specs
        self.providers = providers
        self.wake = wake
        self.clock = clock
        self.interval = interval  # 0: off (engine.reload sets it)
        self.concurrency = concurrency
        self.read_timeout = read_timeout
        self.drifted: dict[tuple[str, str], LiveObservation] = {}  # as of the last reading
        self.readings = 0  # readings saved so far (the daemon's kept status re-plans after one)
        self._requested: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one reading at a time

    # ---- life cycle (the daemon) -------------------------------------------------------

    def start(self) -> None:
        self._requested = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="drift")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def request(self) -> None:
        """Read soon (after a sync that applied a commit); a no-op unless started."""
        if self._requested is not None:
            self._requested.set()

    def deployment_ended(self, environment: str, service: str) -> None:
        """A deployment of a drifted service ended: read again to learn what it left."""
        if self.drifted.pop((environment, service), None) is not None:
            self.request()

    def drifted_by_environment(self) -> dict[str, int]:
        """Drifted services per environment, as of the last reading (for metrics)."""
        out: dict[str, int] = {}
        for env, _ in self.drifted:
            out[env] = out.get(env, 0) + 1
        return out

    async def _loop(self) -> None:
        assert self._requested is not None
        while True:
            timeout = self.interval if self.interval > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), timeout)
            self._requested.clear()
            if self.interval <= 0:
                continue
            try:
                await self.check()
            except Exception:  # a database outage, say: try again at the next turn
                log.exception("event=drift_check_failed")

    # ---- one reading -------------------------------------------------------------------

    async def check(self, environments: Iterable[str] | None = None) -> list[LiveObservation]:
        """Read the live version of every service (of these environments), store the
        readings, and wake the self-healing environments that drifted."""
        async with self._lock:
            return await self._check(None if environments is None else set(environments))

    async def _check(self, only: set[str] | None) -> list[LiveObservation]:
        specs = {e: s for e, s in self.specs().items() if only is None or e in only}
        providers = self.providers()
        wanted = {
            env: spec
            for env, spec in specs.items()
            if spec.provider in providers and reads_live_version(providers[spec.provider])
        }
        if only is None:  # forget services that are gone (or no longer read)
            self.drifted = {
                key: obs
                for key, obs in self.drifted.items()
                if key[0] in wanted and key[1] in wanted[key[0]].services
            }
        if not wanted:
            return []
        states, previous = await asyncio.to_thread(self._recorded, set(wanted))
        semaphore = asyncio.Semaphore(self.concurrency)
        reads = [
            self._read(semaphore, providers[spec.provider], spec, name, states.get((env, name)))
            for env, spec in wanted.items()
            for name in spec.services
        ]
        readings = [r for r in await asyncio.gather(*reads) if r is not None]
        observations = [self._observation(r, previous.get((r[0], r[1]))) for r in readings]
        events = [
            DriftEvent(o.environment, o.service, o.version, o.deployed_version, o.observed_at)
            for o in observations
            if o.drifted
            and o.version is not None
            and _is_news(o, previous.get((o.environment, o.service)))
        ]
        await asyncio.to_thread(self.store.save_live_versions, observations, events)
        self.readings += 1
        for event in events:
            log.warning(
                "event=drift_detected environment=%s service=%s live=%s deployed=%s",
                event.environment,
                event.service,
                event.live_version,
                event.deployed_version,
            )
        heal: set[str] = set()
        for obs in observations:
            key = (obs.environment, obs.service)
            was = previous.get(key)
            if obs.drifted:
                self.drifted[key] = obs
                if wanted[obs.environment].self_heal:
                    heal.add(obs.environment)
            else:
                if was is not None and was.drifted and obs.version is not None:
                    log.info(
                        "event=drift_cleared environment=%s service=%s live=%s",
                        obs.environment,
                        obs.service,
                        obs.version,
                    )
                self.drifted.pop(key, None)
        if heal:
            self.wake(sorted(heal))
        return observations

    def _recorded(
        self, envs: set[str]
    ) -> tuple[dict[tuple[str, str], ServiceState], dict[tuple[str, str], LiveObservation]]:
        return self.store.service_states(envs), self.store.live_versions(envs)

    async def _read(
        self,
        semaphore: asyncio.Semaphore,
        provider: Provider,
        spec: EnvironmentSpec,
        service: str,
        state: ServiceState | None,
    ) -> tuple[str, str, str | None, str | None, ServiceState | None] | None:
        if state is not None and state.running_deployment_id is not None:
            return None  # changing right now: the deployment's outcome says what runs
        async with semaphore:
            try:
                version = await asyncio.wait_for(
                    provider.current_version(
                        spec.environment, service, spec.services[service].params
                    ),
                    self.read_timeout,
                )
            except Exception as exc:
                error = "timed out" if isinstance(exc, TimeoutError) else f"{exc}"
                error = error.splitlines()[0] if error else type(exc).__name__
                error = Redactor(provider.secrets())(error)
                log.info(
                    "event=live_version_unknown environment=%s service=%s error=%r",
                    spec.environment,
                    service,
                    error,
                )
                return spec.environment, service, None, error[:500], state
        return spec.environment, service, version, None, state

    def _observation(
        self,
        reading: tuple[str, str, str | None, str | None, ServiceState | None],
        was: LiveObservation | None,
    ) -> LiveObservation:
        env, service, version, error, state = reading
        now = self.clock()
        obs = LiveObservation(
            environment=env,
            service=service,
            version=version,
            deployment_id=state.last_deployment_id if state else None,
            deployed_version=state.deployed_version if state else None,
            observed_at=now,
            error=error,
        )
        if not obs.drifted:
            return obs
        since = was.drifted_since if was is not None and was.version == version else None
        return replace(obs, drifted_since=since or now)


def _is_news(obs: LiveObservation, was: LiveObservation | None) -> bool:
    """Drift that was not there at the previous reading, or another live version, or the
    same live version against a new deployed version: once per change, not per reading."""
    return (
        was is None
        or not was.drifted
        or was.version != obs.version
        or was.deployed_version != obs.deployed_version
    )
