"""What the command line does, and what the daemon does for an operator.

The CLI parses and prints; these open the pieces, act, and return values. When a daemon
holds the state directory, every changing command is carried out by it: the CLI asks over
the control channel (`ask_daemon`), and the daemon's socket and HTTP handlers both call
`perform` / `handle` here, so each action has one implementation whoever asks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.channel import (
    Accepted,
    Answer,
    ChannelError,
    DeployAction,
    Done,
    Failed,
    NotListening,
    Progress,
    Refused,
    RollbackAction,
    SuspendAction,
    SyncAction,
    SyncResult,
    socket_path,
)
from reconciler.channel import ask as channel_ask
from reconciler.config import Config, ConfigError
from reconciler.engine import Engine, SyncOutcome, open_source
from reconciler.events import EventHub, Subscription
from reconciler.executor import DeploymentEvent, Job, Listener, durable, utcnow
from reconciler.lock import AlreadyRunning, StateLock
from reconciler.plan import Decision
from reconciler.providers import build_providers
from reconciler.store import (
    TERMINAL_STATUSES,
    DatabaseHeld,
    DatabaseLock,
    DeploymentRecord,
    Store,
)

log = logging.getLogger("reconciler.operations")

AnyAction = SyncAction | DeployAction | RollbackAction | SuspendAction


class OperationError(Refused):
    """A refusal worded for the operator; `code` is the exit status."""


POLL_SECONDS = 0.2  # how often a followed sync looks whether its scope went quiet


def actor() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or f"uid:{os.getuid()}"


def local_origin() -> str:
    """Where a standalone command's action comes from (no daemon asked): this process."""
    return f"local command, pid {os.getpid()}"


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
        "run the command again: it asks the daemon"
    )


def running_daemon(config: Config) -> int | None:
    return StateLock(config.state_dir).held_by_other()


@dataclass
class SyncReport:
    outcome: SyncOutcome
    deployments: list[DeploymentRecord] = field(default_factory=list)
    delegated_to: int | None = None  # pid of the daemon that carried the sync out

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
    reason: str | None = None,
) -> SyncReport:
    """Reconcile now. With a daemon running, the daemon does it (and with `wait`, the
    report is what it deployed); otherwise one pass here, waiting for its deployments."""
    pid = running_daemon(config)
    if pid is not None:
        action = SyncAction(environment=environment, service=service, reason=reason, wait=wait)
        reply = await ask_daemon(config, action, listener=listener)
        outcome = reply.outcome or SyncOutcome(None, None, "delegated")
        return SyncReport(outcome, reply.deployments, delegated_to=pid)
    async with open_engine(config, exclusive=True, listener=listener) as engine:
        await engine.check_signers()
        await engine.recover()
        who, origin = actor(), local_origin()
        if environment and service:
            await asyncio.to_thread(
                _retry_request, engine.store, environment, service, who, reason, origin
            )
        else:
            await asyncio.to_thread(_forced_sync, engine.store, environment, who, reason, origin)
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
        await store_decisions(engine)
        return SyncReport(outcome, [d for r in results for d in r])


def _retry_request(
    store: Store,
    environment: str,
    service: str,
    who: str,
    reason: str | None,
    origin: str | None = None,
) -> None:
    """The operator asks to try again a version that gave up (SPEC §4 rule 4)."""
    store.reset_streak(environment, service)
    _record(store, "retry", environment, service, who, reason, origin)


def _record(
    store: Store,
    action: str,
    environment: str,
    service: str | None,
    who: str,
    reason: str | None,
    origin: str | None,
) -> None:
    """Record an operator action (and its audit ledger entry), then log it."""
    store.record_operator_action(
        environment=environment,
        service=service,
        action=action,
        actor=who,
        note=reason,
        at=utcnow(),
        origin=origin,
    )
    log_action(action, who, environment, service, reason)


def _forced_sync(
    store: Store, environment: str | None, who: str, reason: str | None, origin: str | None
) -> None:
    """An operator forces a sync (of one environment, or "*": all): recorded for the audit
    ledger, like every operator action."""
    _record(store, "sync", environment or "*", None, who, reason, origin)


def log_action(
    action: str,
    who: str,
    environment: str | None,
    service: str | None = None,
    reason: str | None = None,
    **extra: str,
) -> None:
    """Every operator action, whoever asked and however: one line in the log."""
    more = "".join(f" {k}={v}" for k, v in extra.items())
    log.info(
        "event=operator_action action=%s environment=%s service=%s actor=%r%s reason=%r",
        action,
        environment or "-",
        service or "-",
        who,
        more,
        reason or "",
    )


# ---- asking the running daemon (the CLI's side of the control channel) -----------------

#: How long a command waits for a daemon that holds the state directory to open its
#: control socket (it does so moments after taking the lock, at start-up).
CONNECT_WAIT_SECONDS = 10.0
CONNECT_RETRY_SECONDS = 0.05


@dataclass
class DaemonReply:
    """What the daemon answered: its acceptance, the sync it ran, the runs it followed."""

    accepted: Accepted | None = None
    outcome: SyncOutcome | None = None
    deployments: list[DeploymentRecord] = field(default_factory=list)


async def ask_daemon(
    config: Config,
    action: AnyAction,
    *,
    listener: Listener | None = None,
    warn: Callable[[str], None] | None = None,
) -> DaemonReply:
    """Have the running daemon carry out `action`; with `action.wait`, follow it to the end
    (progress to `listener`) and return the deployments it made, as recorded."""
    path = socket_path(config.state_dir)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_WAIT_SECONDS
    reply = DaemonReply()
    ids: list[int] = []
    while True:
        try:
            async for answer in channel_ask(path, action):
                if isinstance(answer, Accepted):
                    reply.accepted = answer
                    for text in answer.warnings:
                        if warn is not None:
                            warn(text)
                elif isinstance(answer, Progress):
                    if listener is not None:
                        listener(_progress_event(answer))
                elif isinstance(answer, SyncResult):
                    reply.outcome = SyncOutcome(
                        answer.sync_id,
                        answer.commit,
                        answer.result,
                        answer.environments_changed,
                        answer.errors,
                        answer.message,
                    )
                elif isinstance(answer, Done):
                    ids = answer.deployment_ids
                elif isinstance(answer, Failed):
                    raise OperationError(answer.message, answer.code)
                else:  # a status report: no answer to an action
                    raise OperationError(f"the daemon answered '{answer.type}' to an action")
            break
        except NotListening as exc:
            # Only before anything was sent: the daemon is starting, or has just stopped.
            if running_daemon(config) is None:
                raise OperationError("the daemon stopped before it answered") from None
            if loop.time() > deadline:
                raise OperationError(str(exc)) from None
            await asyncio.sleep(CONNECT_RETRY_SECONDS)
        except ChannelError as exc:
            raise OperationError(str(exc)) from None
    if ids:
        reply.deployments = await asyncio.to_thread(_load_records, config, ids)
    return reply


def _load_records(config: Config, ids: list[int]) -> list[DeploymentRecord]:
    store = open_store(config, migrate=False)
    try:
        return _records(store, ids)
    finally:
        store.close()


def _progress_event(p: Progress) -> DeploymentEvent:
    return DeploymentEvent(
        deployment_id=p.deployment_id,
        environment=p.environment,
        service=p.service,
        version=p.version,
        trigger=p.trigger,
        status=p.status,
        message=p.message,
        percent=p.percent,
    )


async def decisions(
    config: Config, *, fetch: bool, environment: str | None = None, judge: bool = False
) -> tuple[Engine, list[Decision]]:
    """Decisions at the branch head (`plan`, fetching) or at the last synced commit (`status`).

    `judge` (`plan`): a head that a sync would refuse (untrusted signature, force push)
    is not planned from; the last applied state is, its decisions saying why."""
    async with open_engine(config) as engine:
        if fetch:
            await engine.preview(judge=judge)
        else:
            await engine.load_at_last_sync()
        if (
            environment is not None
            and environment not in engine.effective
            and environment not in engine.invalid
        ):
            raise OperationError(f"unknown environment '{environment}'", code=2)
        return engine, await engine.decisions([environment] if environment else None)


def _note(version: str, reason: str | None) -> str:
    return f"to {version}: {reason}" if reason else f"to {version}"


def _not_suspended(environment: str) -> str:
    return (
        f"{environment} is not suspended: git wins at the next sync "
        f"(run `reconciler suspend --env {environment}` to keep this version)"
    )


async def _deploy_jobs(
    engine: Engine,
    *,
    environment: str,
    version: str,
    services: Collection[str] | None,
    trigger: str,
    who: str,
    reason: str | None,
    origin: str | None = None,
) -> tuple[list[Job], str | None]:
    """Check an operator's deploy (or rollback), record it, and return its jobs and the
    warning to show (git wins at the next sync unless the environment is suspended)."""
    spec = engine.effective.get(environment)
    if spec is None:
        raise OperationError(f"unknown environment '{environment}'", code=2)
    names = list(services) if services else list(spec.services)
    for name in names:
        if name not in spec.services:
            raise OperationError(f"environment '{environment}' has no service '{name}'", code=2)
    suspended = spec.suspended or environment in await durable(engine.store.suspended_environments)
    states = await durable(engine.store.service_states, [environment])
    jobs = []
    action = "rollback" if trigger == "rollback" else "deploy"
    for name in names:
        st = states.get((environment, name))
        await durable(
            engine.store.record_operator_action,
            environment=environment,
            service=name,
            action=action,
            actor=who,
            note=_note(version, reason),
            at=utcnow(),
            origin=origin,
        )
        log_action(action, who, environment, name, reason, version=version)
        jobs.append(
            Job(
                spec=spec,
                service=name,
                version=version,
                previous_version=st.deployed_version if st else None,
                trigger=trigger,
                commit=engine.commit,
                sync_id=engine.sync_id,
            )
        )
    return jobs, None if suspended else _not_suspended(environment)


async def deploy(
    config: Config,
    *,
    environment: str,
    version: str,
    services: Collection[str] | None,
    trigger: str = "manual",
    listener: Listener | None = None,
    warn: Callable[[str], None] | None = None,
    reason: str | None = None,
) -> list[DeploymentRecord]:
    """Deploy now, standalone (trigger manual, or rollback with an explicit target)."""
    async with open_engine(config, exclusive=True, listener=listener) as engine:
        await engine.recover()
        await engine.load_at_last_sync()
        if engine.commit is None:
            await engine.sync("manual")
        jobs, warning = await _deploy_jobs(
            engine,
            environment=environment,
            version=version,
            services=services,
            trigger=trigger,
            who=actor(),
            reason=reason,
            origin=local_origin(),
        )
        if warning and warn is not None:
            warn(warning)
        records = await engine.deploy_in_turn(jobs)
        await store_decisions(engine)
        return records


async def store_decisions(engine: Engine) -> int:
    """Store the decisions of the environments changed since they were last stored, as
    the daemon does after its syncs and deployments: what a standalone `status` serves
    without planning them again (reconciler/stored_status.py)."""
    from reconciler import stored_status

    return await asyncio.to_thread(
        stored_status.refresh, engine.store, engine.settings, engine.clock()
    )


def _rollback_target(
    store: Store, environment: str, service: str, to_version: str | None = None
) -> str:
    """The version a rollback deploys: the given one, which must have completed there
    before, or the latest completed version before the deployed one."""
    _check_known(store, environment, service)
    if to_version is not None:
        if not store.completed_versions([(environment, service, to_version)]):
            raise OperationError(
                f"{environment}/{service} never completed version {to_version}: "
                "roll back to a version that ran there, or use `reconciler deploy`"
            )
        return to_version
    st = store.service_states([environment]).get((environment, service))
    current = st.deployed_version if st else None
    target = store.previous_completed_version(environment, service, before_version=current)
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


async def rollback_target(
    config: Config, environment: str, service: str, to_version: str | None = None
) -> str:
    store = await asyncio.to_thread(open_store, config, migrate=False)
    try:
        return await asyncio.to_thread(_rollback_target, store, environment, service, to_version)
    finally:
        store.engine.dispose()


def _suspend(
    store: Store,
    environment: str,
    suspended: bool,
    who: str,
    reason: str | None,
    origin: str | None = None,
) -> None:
    known = store.environment_states()
    if known and environment not in known:
        raise OperationError(
            f"unknown environment '{environment}' (known: {', '.join(sorted(known))})", code=2
        )
    _record(store, "suspend" if suspended else "resume", environment, None, who, reason, origin)


async def set_suspended(
    config: Config, environment: str, suspended: bool, note: str | None
) -> None:
    """Suspend or resume, standalone (no daemon to ask)."""
    store = await asyncio.to_thread(open_store, config, migrate=False)
    try:
        await asyncio.to_thread(
            _suspend, store, environment, suspended, actor(), note, local_origin()
        )
    finally:
        store.engine.dispose()


# ---- carrying actions out inside the daemon (socket and HTTP handlers call these) ------


class Host(Protocol):
    """What the daemon offers the actions it carries out."""

    engine: Engine | None
    hub: EventHub

    def request_sync(self, trigger: str) -> None: ...

    def service_state_changed(self, environment: str) -> None:
        """The store's service state changed without a deployment event (a retry)."""
        ...

    def start(
        self, work: Coroutine[Any, Any, list[DeploymentRecord]], name: str
    ) -> asyncio.Task[list[DeploymentRecord]]: ...


@dataclass
class Started:
    """An action the daemon accepted, and what following it means."""

    accepted: Accepted
    environments: list[str] | None = None  # None: every environment
    services: set[str] | None = None  # None: every service of those
    deployments: asyncio.Task[list[DeploymentRecord]] | None = None  # deploy / rollback

    def covers(self, environment: str, service: str) -> bool:
        return (self.environments is None or environment in self.environments) and (
            self.services is None or service in self.services
        )


async def _held_elsewhere(store: Store, environment: str) -> str:
    """Why this replica will not deploy ``environment``, naming the one that does."""
    leases = await durable(store.leases)
    holder = next((lease.holder for lease in leases if lease.environment == environment), None)
    where = f"replica {holder}" if holder else "another replica (none holds it right now)"
    return (
        f"environment '{environment}' is deployed by {where}: run the command against that "
        "replica (`reconciler status --replicas` lists the replicas and their leases)"
    )


async def perform(host: Host, action: AnyAction, who: str, origin: str | None = None) -> Started:
    """Carry out one operator action in the daemon: check, record, log, set going.
    ``who``/``origin``: the OS user and process (control socket) or the token's holder and
    client address (HTTP), recorded with the action in the audit ledger."""
    engine = host.engine
    if engine is None:
        raise OperationError("the daemon is starting: try again in a moment")
    store = engine.store
    if isinstance(action, SyncAction):
        env, svc = action.environment, action.service
        if svc is not None and env is None:
            raise OperationError("a service needs its environment", code=2)
        if env is not None and engine.commit is not None:
            spec = engine.effective.get(env)
            if spec is None and env not in engine.invalid:
                raise OperationError(f"unknown environment '{env}'", code=2)
            if svc is not None and (spec is None or svc not in spec.services):
                raise OperationError(f"environment '{env}' has no service '{svc}'", code=2)
        if env is not None and svc is not None:
            await durable(_retry_request, store, env, svc, who, action.reason, origin)
            host.service_state_changed(env)
        else:
            await durable(_forced_sync, store, env, who, action.reason, origin)
        host.request_sync("manual")
        return Started(
            Accepted(message="sync requested"),
            [env] if env else None,
            {svc} if svc else None,
        )
    if isinstance(action, SuspendAction):
        await durable(
            _suspend,
            store,
            action.environment,
            action.action == "suspend",
            who,
            action.reason,
            origin,
        )
        host.service_state_changed(action.environment)  # its decisions change: re-plan them
        if action.action == "resume":
            host.request_sync("manual")  # a resumed environment deploys what it held back
        return Started(Accepted(message=f"{action.environment} {action.action}d"))
    if engine.commit is None:
        raise OperationError("the daemon has not synced yet: try again in a moment")
    if isinstance(action, RollbackAction):
        spec = engine.effective.get(action.environment)
        if spec is None:
            raise OperationError(f"unknown environment '{action.environment}'", code=2)
        if action.service not in spec.services:
            raise OperationError(
                f"environment '{action.environment}' has no service '{action.service}'", code=2
            )
        version = await durable(
            _rollback_target, store, action.environment, action.service, action.to
        )
        services: list[str] | None = [action.service]
        trigger = "rollback"
    else:
        version, services, trigger = action.version, action.services, "manual"
    fence_for = engine.runners.fence_for
    if fence_for is not None and fence_for(action.environment) is None:
        raise OperationError(await _held_elsewhere(store, action.environment))
    jobs, warning = await _deploy_jobs(
        engine,
        environment=action.environment,
        version=version,
        services=services,
        trigger=trigger,
        who=who,
        reason=action.reason,
        origin=origin,
    )
    task = host.start(engine.deploy_in_turn(jobs), f"operator-{action.action}")
    names = {j.service for j in jobs}
    return Started(
        Accepted(
            message=f"deploying {version} to {action.environment}/{','.join(sorted(names))}",
            warnings=[warning] if warning else [],
        ),
        [action.environment],
        names,
        task,
    )


async def handle(
    host: Host, action: AnyAction, who: str, events: Subscription, origin: str | None = None
) -> AsyncIterator[Answer]:
    """The control channel's conversation: accept (or refuse), then with `wait` follow
    what the action caused to the end. `events` is subscribed before the action starts,
    so nothing it causes is missed."""
    try:
        started = await perform(host, action, who, origin)
    except Refused as exc:
        yield Failed(message=str(exc), code=exc.code)
        return
    yield started.accepted
    if not action.wait:
        yield Done()
        return
    engine = host.engine
    assert engine is not None
    if started.deployments is not None:
        task = started.deployments
        while not task.done():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            event = getter.result()
            if isinstance(event, DeploymentEvent) and started.covers(
                event.environment, event.service
            ):
                yield _progress(event)
        while (left := events.get_nowait()) is not None:
            if isinstance(left, DeploymentEvent) and started.covers(left.environment, left.service):
                yield _progress(left)
        try:
            records = task.result()
        except Refused as exc:
            yield Failed(message=str(exc), code=exc.code)
            return
        except Exception as exc:
            yield Failed(message=f"the deployment could not run: {type(exc).__name__}: {exc}")
            return
        yield Done(deployment_ids=[r.id for r in records])
        return
    if not isinstance(action, SyncAction):
        yield Done()
        return
    # A sync: its outcome, then the runs in scope until nothing there is due or running.
    ids = {r.id for env, r in engine.deploying.items() if started.covers(env, r.service)}
    ended: set[int] = set()  # the runs whose terminal event was passed on

    def ours(event: object) -> DeploymentEvent | None:
        if isinstance(event, DeploymentEvent) and started.covers(event.environment, event.service):
            ids.add(event.deployment_id)
            if event.status in TERMINAL_STATUSES:
                ended.add(event.deployment_id)
            return event
        return None

    outcome: SyncOutcome | None = None
    while outcome is None:
        event = await events.get()
        if isinstance(event, SyncOutcome):
            if event.trigger == "manual":
                outcome = event
        elif ours(event) is not None:
            yield _progress(event)
    yield SyncResult(
        sync_id=outcome.sync_id,
        commit=outcome.commit,
        result=outcome.result,
        environments_changed=list(outcome.environments_changed),
        errors=list(outcome.errors),
        message=outcome.message,
    )
    if outcome.result not in ("failed", "refused"):
        # Quiet in the store can come before the last events of a run reach this queue
        # (they are published once its record is written): a run seen going is followed
        # to its terminal event, or for one more poll once the store says it ended.
        quiet = False
        while True:
            while (left := events.get_nowait()) is not None:
                if (mine := ours(left)) is not None:
                    yield _progress(mine)
            quiet = quiet or await _quiet(engine, started)
            if quiet and ids <= ended:
                break
            try:
                event = await asyncio.wait_for(events.get(), POLL_SECONDS)
            except TimeoutError:
                if quiet:
                    break  # its event went elsewhere: the records below still tell
                continue
            if (mine := ours(event)) is not None:
                yield _progress(mine)
    # The runs of the head commit: one running an older commit when we asked is not ours.
    commit = outcome.commit
    yield Done(
        deployment_ids=[
            r.id
            for r in await durable(_records, engine.store, sorted(ids))
            if commit is None or r.commit == commit
        ]
    )


def _records(store: Store, ids: list[int]) -> list[DeploymentRecord]:
    return [r for r in (store.get_deployment(i) for i in ids) if r is not None]


async def _quiet(engine: Engine, started: Started) -> bool:
    """Nothing due or running any more among the services a sync --wait follows."""
    decisions = await engine.decisions(started.environments)
    return not any(
        (d.deploy or d.state == "deploying") and started.covers(d.environment, d.service)
        for d in decisions
    )


def _progress(ev: DeploymentEvent) -> Progress:
    return Progress(
        deployment_id=ev.deployment_id,
        environment=ev.environment,
        service=ev.service,
        version=ev.version,
        trigger=ev.trigger,
        status=ev.status,
        message=ev.message,
        percent=ev.percent,
    )


def check_providers(config: Config) -> None:
    build_providers(config)


__all__ = [
    "AnyAction",
    "ConfigError",
    "DaemonReply",
    "DeployAction",
    "Host",
    "OperationError",
    "RollbackAction",
    "Started",
    "SuspendAction",
    "SyncAction",
    "SyncReport",
    "ask_daemon",
    "check_providers",
    "decisions",
    "deploy",
    "handle",
    "log_action",
    "open_engine",
    "open_store",
    "perform",
    "rollback_target",
    "running_daemon",
    "set_suspended",
    "sync",
]
