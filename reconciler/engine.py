"""The reconcile engine: commits in, deployments out, everything recorded.

`Engine` is the facade the daemon, the commands and the HTTP side use. It wires three
parts, each in a module of its own:

- `reconciler.sync`: fetch → load → record, publishing an immutable `Snapshot` of the
  desired state per synced commit;
- `reconciler.planning`: a snapshot + the ledger → decisions, off the event loop;
- `reconciler.runners`: one runner task per environment, the `max_parallel` slots, and
  the jobs they run (with rollback after failure).

One asyncio event loop owns it all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from desired_state import DesiredState, EnvironmentSpec, ParsedFile
from reconciler.config import Config
from reconciler.drift import DriftMonitor
from reconciler.executor import Executor, Job, Listener, utcnow
from reconciler.plan import Decision, PlanSettings, RecordedState
from reconciler.planning import Planner, host_timezone, plan_settings
from reconciler.providers import Provider, spec_check
from reconciler.providers.process import end_group, marked_groups, use_pidfd_child_watcher
from reconciler.runners import FAILURES, Runners
from reconciler.source import GitSource
from reconciler.store import CommitMeta, DeploymentRecord, Store
from reconciler.sync import Snapshot, SyncOutcome, SyncPipeline, open_source, open_verifier

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: reconciler stopped during the run"

__all__ = [
    "FAILURES",
    "INTERRUPTED",
    "Engine",
    "Snapshot",
    "SyncOutcome",
    "host_timezone",
    "open_source",
    "open_verifier",
]


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
        use_pidfd_child_watcher()  # runs and git commands: no thread per child process
        self.config = config
        self.store = store
        self.source = source
        self.providers = dict(providers)
        self.executor = Executor(
            store,
            self.providers,
            kill_grace=config.daemon.kill_grace,
            log_cap=config.daemon.log_cap,
            listener=listener,
            clock=clock,
        )
        self.pipeline = SyncPipeline(config, store, source, list(self.providers), clock)
        self.pipeline.check = spec_check(self.providers)
        self.planner = Planner(store, plan_settings(config), clock)
        self.runners = Runners(
            self.executor,
            self.planner,
            lambda: self.pipeline.snapshot,
            max_parallel=config.daemon.max_parallel,
        )
        self._clock = clock
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
        self.runners.on_run_ended = self.drift.deployment_ended

    def reload(self, config: Config, providers: Mapping[str, Provider]) -> None:
        """Take a new configuration (SIGHUP) without touching running deployments: they
        finish with the provider instance they started with."""
        self.config = config
        self.providers = dict(providers)
        self.executor.providers = self.providers
        self.executor.kill_grace = config.daemon.kill_grace
        self.executor.log_cap = config.daemon.log_cap
        self.pipeline.reconfigure(config, open_verifier(config))
        self.pipeline.provider_names = list(self.providers)
        self.pipeline.check = spec_check(self.providers)
        self.drift.interval = config.daemon.drift_interval
        self.planner.settings = plan_settings(config)
        self.runners.resize(config.daemon.max_parallel)

    # ---- what the parts share --------------------------------------------------------

    @property
    def clock(self) -> Callable[[], datetime]:
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], datetime]) -> None:
        self._clock = self.pipeline.clock = self.planner.clock = clock

    @property
    def settings(self) -> PlanSettings:
        return self.planner.settings

    @property
    def snapshot(self) -> Snapshot:
        """The desired state as of the last synced (or loaded) commit."""
        return self.pipeline.snapshot

    def _replace_snapshot(self, **changes: Any) -> None:
        self.pipeline.snapshot = replace(self.pipeline.snapshot, **changes)

    @property
    def commit(self) -> CommitMeta | None:
        return self.snapshot.commit

    @commit.setter
    def commit(self, commit: CommitMeta | None) -> None:
        self._replace_snapshot(commit=commit)

    @property
    def sync_id(self) -> int | None:
        return self.snapshot.sync_id

    @property
    def parsed(self) -> Mapping[str, ParsedFile]:
        return self.snapshot.parsed

    @property
    def desired(self) -> DesiredState | None:
        return self.snapshot.desired

    @property
    def effective(self) -> Mapping[str, EnvironmentSpec]:
        return self.snapshot.effective

    @effective.setter
    def effective(self, effective: Mapping[str, EnvironmentSpec]) -> None:
        self._replace_snapshot(effective=dict(effective))

    @property
    def invalid(self) -> Mapping[str, str]:
        return self.snapshot.invalid

    @property
    def slots(self) -> asyncio.Semaphore:
        return self.runners.slots

    @slots.setter
    def slots(self, slots: asyncio.Semaphore) -> None:
        self.runners.slots = slots

    @property
    def stopping(self) -> bool:
        return self.runners.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.runners.stopping = value

    @property
    def runners_enabled(self) -> bool:
        return self.runners.enabled

    @runners_enabled.setter
    def runners_enabled(self, value: bool) -> None:
        self.runners.enabled = value

    @property
    def scheduler(self) -> AsyncIOScheduler | None:
        return self.runners.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: AsyncIOScheduler | None) -> None:
        self.runners.scheduler = scheduler

    @property
    def _wake(self) -> dict[str, asyncio.Event]:
        return self.runners.wakes

    @property
    def _runners(self) -> dict[str, asyncio.Task[None]]:
        return self.runners.tasks

    @property
    def _deploying(self) -> dict[str, DeploymentRecord]:
        return self.runners.deploying

    def queue_depth(self) -> int:
        """Environments with work due now or running."""
        return self.runners.queue_depth()

    # ---- desired state ---------------------------------------------------------------

    async def recover(self, environments: Collection[str] | None = None) -> list[int]:
        """End what a previous process left running (SPEC §4 rule 8): everywhere at start,
        or in ``environments`` only (a replica that has just claimed them from another).

        A run's process group outlives a daemon that was killed (it is a session of its
        own): it is ended first (SIGTERM, SIGKILL after `kill_grace`), so the same service
        never runs twice at once once its record is closed and planned again. (Only on
        this host: its start token does not match a process of another host.)

        The group is found by its record, and by the marker in the environment of every
        process of the run (`marked_groups`): a daemon killed between the spawn and the
        record of the group, or a child that left the group, leaves processes only the
        marker names. Without ``/proc`` (not Linux) the recorded group alone is ended.
        """
        unfinished = await asyncio.to_thread(self.store.unfinished_runs, environments=environments)
        groups: dict[tuple[int, int], str] = {
            (did, pgid): token for did, pgid, token in unfinished if pgid is not None and token
        }
        if unfinished:
            ledger = await asyncio.to_thread(self.store.ledger_id)
            marked = await asyncio.to_thread(marked_groups, ledger, [u[0] for u in unfinished])
            for did, found in marked.items():
                for pgid, token in found.items():
                    groups.setdefault((did, pgid), token)  # the recorded leader's goes first
        grace = self.config.daemon.kill_grace
        ended = await asyncio.gather(*(end_group(g[1], t, grace) for g, t in groups.items()))
        for (deployment_id, pgid), was_running in zip(groups, ended, strict=True):
            if was_running:
                log.warning("event=orphan_ended id=%d pgid=%d", deployment_id, pgid)
        ids = await asyncio.to_thread(
            self.store.interrupt_unfinished,
            message=INTERRUPTED,
            at=self.clock(),
            environments=environments,
        )
        if ids:
            log.warning("event=recovered interrupted=%s", ",".join(map(str, ids)))
        return ids

    async def check_signers(self) -> None:
        """Make allowed_signers' keys ready now (import a GnuPG keyring): a key file that
        cannot be used is a ConfigError at start, not a refusal of every commit later."""
        verifier = self.pipeline.verifier
        if verifier is not None:
            await asyncio.to_thread(verifier.prepare)

    async def sync(self, trigger: str = "manual") -> SyncOutcome:
        """One pass over the branch head: fetch, load, record; wake what changed."""
        outcome, changed = await self.pipeline.run(trigger)
        self.wake(changed)
        if outcome.result in ("ok", "errors"):
            self.drift.request()  # a commit was applied: read the live versions again
        if self.on_sync is not None:
            self.on_sync(outcome)
        return outcome

    async def load_at_last_sync(self) -> None:
        """The desired state of the last synced commit, from the local clone (for `status`)."""
        await self.pipeline.load_at_last_sync()

    async def kept(self) -> None:
        """Wait until the mirror keeps the last applied commit (stop, standalone runs)."""
        await self.pipeline.kept()

    async def preview(self, *, judge: bool = False) -> None:
        """The desired state at the fetched branch head, recording nothing (`validate`);
        with `judge` (`plan`), the last applied one if a sync would refuse the head."""
        if judge:
            await self.check_signers()
        await self.pipeline.preview(judge=judge)

    # ---- planning --------------------------------------------------------------------

    def recorded(self, environments: Iterable[str] | None = None) -> RecordedState:
        return self.planner.recorded(self.snapshot, environments)

    async def decisions(self, environments: Iterable[str] | None = None) -> list[Decision]:
        return await self.planner.decide(self.snapshot, environments)

    # ---- runners ---------------------------------------------------------------------

    def wake(self, environments: Iterable[str]) -> None:
        self.runners.wake(environments)

    async def drain(
        self, env: str, *, once: bool = False, services: Collection[str] | None = None
    ) -> list[DeploymentRecord]:
        """Run this environment's due actions one at a time until none is due."""
        return await self.runners.drain(env, once=once, services=services)

    async def deploy(self, job: Job) -> list[DeploymentRecord]:
        """Run a job, and roll back after a failure when the environment says so."""
        return await self.runners.deploy(job)

    async def deploy_in_turn(self, jobs: list[Job]) -> list[DeploymentRecord]:
        """An operator's deployments, in their environments' turn (beside running daemons)."""
        return await self.runners.deploy_in_turn(jobs)

    async def run_job(self, job: Job) -> DeploymentRecord:
        return await self.runners.run_job(job)

    @property
    def deploying(self) -> dict[str, DeploymentRecord]:
        return dict(self._deploying)

    async def idle(self) -> None:
        """Wait until no runner has anything to do right now (for tests and standalone runs)."""
        await self.runners.idle()

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
