"""What the command line does, as plain async functions over the engine.

The CLI parses and prints; these open the pieces, act, and return values. When a daemon
holds the state directory, commands that would deploy ask it (SIGUSR1) instead of racing it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from desired_state import FileError
from reconciler.config import Config, ConfigError
from reconciler.engine import Engine, SyncOutcome, open_source
from reconciler.executor import Job, Listener, utcnow
from reconciler.lock import AlreadyRunning, StateLock
from reconciler.plan import Decision
from reconciler.providers import build_providers
from reconciler.store import (
    DatabaseHeld,
    DatabaseLock,
    DeploymentRecord,
    Store,
)


class OperationError(Exception):
    """A refusal worded for the operator; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


POLL_SECONDS = 0.2  # how often a command following the daemon looks at the ledger


def actor() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or f"uid:{os.getuid()}"


def open_store(config: Config, *, migrate: bool = True) -> Store:
    """The store; `migrate=False` (reading commands) creates a new database but never
    upgrades an existing one behind their back: that is `db upgrade`'s or the daemon's job."""
    if migrate:
        return Store.from_url(config.database_url, migrate=True)
    return Store.for_reading(config.database_url)


@asynccontextmanager
async def open_engine(
    config: Config, *, exclusive: bool = False, listener: Listener | None = None
) -> AsyncIterator[Engine]:
    """An engine for one command. `exclusive`: take the state lock (commands that deploy)."""
    providers = build_providers(config)
    lock = StateLock(config.state_dir)
    if exclusive:
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            raise OperationError(_daemon_running(exc.args[0]), code=2) from None
    try:
        store = await asyncio.to_thread(open_store, config, migrate=exclusive)
        held = DatabaseLock(store.engine)
        try:
            if exclusive:  # a daemon on another state directory may use this database
                await asyncio.to_thread(
                    held.acquire, role="command", state_dir=str(config.state_dir), at=utcnow()
                )
            source = open_source(config)
            engine = Engine(config, store, source, providers, listener=listener)
            engine.runners_enabled = False
            try:
                yield engine
                await engine.kept()
            finally:
                source.close()
        except DatabaseHeld as exc:
            raise OperationError(str(exc), code=2) from None
        finally:
            await asyncio.to_thread(held.release)
            store.engine.dispose()
    finally:
        lock.release()


def _daemon_running(pid: int | None) -> str:
    who = f" (pid {pid})" if pid and pid > 0 else ""
    return (
        f"a reconciler daemon{who} holds this state directory and deploys by itself; "
        "use `reconciler sync` to ask it, or `reconciler suspend` first"
    )


def running_daemon(config: Config) -> int | None:
    return StateLock(config.state_dir).held_by_other()


@dataclass
class SyncReport:
    outcome: SyncOutcome
    deployments: list[DeploymentRecord] = field(default_factory=list)
    delegated_to: int | None = None  # pid of the daemon asked to sync

    @property
    def failed(self) -> bool:
        return self.outcome.result in ("failed", "refused") or any(
            d.status != "completed" and d.trigger != "rollback" for d in self.deployments
        )


async def sync(
    config: Config,
    *,
    environment: str | None = None,
    service: str | None = None,
    listener: Listener | None = None,
    wait: bool = False,
) -> SyncReport:
    """Reconcile now. With a daemon running, ask it (and with `wait`, follow what it does);
    otherwise do one pass here and wait for its deployments."""
    pid = running_daemon(config)
    if pid is not None:
        return await _delegate_sync(config, pid, environment, service, wait)
    async with open_engine(config, exclusive=True, listener=listener) as engine:
        await engine.recover()
        if environment and service:
            await asyncio.to_thread(_retry_request, engine.store, environment, service)
        outcome = await engine.sync("manual")
        if outcome.result in ("failed", "refused"):
            return SyncReport(outcome)
        if environment is not None and environment not in engine.effective:
            raise OperationError(f"unknown environment '{environment}'", code=2)
        if (
            service is not None
            and environment is not None
            and service not in engine.effective[environment].services
        ):
            raise OperationError(f"environment '{environment}' has no service '{service}'", code=2)
        envs = [environment] if environment else list(engine.effective)
        only = {service} if service else None
        results = await asyncio.gather(*(engine.drain(e, once=True, services=only) for e in envs))
        return SyncReport(outcome, [d for r in results for d in r])


async def _delegate_sync(
    config: Config, pid: int, environment: str | None, service: str | None, wait: bool
) -> SyncReport:
    store = await asyncio.to_thread(open_store, config, migrate=False)
    try:
        last_sync = await asyncio.to_thread(store.list_syncs, 1)
        last_dep = await asyncio.to_thread(store.history, limit=1)
        if environment and service:
            await asyncio.to_thread(_retry_request, store, environment, service)
        if pid > 0:
            os.kill(pid, signal.SIGUSR1)
        report = SyncReport(SyncOutcome(None, None, "delegated"), delegated_to=pid)
        if not wait:
            return report
        after_sync = last_sync[0].id if last_sync else 0
        after_dep = last_dep[0].id if last_dep else 0
        report.outcome = await _await_daemon_sync(config, store, after_sync)
        if report.outcome.result in ("ok", "errors"):
            await _await_quiet(config, environment)
        report.deployments = [
            d
            for d in await asyncio.to_thread(store.history, environment=environment, limit=100_000)
            if d.id > after_dep and (service is None or d.service == service)
        ]
        report.deployments.reverse()
        return report
    finally:
        store.close()


async def _await_daemon_sync(config: Config, store: Store, after: int) -> SyncOutcome:
    """The daemon's sync that answers our signal (its id is above `after`)."""
    while True:
        syncs = await asyncio.to_thread(store.list_syncs, 5)
        done = [s for s in syncs if s.id > after and s.ended_at is not None]
        if done:
            s = done[-1]
            errors = [str(FileError(**e)) for e in s.errors]
            result = s.result or "failed"
            changed = list(s.environments_changed)
            return SyncOutcome(s.id, s.commit_sha, result, changed, errors, s.error_message)
        _check_daemon(config)
        await asyncio.sleep(POLL_SECONDS)


async def _await_quiet(config: Config, environment: str | None) -> None:
    """Until the daemon has nothing due or running in the environments we watch."""
    async with open_engine(config) as engine:
        await engine.load_at_last_sync()
        envs = [environment] if environment else None
        while any(d.deploy or d.state == "deploying" for d in await engine.decisions(envs)):
            _check_daemon(config)
            await asyncio.sleep(POLL_SECONDS)


def _check_daemon(config: Config) -> None:
    if running_daemon(config) is None:
        raise OperationError("the daemon stopped before the sync ended")


def _retry_request(store: Store, environment: str, service: str) -> None:
    """The operator asks to try again a version that gave up (SPEC §4 rule 4)."""
    store.reset_streak(environment, service)
    store.record_operator_action(
        environment=environment,
        service=service,
        action="retry",
        actor=actor(),
        note=None,
        at=utcnow(),
    )


async def decisions(
    config: Config, *, fetch: bool, environment: str | None = None
) -> tuple[Engine, list[Decision]]:
    """Decisions at the branch head (`plan`, fetching) or at the last synced commit (`status`)."""
    async with open_engine(config) as engine:
        if fetch:
            await engine.preview()
        else:
            await engine.load_at_last_sync()
        if (
            environment is not None
            and environment not in engine.effective
            and environment not in engine.invalid
        ):
            raise OperationError(f"unknown environment '{environment}'", code=2)
        return engine, await engine.decisions([environment] if environment else None)


async def deploy(
    config: Config,
    *,
    environment: str,
    version: str,
    services: Collection[str] | None,
    trigger: str = "manual",
    listener: Listener | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[DeploymentRecord]:
    """Deploy now (trigger manual, or rollback with an explicit target)."""
    async with open_engine(config, exclusive=True, listener=listener) as engine:
        await engine.recover()
        await engine.load_at_last_sync()
        if engine.commit is None:
            await engine.sync("manual")
        spec = engine.effective.get(environment)
        if spec is None:
            raise OperationError(f"unknown environment '{environment}'", code=2)
        suspended = spec.suspended or environment in await asyncio.to_thread(
            engine.store.suspended_environments
        )
        if not suspended and warn is not None:
            warn(
                f"{environment} is not suspended: git wins at the next sync "
                f"(run `reconciler suspend --env {environment}` to keep this version)"
            )
        names = list(services) if services else list(spec.services)
        for name in names:
            if name not in spec.services:
                raise OperationError(f"environment '{environment}' has no service '{name}'", code=2)
        states = await asyncio.to_thread(engine.store.service_states, [environment])
        out = []
        for name in names:
            st = states.get((environment, name))
            previous = st.deployed_version if st else None
            await asyncio.to_thread(
                engine.store.record_operator_action,
                environment=environment,
                service=name,
                action="rollback" if trigger == "rollback" else "deploy",
                actor=actor(),
                note=f"to {version}",
                at=utcnow(),
            )
            job = Job(
                spec=spec,
                service=name,
                version=version,
                previous_version=previous,
                trigger=trigger,
                commit=engine.commit,
                sync_id=engine.sync_id,
            )
            out.extend(await engine.deploy(job))
        return out


async def rollback_target(
    config: Config, environment: str, service: str, to_version: str | None = None
) -> str:
    """The version a rollback deploys: the given one, which must have completed there
    before, or the latest completed version before the deployed one."""
    store = await asyncio.to_thread(open_store, config, migrate=False)
    try:
        await asyncio.to_thread(_check_known, store, environment, service)
        if to_version is not None:
            known = await asyncio.to_thread(
                store.completed_versions, [(environment, service, to_version)]
            )
            if not known:
                raise OperationError(
                    f"{environment}/{service} never completed version {to_version}: "
                    "roll back to a version that ran there, or use `reconciler deploy`"
                )
            return to_version
        states = await asyncio.to_thread(store.service_states, [environment])
        st = states.get((environment, service))
        current = st.deployed_version if st else None
        target = await asyncio.to_thread(
            store.previous_completed_version, environment, service, before_version=current
        )
    finally:
        store.engine.dispose()
    if target is None:
        raise OperationError(
            f"{environment}/{service} has no earlier completed version to roll back to"
        )
    return target


def _check_known(store: Store, environment: str, service: str) -> None:
    """An environment or service the applied desired state does not have is named as
    unknown (not "no earlier version"). Nothing is checked before the first sync."""
    known = store.environment_states()
    if not known:
        return
    if environment not in known:
        raise OperationError(
            f"unknown environment '{environment}' (known: {', '.join(sorted(known))})", code=2
        )
    services = known[environment].spec.get("services") or {}
    if service not in services:
        raise OperationError(f"environment '{environment}' has no service '{service}'", code=2)


async def set_suspended(
    config: Config, environment: str, suspended: bool, note: str | None
) -> None:
    store = await asyncio.to_thread(open_store, config, migrate=False)
    try:
        known = await asyncio.to_thread(store.environment_states)
        if known and environment not in known:
            raise OperationError(
                f"unknown environment '{environment}' (known: {', '.join(sorted(known))})", code=2
            )
        await asyncio.to_thread(
            store.record_operator_action,
            environment=environment,
            service=None,
            action="suspend" if suspended else "resume",
            actor=actor(),
            note=note,
            at=utcnow(),
        )
    finally:
        store.engine.dispose()
    pid = running_daemon(config)
    if pid and pid > 0 and not suspended:
        os.kill(pid, signal.SIGUSR1)  # a resumed environment deploys what it held back


def check_providers(config: Config) -> None:
    build_providers(config)


__all__ = [
    "ConfigError",
    "OperationError",
    "SyncReport",
    "check_providers",
    "decisions",
    "deploy",
    "open_engine",
    "open_store",
    "rollback_target",
    "running_daemon",
    "set_suspended",
    "sync",
]
