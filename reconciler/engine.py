"""The reconcile engine: commits in, deployments out, everything recorded.

One asyncio event loop owns it. A sync reads the branch head, loads only the environment
files that changed since the last synced commit, records the sync, and wakes the
environments whose desired state changed. Each environment has one runner task that asks
the planner for the next action and runs it, so inside an environment one deployment runs
at a time, in file order, and a commit storm coalesces into "deploy the newest version"
(the runner always plans from the latest desired state). A semaphore bounds how many
environments deploy at once. APScheduler only decides *when* to look again (polling,
retry backoff, windows opening); the runners decide *whether*.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from desired_state import (
    DesiredState,
    EnvironmentSpec,
    FileError,
    ParsedFile,
    assemble,
    gc_paused,
    parse_environment_file,
)
from reconciler.config import Config
from reconciler.drift import DriftMonitor
from reconciler.executor import Executor, Job, Listener, utcnow
from reconciler.plan import (
    Decision,
    LiveVersion,
    PlanSettings,
    RecordedState,
    ServiceRecord,
    dependency_triples,
    plan,
)
from reconciler.providers import Provider, spec_check
from reconciler.providers.process import end_group
from reconciler.source import Changes, CommitInfo, GitSource, SourceError
from reconciler.store import CommitMeta, DeploymentRecord, EnvironmentStateRecord, Store

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: reconciler stopped during the run"
FAILURES = frozenset({"failed", "timed_out"})


@dataclass
class SyncOutcome:
    sync_id: int | None
    commit: str | None
    result: str  # ok | errors | failed | refused | unchanged
    environments_changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    message: str | None = None
    trigger: str = ""
    duration_seconds: float = 0.0


@dataclass
class _Prepared:
    """A sync's reading half: what the head says, before anything is recorded."""

    refused_from: str | None  # set: a rewritten history that is not accepted
    meta: CommitMeta | None = None
    parsed: dict[str, ParsedFile] = field(default_factory=dict)
    desired: DesiredState = field(default_factory=lambda: assemble([]))
    effective: dict[str, EnvironmentSpec] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    full: bool = False
    note: str | None = None

    @classmethod
    def refused(cls, applied: str) -> _Prepared:
        return cls(refused_from=applied)

    @property
    def result(self) -> str:
        return "errors" if self.desired.errors else "ok"


def host_timezone() -> tzinfo:
    tz = datetime.now().astimezone().tzinfo
    return tz if tz is not None else UTC


def _plan_settings(config: Config) -> PlanSettings:
    tz = ZoneInfo(config.daemon.timezone) if config.daemon.timezone else host_timezone()
    d = config.daemon
    return PlanSettings(retries=d.retries, retry_backoff=d.retry_backoff, timezone=tz)


def _meta(info: CommitInfo) -> CommitMeta:
    return CommitMeta(sha=info.sha, author=info.author, time=info.authored_at, subject=info.subject)


class Engine:
    def __init__(
        self,
        config: Config,
        store: Store,
        source: GitSource,
        providers: Mapping[str, Provider],
        *,
        listener: Listener | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.source = source
        self.providers = dict(providers)
        self.clock = clock
        self.executor = Executor(
            store,
            self.providers,
            kill_grace=config.daemon.kill_grace,
            log_cap=config.daemon.log_cap,
            listener=listener,
            clock=clock,
        )
        self.settings = _plan_settings(config)
        # Desired state as of the last synced commit.
        self.parsed: dict[str, ParsedFile] = {}
        self.commit: CommitMeta | None = None
        self.sync_id: int | None = None
        self.desired: DesiredState | None = None
        self.effective: dict[str, EnvironmentSpec] = {}
        self.invalid: dict[str, str] = {}
        self._path_env: dict[str, str] = {}  # file path -> the environment it last declared
        # Runners.
        self.slots = asyncio.Semaphore(config.daemon.max_parallel)
        self._max_parallel = config.daemon.max_parallel
        self.stopping = False
        self._wake: dict[str, asyncio.Event] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._deploying: dict[str, DeploymentRecord] = {}
        self._active: set[str] = set()  # environments whose runner is awake
        self._env_locks: dict[str, asyncio.Lock] = {}  # one deployment at a time per environment
        # Standalone commands drain environments themselves: no background runners.
        self.runners_enabled = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._sync_lock = asyncio.Lock()
        self._last_error: str | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.on_sync: Callable[[SyncOutcome], None] | None = None
        # Live versions, read off the deployment path (started by the daemon).
        self.drift = DriftMonitor(
            store,
            lambda: self.effective,
            lambda: self.providers,
            wake=self.wake,
            clock=clock,
            interval=config.daemon.drift_interval,
        )
        self._keeping: asyncio.Task[None] | None = None  # GitSource.keep of the last commit

    def reload(self, config: Config, providers: Mapping[str, Provider]) -> None:
        """Take a new configuration (SIGHUP) without touching running deployments: they
        finish with the provider instance they started with."""
        self.config = config
        self.providers = dict(providers)
        self.executor.providers = self.providers
        self.executor.kill_grace = config.daemon.kill_grace
        self.executor.log_cap = config.daemon.log_cap
        self.settings = _plan_settings(config)
        self.drift.interval = config.daemon.drift_interval
        if config.daemon.max_parallel != self._max_parallel:
            # Running deployments release the old semaphore; new ones take the new one.
            self.slots = asyncio.Semaphore(config.daemon.max_parallel)
            self._max_parallel = config.daemon.max_parallel

    def queue_depth(self) -> int:
        """Environments with work due now or running."""
        return sum(1 for env, e in self._wake.items() if e.is_set() or env in self._active)

    # ---- desired state ---------------------------------------------------------------

    async def recover(self) -> list[int]:
        """End what a previous process left running (SPEC §4 rule 8).

        A run's process group outlives a daemon that was killed (it is a session of its
        own): it is ended first (SIGTERM, SIGKILL after `kill_grace`), so the same service
        never runs twice at once once its record is closed and planned again.
        """
        survivors = await asyncio.to_thread(self.store.unfinished_processes)
        ended = await asyncio.gather(
            *(end_group(pgid, token, self.config.daemon.kill_grace) for _, pgid, token in survivors)
        )
        for (deployment_id, pgid, _), was_running in zip(survivors, ended, strict=True):
            if was_running:
                log.warning("event=orphan_ended id=%d pgid=%d", deployment_id, pgid)
        ids = await asyncio.to_thread(
            self.store.interrupt_unfinished, message=INTERRUPTED, at=self.clock()
        )
        if ids:
            log.warning("event=recovered interrupted=%s", ",".join(map(str, ids)))
        return ids

    def _parse(self, files: Mapping[str, bytes]) -> dict[str, ParsedFile]:
        prefix = self.config.repository.path.strip("/")
        shown = (lambda p: p) if prefix in ("", ".") else (lambda p: f"{prefix}/{p}")
        with gc_paused():
            check = spec_check(self.providers)
            return {
                path: parse_environment_file(shown(path), data, check)
                for path, data in files.items()
            }

    async def sync(self, trigger: str = "manual") -> SyncOutcome:
        """One pass over the branch head: fetch, load, record; wake what changed."""
        async with self._sync_lock:
            started = time.monotonic()
            outcome = await self._sync(trigger)
            outcome.trigger = trigger
            outcome.duration_seconds = time.monotonic() - started
        if outcome.result in ("ok", "errors"):
            self.drift.request()  # a commit was applied: read the live versions again
        if self.on_sync is not None:
            self.on_sync(outcome)
        return outcome

    async def _sync(self, trigger: str) -> SyncOutcome:
        seen = self.clock()
        try:
            head = await asyncio.to_thread(self.source.fetch)
        except SourceError as exc:
            return await self._fetch_failed(trigger, seen, str(exc))
        old = self.commit.sha if self.commit else None
        if head == old and trigger in ("poll", "watch", "webhook"):
            self._last_error = None
            return SyncOutcome(self.sync_id, head, "unchanged")
        # Reading and parsing in one trip off the loop; nothing is applied yet.
        step = await asyncio.to_thread(self._prepare, old, head)
        if step.refused_from is not None:
            return await self._refuse(trigger, seen, head, step.refused_from)
        self._last_error = None
        sync_id = await asyncio.to_thread(self._record, trigger, seen, step)
        self.parsed, self.desired, self.commit, self.sync_id = (
            step.parsed,
            step.desired,
            step.meta,
            sync_id,
        )
        self.effective, self.invalid = step.effective, step.invalid
        log.info(
            "event=sync trigger=%s commit=%s result=%s changed=%s errors=%d full=%s%s",
            trigger,
            head[:12],
            step.result,
            ",".join(step.changed) or "-",
            len(step.desired.errors),
            step.full,
            f" note={step.note!r}" if step.note else "",
        )
        for err in step.desired.errors:
            log.warning("event=invalid_file error=%r", str(err))
        self.wake(step.effective if old is None or step.full else step.changed)
        if head != old:  # beside the deployments, which need not wait for it (~30 ms)
            previous = self._keeping
            self._keeping = asyncio.create_task(self._keep(head, previous), name="keep")
        errors = [str(e) for e in step.desired.errors]
        return SyncOutcome(sync_id, head, step.result, step.changed, errors)

    def _prepare(self, old: str | None, head: str) -> _Prepared:
        """Load what changed since `old`, parse it, and work out the new desired state."""
        changes = self.source.load(old, head)
        if old is not None:
            rewritten = changes.full and changes.reason is not None
            applied: str | None = old
        else:  # after a restart: compare with the last commit the ledger says was applied
            applied = self.store.last_synced_commit()
            rewritten = (
                applied is not None
                and applied != head
                and not self.source.is_ancestor(applied, head)
            )
        if rewritten and not self.config.repository.allow_force_push:
            return _Prepared.refused(applied or "")
        step = self._read(head, changes)
        if rewritten and step.note is None:
            step.note = f"history rewritten: {(applied or '')[:12]} is not an ancestor of {head[:12]}; full load"
        return step

    def _read(self, head: str, changes: Changes) -> _Prepared:
        """Parse what changed and work out the desired state it makes (nothing recorded)."""
        meta = _meta(self.source.commit_info(head))
        parsed = {} if changes.full else dict(self.parsed)
        for path in changes.deleted:
            parsed.pop(path, None)
        parsed.update(self._parse(changes.files))
        desired = assemble(parsed.values(), providers=self.providers.keys())
        effective, invalid = self._effective(desired, parsed)
        changed = sorted(
            env
            for env in set(effective) | set(self.effective) | set(invalid) | set(self.invalid)
            if effective.get(env) != self.effective.get(env)
            or invalid.get(env) != self.invalid.get(env)
        )
        return _Prepared(
            None, meta, parsed, desired, effective, invalid, changed, changes.full, changes.reason
        )

    def _record(self, trigger: str, seen: datetime, step: _Prepared) -> int:
        assert step.meta is not None and step.desired is not None
        sync_id = self.store.begin_sync(trigger=trigger, seen_at=seen, commit=step.meta)
        self._save_states(step.desired, step.meta.sha)
        saved = set(self.store.environment_states()) if step.full else set(self.effective)
        self.store.forget_environment_states(saved - set(step.effective))
        self.store.finish_sync(
            sync_id,
            result=step.result,
            ended_at=self.clock(),
            environments_changed=step.changed,
            errors=[e.to_dict() for e in step.desired.errors],
            full_load=step.full,
            note=step.note,
        )
        return sync_id

    async def _keep(self, sha: str, previous: asyncio.Task[None] | None) -> None:
        """Have the mirror keep what was applied readable (GitSource.keep), in order."""
        if previous is not None:
            await previous
        try:
            await asyncio.to_thread(self.source.keep, sha)
        except Exception as exc:  # the next applied commit tries again
            log.warning("event=keep_failed commit=%s error=%r", sha[:12], str(exc))

    async def kept(self) -> None:
        """Wait until the mirror keeps the last applied commit (stop, standalone runs)."""
        if self._keeping is not None:
            await asyncio.shield(self._keeping)

    async def _refuse(self, trigger: str, seen: datetime, head: str, applied: str) -> SyncOutcome:
        """A head that does not descend from the last applied commit (a force push) is not
        applied unless `allow_force_push`; recorded once per refused head."""
        message = (
            f"refused {head[:12]}: it does not descend from the last applied commit "
            f"{applied[:12]} (history rewritten); set repository.allow_force_push = true to accept"
        )
        if self.commit is None and applied:
            # Just started: what stays in force is what was applied, not nothing.
            await self._load_applied(applied)
            self.wake(self.effective)
        log.error("event=sync_refused commit=%s applied=%s", head[:12], applied[:12])
        meta = None
        if message != self._last_error:  # already recorded: no need to read the commit
            meta = _meta(await asyncio.to_thread(self.source.commit_info, head))
        sync_id = await self._record_once(trigger, seen, meta, "refused", message)
        return SyncOutcome(sync_id, head, "refused", message=message)

    async def _fetch_failed(self, trigger: str, seen: datetime, message: str) -> SyncOutcome:
        log.error("event=fetch_failed error=%r", message)
        sync_id = await self._record_once(trigger, seen, None, "failed", message)
        return SyncOutcome(sync_id, None, "failed", message=message)

    async def _record_once(
        self, trigger: str, seen: datetime, commit: CommitMeta | None, result: str, message: str
    ) -> int | None:
        """Record a sync that applied nothing, once per distinct error: the same outage or
        refusal is one record, not one per poll."""
        if message == self._last_error:
            return None
        self._last_error = message
        sync_id = await asyncio.to_thread(
            self.store.begin_sync, trigger=trigger, seen_at=seen, commit=commit
        )
        await asyncio.to_thread(
            self.store.finish_sync,
            sync_id,
            result=result,
            ended_at=self.clock(),
            environments_changed=[],
            errors=[],
            full_load=False,
            error_message=message,
        )
        return sync_id

    def _effective(
        self, desired: DesiredState, parsed: Mapping[str, ParsedFile]
    ) -> tuple[dict[str, EnvironmentSpec], dict[str, str]]:
        """Valid environments as written; a broken one keeps its last valid desired state.

        A file too broken to name its environment is matched to the environment it declared
        before (by path), so that environment shows as invalid instead of vanishing.
        """
        effective = dict(desired.environments)
        failing: dict[str, list[FileError]] = {e: list(errs) for e, errs in desired.invalid.items()}
        saved: dict[str, EnvironmentStateRecord] | None = None
        by_shown_path = {p.path: p for p in parsed.values()}
        for path, errs in desired.broken_files.items():
            pf = by_shown_path.get(path)
            name = pf.env_name if pf is not None else None
            if name is None:
                name = self._path_env.get(path)
            if name is None:
                saved = saved if saved is not None else self.store.environment_states()
                name = next((e for e, st in saved.items() if st.source_path == path), None)
            if name is not None and name not in effective:
                failing.setdefault(name, list(errs))
        invalid: dict[str, str] = {}
        for env, errs in failing.items():
            invalid[env] = str(errs[0]) + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else "")
            effective.pop(env, None)
            previous = self.effective.get(env)
            if previous is None:
                saved = saved if saved is not None else self.store.environment_states()
                if env in saved:
                    previous = EnvironmentSpec.model_validate(saved[env].spec)
            if previous is not None:
                effective[env] = previous
        for env, path in desired.sources.items():
            self._path_env[path] = env
        return effective, invalid

    def _save_states(self, desired: DesiredState, commit: str) -> None:
        changed = [
            (env, spec.model_dump(mode="json"), desired.sources[env])
            for env, spec in desired.environments.items()
            if self.effective.get(env) != spec
        ]
        if changed:
            self.store.save_environment_states(changed, commit=commit, at=self.clock())

    async def load_at_last_sync(self) -> None:
        """The desired state of the last synced commit, from the local clone (for `status`)."""
        sha = await asyncio.to_thread(self.store.last_synced_commit)
        if sha is not None:
            await self._load_applied(sha)

    async def _load_applied(self, sha: str) -> None:
        """The desired state applied at `sha`: read from the mirror (which keeps it), else,
        when even the mirror cannot read it (deleted, say), the environment states saved at
        each sync."""
        try:
            await self._load_full(sha)
            return
        except SourceError as exc:
            log.warning(
                "event=applied_commit_unreadable commit=%s error=%r using=saved_states",
                sha[:12],
                str(exc),
            )
        saved, meta = await asyncio.to_thread(
            lambda: (self.store.environment_states(), self.store.applied_commit())
        )
        self.parsed, self.desired, self.invalid = {}, None, {}
        self.effective = {
            name: EnvironmentSpec.model_validate(state.spec) for name, state in saved.items()
        }
        self.commit = (
            meta if meta is not None and meta.sha == sha else CommitMeta(sha, None, None, None)
        )

    async def preview(self) -> None:
        """The desired state at the fetched branch head, recording nothing (for `plan`)."""
        await self._load_full(await asyncio.to_thread(self.source.fetch))

    async def _load_full(self, sha: str) -> None:
        step = await asyncio.to_thread(lambda: self._read(sha, self.source.load(None, sha)))
        self.parsed, self.desired, self.commit = step.parsed, step.desired, step.meta
        self.effective, self.invalid = step.effective, step.invalid

    # ---- planning --------------------------------------------------------------------

    def recorded(self, environments: Iterable[str] | None = None) -> RecordedState:
        envs = None if environments is None else set(environments)
        specs = (
            self.effective
            if envs is None
            else {e: s for e, s in self.effective.items() if e in envs}
        )
        deps = {d for s in specs.values() for d in s.depends_on}
        states = self.store.service_states(None if envs is None else envs | deps)
        services = {
            key: ServiceRecord(
                deployed_version=st.deployed_version,
                running=st.running_deployment_id is not None,
                last_status=st.last_status,
                last_version=st.last_version,
                last_deployment_id=st.last_deployment_id,
                streak_version=st.streak_version,
                streak_count=st.streak_count,
                streak_last_at=st.streak_last_at,
            )
            for key, st in states.items()
        }
        triples = dependency_triples(specs)
        completed = self.store.completed_versions(triples) if triples else set()
        live = {
            key: LiveVersion(obs.version, obs.deployment_id)
            for key, obs in self.store.live_versions(envs).items()
            if obs.version is not None
        }
        return RecordedState(
            services=services,
            operator_suspended=frozenset(self.store.suspended_environments()),
            completed=frozenset(completed),
            live=live,
        )

    async def decisions(self, environments: Iterable[str] | None = None) -> list[Decision]:
        envs = None if environments is None else list(environments)
        recorded = await asyncio.to_thread(self.recorded, envs)
        desired = (
            self.effective
            if envs is None
            else {e: s for e, s in self.effective.items() if e in envs}
        )
        invalid = (
            self.invalid if envs is None else {e: m for e, m in self.invalid.items() if e in envs}
        )
        declared = {e: s.services.keys() for e, s in self.effective.items()}
        return plan(desired, recorded, self.clock(), self.settings, invalid, declared)

    # ---- runners ---------------------------------------------------------------------

    def wake(self, environments: Iterable[str]) -> None:
        for env in environments:
            if self.stopping or not self.runners_enabled:
                return
            event = self._wake.get(env)
            if event is None:
                event = self._wake[env] = asyncio.Event()
                self._runners[env] = asyncio.get_running_loop().create_task(
                    self._runner(env), name=f"runner:{env}"
                )
            event.set()
            self._idle.clear()

    async def _runner(self, env: str) -> None:
        event = self._wake[env]
        while not self.stopping:
            await event.wait()
            event.clear()
            if self.stopping:
                return
            self._active.add(env)
            try:
                await self.drain(env)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store was unreachable, say: try again at the next wake
                log.exception("event=runner_error environment=%s", env)
                self._schedule_wake(env, self.clock().timestamp() + self.settings.retry_backoff)
            finally:
                self._active.discard(env)
                if not self._active and not any(e.is_set() for e in self._wake.values()):
                    self._idle.set()

    async def drain(
        self, env: str, *, once: bool = False, services: Collection[str] | None = None
    ) -> list[DeploymentRecord]:
        """Run this environment's due actions one at a time until none is due.

        `once`: each service at most one attempt (a standalone `sync` pass).
        `services`: only these services (an operator's `sync --service`).
        """
        async with self._env_locks.setdefault(env, asyncio.Lock()):
            return await self._drain(env, once, services)

    async def _drain(
        self, env: str, once: bool, services: Collection[str] | None
    ) -> list[DeploymentRecord]:
        done: list[DeploymentRecord] = []
        tried: set[str] = set()
        if services is not None and env in self.effective:
            tried = set(self.effective[env].services) - set(services)
        while not self.stopping and env in self.effective and env not in self.invalid:
            decisions = await self.decisions([env])
            due = [
                d for d in decisions if d.environment == env and d.deploy and d.service not in tried
            ]
            if not due:
                self._schedule_next(env, decisions)
                break
            decision = due[0]
            if once:
                tried.add(decision.service)
            async with self.slots:
                if self.stopping:
                    break
                done.extend(await self._deploy(self.effective[env], decision))
        return done

    async def _deploy(self, spec: EnvironmentSpec, d: Decision) -> list[DeploymentRecord]:
        assert d.desired is not None and d.trigger is not None
        job = Job(
            spec=spec,
            service=d.service,
            version=d.desired,
            previous_version=d.deployed,
            trigger=d.trigger,
            attempt=d.attempt,
            commit=self.commit,
            sync_id=self.sync_id,
        )
        return await self.deploy(job)

    async def deploy(self, job: Job) -> list[DeploymentRecord]:
        """Run a job and, if it fails and the environment says `on_failure: rollback`,
        deploy the previous version (SPEC §4 rule 6). Returns every record it made."""
        rec = await self.run_job(job)
        out = [rec]
        previous = job.previous_version
        if (
            rec.status in FAILURES
            and job.spec.on_failure == "rollback"
            and previous is not None
            and previous != job.version
            and job.trigger != "rollback"
            and not self.stopping
        ):
            back = replace(
                job,
                version=previous,
                previous_version=job.version,
                trigger="rollback",
                attempt=1,
                rollback_of=rec.id,
            )
            rb = await self.run_job(back)
            out.append(rb)
            if rb.status == "completed" and rec.status == "failed":
                out[0] = await self.executor.mark_rolled_back(
                    rec, f"rolled back to {previous} by deployment {rb.id}"
                )
        return out

    async def run_job(self, job: Job) -> DeploymentRecord:
        rec = await self.executor.create(job)
        self._deploying[job.environment] = rec
        log.info(
            "event=deployment_started id=%d environment=%s service=%s version=%s trigger=%s attempt=%d",
            rec.id,
            job.environment,
            job.service,
            job.version,
            job.trigger,
            job.attempt,
        )
        try:
            final = await self.executor.run(job, rec)
        finally:
            self._deploying.pop(job.environment, None)
            self.drift.deployment_ended(job.environment, job.service)
        level = logging.INFO if final.status == "completed" else logging.WARNING
        log.log(
            level,
            "event=deployment_ended id=%d environment=%s service=%s version=%s status=%s%s",
            final.id,
            job.environment,
            job.service,
            job.version,
            final.status,
            f" error={final.error_message!r}" if final.error_message else "",
        )
        if final.status == "completed":
            self.wake(e for e, s in self.effective.items() if job.environment in s.depends_on)
        return final

    def _schedule_next(self, env: str, decisions: list[Decision]) -> None:
        times = [d.not_before for d in decisions if d.not_before is not None]
        if times:
            self._schedule_wake(env, min(times).timestamp())

    def _schedule_wake(self, env: str, timestamp: float) -> None:
        if self.scheduler is None or self.stopping:
            return
        self.scheduler.add_job(
            self.wake,
            "date",
            run_date=datetime.fromtimestamp(timestamp + 0.05, UTC),
            args=[[env]],
            id=f"wake:{env}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    @property
    def deploying(self) -> dict[str, DeploymentRecord]:
        return dict(self._deploying)

    async def idle(self) -> None:
        """Wait until no runner has anything to do right now (for tests and standalone runs)."""
        await self._idle.wait()

    async def stop(self, grace: float) -> list[int]:
        """Stop starting work; let running deployments finish within `grace` seconds, then
        cancel them (they end `cancelled`). Returns the ids of the cancelled deployments."""
        self.stopping = True
        await self.drift.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await self.kept()
        for event in self._wake.values():
            event.set()
        tasks = list(self._runners.values())
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=grace)
        cancelled = [rec.id for rec in self._deploying.values()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return cancelled

    def describe(self) -> dict[str, Any]:
        return {
            "commit": self.commit.sha if self.commit else None,
            "deploying": len(self._deploying),
            "environments": len(self.effective),
            "invalid": sorted(self.invalid),
        }


def open_source(config: Config) -> GitSource:
    return GitSource(
        config.repository_url,
        config.repository.branch,
        config.repository.path,
        Path(config.state_dir) / "repo.git",
    )
