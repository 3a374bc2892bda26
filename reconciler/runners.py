"""The runner pool: one task per environment, `max_parallel` slots, and the jobs they run.

Each environment has one runner task that asks the planner for the next action and runs
it, so inside an environment one deployment runs at a time, in file order, and a commit
storm coalesces into "deploy the newest version" (the runner always plans from the latest
snapshot). A semaphore bounds how many environments deploy at once. APScheduler only
decides *when* to look again (retry backoff, windows opening); the runners decide
*whether*.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from desired_state import EnvironmentSpec
from reconciler.executor import Executor, Job
from reconciler.plan import Decision
from reconciler.planning import Planner
from reconciler.store import DeploymentRecord, WouldWait, inline, is_transient
from reconciler.store.fence import FENCE, Fence, LeaseLost
from reconciler.sync import Snapshot

# The engine's logger name, as before the split: operators filter the journal on it.
log = logging.getLogger("reconciler.engine")

FAILURES = frozenset({"failed", "timed_out"})


#: Above this many services an environment is planned in a worker thread, never inline
#: on the event loop: planning costs ~30 us a service, and the loop serves the HTTP API,
#: the control socket and every other runner meanwhile.
INLINE_PLAN_SERVICES = 100


class Runners:
    def __init__(
        self,
        executor: Executor,
        planner: Planner,
        snapshot: Callable[[], Snapshot],
        *,
        max_parallel: int,
    ) -> None:
        self.executor = executor
        self.planner = planner
        self.snapshot = snapshot  # the latest synced desired state
        self.slots = asyncio.Semaphore(max_parallel)
        self.max_parallel = max_parallel
        self.stopping = False
        # Standalone commands drain environments themselves: no background runners.
        self.enabled = True
        self.scheduler: AsyncIOScheduler | None = None
        self.wakes: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.deploying: dict[str, DeploymentRecord] = {}
        self._active: set[str] = set()  # environments whose runner is awake
        self._env_locks: dict[str, asyncio.Lock] = {}  # one deployment at a time per environment
        self.busy: set[str] = set()  # environments whose runner holds a slot (plans or deploys)
        self._idle = asyncio.Event()
        self._idle.set()
        # Told when a run of (environment, service) ends, whatever its outcome (the drift
        # monitor reads that service's live version again).
        self.on_run_ended: Callable[[str, str], None] | None = None
        # Several replicas (reconciler/replicas.py): the fence of an environment this
        # replica holds the lease on, None when it does not; unset: every environment.
        self.fence_for: Callable[[str], Fence | None] | None = None

    def env_lock(self, env: str) -> asyncio.Lock:
        """Held while the environment deploys (a runner's drain, an operator's job)."""
        return self._env_locks.setdefault(env, asyncio.Lock())

    async def abandon(self, environments: Iterable[str]) -> None:
        """Stop the runners of environments this replica no longer holds: a running
        deployment is cancelled (its late terminal status is fenced off, kept unconfirmed);
        a later wake starts a new runner."""
        tasks = []
        for env in environments:
            self.wakes.pop(env, None)
            task = self.tasks.pop(env, None)
            if task is not None and not task.done():
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)

    def resize(self, max_parallel: int) -> None:
        if max_parallel != self.max_parallel:
            # Running deployments release the old semaphore; new ones take the new one.
            self.slots = asyncio.Semaphore(max_parallel)
            self.max_parallel = max_parallel

    def queue_depth(self) -> int:
        """Environments with work due now or running."""
        return sum(1 for env, e in self.wakes.items() if e.is_set() or env in self._active)

    def wake(self, environments: Iterable[str]) -> None:
        for env in environments:
            if self.stopping or not self.enabled:
                return
            event = self.wakes.get(env)
            if event is None:
                event = self.wakes[env] = asyncio.Event()
                self.tasks[env] = asyncio.get_running_loop().create_task(
                    self._runner(env), name=f"runner:{env}"
                )
            event.set()
            self._idle.clear()

    async def _runner(self, env: str) -> None:
        event = self.wakes[env]
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
            except LeaseLost as exc:  # another replica holds it now: its runner plans it
                log.warning("event=runner_lease_lost environment=%s error=%r", env, str(exc))
            except Exception:  # the store was unreachable, say: try again at the next wake
                log.exception("event=runner_error environment=%s", env)
                backoff = self.planner.settings.retry_backoff
                self._schedule_wake(env, self.planner.clock().timestamp() + backoff)
            finally:
                self._active.discard(env)
                if not self._active and not any(e.is_set() for e in self.wakes.values()):
                    self._idle.set()

    async def drain(
        self, env: str, *, once: bool = False, services: Collection[str] | None = None
    ) -> list[DeploymentRecord]:
        """Run this environment's due actions one at a time until none is due.

        `once`: each service at most one attempt (a standalone `sync` pass).
        `services`: only these services (an operator's `sync --service`).
        """
        async with self.env_lock(env):
            return await self._drain(env, once, services)

    async def _drain(
        self, env: str, once: bool, services: Collection[str] | None
    ) -> list[DeploymentRecord]:
        done: list[DeploymentRecord] = []
        tried: set[str] = set()
        first = self.snapshot()
        if services is not None and env in first.effective:
            tried = set(first.effective[env].services) - set(services)
        # A look without a slot first, so that an environment woken with nothing due
        # never queues for one. The decision that counts is taken once the slot is ours;
        # after a deployment the runner queues for the next slot straight away and
        # decides there (one planner read per deployment, not two), giving the slot back
        # at once when nothing more is due.
        if await self._next(env, tried) is None:
            return done
        while not self.stopping:
            async with self.slots:
                if self.stopping:
                    break
                self.busy.add(env)
                try:
                    step = await self._next(env, tried, create=True)
                    if step is None:
                        break
                    job, rec = step
                    if once:
                        tried.add(job.service)
                    done.extend(await self.deploy(job, rec))
                finally:
                    self.busy.discard(env)
        return done

    async def _next(
        self, env: str, tried: Collection[str], *, create: bool = False
    ) -> tuple[Job, DeploymentRecord | None] | None:
        """The environment's first due action, decided from one snapshot: the deployment
        uses that snapshot's spec, commit and sync id, never a newer one's. None (and the
        next wake-up scheduled) when nothing is due: the environment was deleted, is
        invalid or suspended, its window is closed, or it is in sync.

        ``create``: the due deployment is recorded in the same trip to a worker thread as
        the decision (one hand-off fewer per deployment); its record comes back with the
        job (None when that write met a database away: `run_job` records it, retrying).
        """
        snap = self.snapshot()
        spec = snap.effective.get(env)
        if spec is None or env in snap.invalid:
            return None
        fence = None
        if self.fence_for is not None:
            fence = self.fence_for(env)
            if fence is None:
                return None  # another replica's: its holder plans it
        # The record it may create is fenced like the job's other writes (the worker
        # thread inherits the context).
        token = FENCE.set(fence) if fence is not None else None
        try:
            args = (snap, spec, tried, create, self.planner.clock())
            try:  # SQLite: on the loop when nothing would wait (store.db.inline) and
                # the environment is small enough to plan without stalling the loop
                if len(spec.services) > INLINE_PLAN_SERVICES:
                    raise WouldWait("too many services to plan on the loop")
                decisions, job, rec = inline(self.executor.store.engine, self._decide, *args)
            except WouldWait:
                decisions, job, rec = await asyncio.to_thread(self._decide, *args)
        finally:
            if token is not None:
                FENCE.reset(token)
        if job is None:
            self._schedule_next(env, decisions)
            return None
        if rec is not None:
            self.executor.created(rec)
        return job, rec

    def _decide(
        self,
        snap: Snapshot,
        spec: EnvironmentSpec,
        tried: Collection[str],
        create: bool,
        now: datetime,
    ) -> tuple[list[Decision], Job | None, DeploymentRecord | None]:
        """Blocking (a worker thread): `_next`'s decisions, due job and record."""
        env = spec.environment
        decisions = self.planner.decide_now(snap, [env], now)
        for d in decisions:
            if d.environment == env and d.deploy and d.service not in tried:
                job = _job(snap, spec, d)
                if not create:
                    return decisions, job, None
                try:
                    return decisions, job, self.executor.create_now(job)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    return decisions, job, None
        return decisions, None, None

    async def deploy(
        self, job: Job, record: DeploymentRecord | None = None
    ) -> list[DeploymentRecord]:
        """Run a job (``record``: its deployment, recorded already) and, if it fails and
        the environment says `on_failure: rollback`, deploy the previous version (SPEC §4
        rule 6). Returns every record it made.

        With leases, every write of the job carries the environment's fence (store/fence.py)."""
        token = None
        if self.fence_for is not None:
            fence = self.fence_for(job.environment)
            if fence is None:
                raise LeaseLost(f"environment {job.environment} is deployed by another replica")
            token = FENCE.set(fence)
        try:
            return await self._deploy(job, record)
        finally:
            if token is not None:
                FENCE.reset(token)

    async def _deploy(self, job: Job, record: DeploymentRecord | None) -> list[DeploymentRecord]:
        rec = await self.run_job(job, record)
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

    async def deploy_in_turn(self, jobs: list[Job]) -> list[DeploymentRecord]:
        """An operator's jobs, one after the other, each in its environment's turn (never
        beside a runner's deployment there) and within `max_parallel`."""
        out: list[DeploymentRecord] = []
        for job in jobs:
            async with self.env_lock(job.environment), self.slots:
                if self.stopping:
                    break
                self.busy.add(job.environment)
                try:
                    out.extend(await self.deploy(job))
                finally:
                    self.busy.discard(job.environment)
        return out

    async def run_job(self, job: Job, record: DeploymentRecord | None = None) -> DeploymentRecord:
        rec = record or await self.executor.create(job, starting=True)  # run at once, below
        self.deploying[job.environment] = rec
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
            self.deploying.pop(job.environment, None)
            if self.on_run_ended is not None:
                self.on_run_ended(job.environment, job.service)
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
            effective = self.snapshot().effective
            self.wake(e for e, s in effective.items() if job.environment in s.depends_on)
        return final

    def _schedule_next(self, env: str, decisions: list[Decision]) -> None:
        times = [d.not_before for d in decisions if d.not_before is not None]
        if times:
            self._schedule_wake(env, min(times).timestamp())

    def _schedule_wake(self, env: str, timestamp: float) -> None:
        if self.scheduler is None or self.stopping:
            return
        self.scheduler.add_job(
            self._scheduled_wake,
            "date",
            run_date=datetime.fromtimestamp(timestamp + 0.05, UTC),
            args=[[env]],
            id=f"wake:{env}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    async def _scheduled_wake(self, environments: list[str]) -> None:
        """A coroutine, so that APScheduler's asyncio executor runs it on the event loop:
        a plain function would run on a worker thread, where setting an asyncio event or
        creating a task is not thread-safe."""
        self.wake(environments)

    async def idle(self) -> None:
        """Wait until no runner has anything to do right now (for tests and standalone runs)."""
        await self._idle.wait()


def _job(snapshot: Snapshot, spec: EnvironmentSpec, d: Decision) -> Job:
    assert d.desired is not None and d.trigger is not None
    return Job(
        spec=spec,
        service=d.service,
        version=d.desired,
        previous_version=d.deployed,
        trigger=d.trigger,
        attempt=d.attempt,
        commit=snapshot.commit,
        sync_id=snapshot.sync_id,
    )
