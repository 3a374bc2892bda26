"""One deployment, start to end: record it, validate, run under a deadline, record the outcome.

Every step is written to the store as it happens (status changes and progress events at
once, log lines in small batches), so a crash loses at most the last fraction of a second
of log output and never a status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from desired_state import EnvironmentSpec, format_duration
from reconciler.providers import (
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Provider,
    Redactor,
    Validation,
)
from reconciler.store import (
    TERMINAL_STATUSES,
    CommitMeta,
    DeploymentRecord,
    NewDeployment,
    Store,
    is_transient,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a record write keeps retrying through a database outage before it gives up
# (the record is then ended `interrupted` at the next start, never lost).
STORE_RETRY_SECONDS = 900.0

LOG_FLUSH_SECONDS = 0.2
LOG_FLUSH_LINES = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "event=store_retry attempt=%d error=%r",
        state.attempt_number,
        str(exc).splitlines()[0] if exc else "",
    )


async def durable(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a store call off the loop, retrying with backoff while the database is away."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.1, max=10),
        stop=stop_after_delay(STORE_RETRY_SECONDS),
        before_sleep=_log_retry,
        reraise=True,
    ):
        with attempt:
            return await asyncio.to_thread(fn, *args, **kwargs)
    raise AssertionError("unreachable: tenacity re-raises the last error")


@dataclass(frozen=True)
class Job:
    """What to deploy: one service of one environment to one version."""

    spec: EnvironmentSpec
    service: str
    version: str
    previous_version: str | None
    trigger: str  # git | manual | rollback | retry | drift
    attempt: int = 1
    commit: CommitMeta | None = None
    sync_id: int | None = None
    rollback_of: int | None = None

    @property
    def environment(self) -> str:
        return self.spec.environment


class _LogBuffer:
    """Collects log lines and writes them in batches, off the event loop."""

    def __init__(self, store: Store, deployment_id: int, redact: Redactor) -> None:
        self.store, self.id, self.redact = store, deployment_id, redact
        self.lines: list[tuple[str, str, datetime]] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # batches reach the store in order

    def add(self, stream: str, line: str) -> None:
        self.lines.append((stream, self.redact(line), utcnow()))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(LOG_FLUSH_SECONDS)
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self.lines:
                batch, self.lines = self.lines[:LOG_FLUSH_LINES], self.lines[LOG_FLUSH_LINES:]
                await durable(self.store.append_log, self.id, batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()


@dataclass(frozen=True)
class DeploymentEvent:
    """A status change or progress report, as it is recorded; published to listeners."""

    deployment_id: int
    environment: str
    service: str
    version: str
    trigger: str
    status: str
    message: str
    percent: int | None = None
    details: Mapping[str, Any] | None = None
    at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


Listener = Callable[[DeploymentEvent], None]


class _Run:
    """The record side of one run: status changes, progress and log, all redacted."""

    def __init__(self, executor: Executor, rec: DeploymentRecord, redact: Redactor) -> None:
        self.x, self.rec, self.redact = executor, rec, redact
        self.logs = _LogBuffer(executor.store, rec.id, redact)

    def _emit(
        self,
        status: str,
        message: str,
        percent: int | None,
        details: Mapping[str, Any] | None,
        at: datetime,
    ) -> None:
        if self.x.listener is None:
            return
        r = self.rec
        event = DeploymentEvent(
            r.id,
            r.environment,
            r.service,
            r.version,
            r.trigger,
            status,
            message,
            percent,
            details,
            at,
        )
        try:
            self.x.listener(event)
        except Exception:  # a slow or broken watcher never breaks a deployment
            log.exception("progress listener failed")

    async def status(
        self,
        status: str,
        *,
        message: str | None = None,
        error_message: str | None = None,
        validation: dict[str, Any] | None = None,
    ) -> DeploymentRecord:
        await self.logs.close()
        at = self.x.clock()
        error_message = self.redact(error_message) if error_message else error_message
        message = self.redact(message) if message else message
        self.rec = await durable(
            self.x.store.set_status,
            self.rec.id,
            status,
            at=at,
            message=message,
            error_message=error_message,
            validation=validation,
        )
        self._emit(
            status,
            message or error_message or status,
            100 if status == "completed" else None,
            None,
            at,
        )
        return self.rec

    async def progress(
        self, percent: int | None, message: str, details: Mapping[str, Any] | None
    ) -> None:
        await self.logs.flush()
        at = self.x.clock()
        message = self.redact(message)
        clean = json.loads(self.redact(json.dumps(dict(details)))) if details else None
        await durable(
            self.x.store.add_event,
            self.rec.id,
            status="in_progress",
            message=message,
            percent=percent,
            details=clean,
            at=at,
        )
        self._emit("in_progress", message, percent, clean, at)


class Executor:
    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        *,
        kill_grace: float = 10.0,
        listener: Listener | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.providers = providers
        self.kill_grace = kill_grace
        self.listener = listener
        self.clock = clock

    async def create(self, job: Job) -> DeploymentRecord:
        provider = self.providers[job.spec.provider]
        service = job.spec.services.get(job.service)
        new = NewDeployment(
            environment=job.environment,
            service=job.service,
            version=job.version,
            previous_version=job.previous_version,
            provider=provider.name,
            provider_type=provider.type,
            strategy=job.spec.strategy_dict(),
            trigger=job.trigger,
            commit=job.commit.sha if job.commit else None,
            commit_author=job.commit.author if job.commit else None,
            attempt=job.attempt,
            timeout_seconds=job.spec.timeout,
            params=dict(service.params) if service else {},
            sync_id=job.sync_id,
            rollback_of=job.rollback_of,
        )
        rec = await durable(self.store.create_deployment, new)
        if self.listener is not None:
            _Run(self, rec, Redactor())._emit("pending", "pending", None, None, rec.created_at)
        return rec

    async def mark_rolled_back(self, rec: DeploymentRecord, message: str) -> DeploymentRecord:
        """failed -> rolled_back once its rollback completed (the one change to a terminal
        record), published like any status change."""
        return await _Run(self, rec, Redactor()).status("rolled_back", message=message)

    async def run(self, job: Job, record: DeploymentRecord | None = None) -> DeploymentRecord:
        """Run one deployment to a terminal status and return its final record.

        Cancellation (a graceful stop that ran out of time) ends the record `cancelled` and
        re-raises, so the caller's task ends as cancelled too.
        """
        rec = record or await self.create(job)
        provider = self.providers[job.spec.provider]
        deadline = time.monotonic() + job.spec.timeout
        request = DeployRequest(
            environment=job.environment,
            service=job.service,
            version=job.version,
            previous_version=job.previous_version,
            deployment_id=rec.id,
            commit=rec.commit,
            timeout_seconds=job.spec.timeout,
            strategy=rec.strategy,
            params=rec.params,
            trigger=job.trigger,
        )
        run = _Run(self, rec, Redactor(provider.secrets()))
        ctx = DeployContext(
            request, deadline, run.progress, run.logs.add, kill_grace=self.kill_grace
        )
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await run.status("validating", message="validating")
                validation = await self._validate(provider, request)
                if not validation.ok:
                    return await run.status(
                        "failed",
                        error_message=validation.failure_message(),
                        validation=validation.to_json(),
                    )
                await run.status(
                    "in_progress",
                    validation=validation.to_json(),
                    message=f"deploying {job.service} {job.version} with {provider.name}",
                )
                await provider.deploy(ctx)
        except TimeoutError:
            limit = format_duration(job.spec.timeout)
            return await run.status(
                "timed_out", error_message=f"deadline of {limit} reached: run stopped"
            )
        except DeploymentFailed as exc:
            return await run.status("failed", error_message=str(exc) or "failed")
        except asyncio.CancelledError:
            await run.status(
                "cancelled", error_message="cancelled: reconciler stopped during the run"
            )
            raise
        except Exception as exc:  # a provider bug must still end the record
            log.exception("provider %s raised", provider.name)
            return await run.status(
                "failed", error_message=f"provider error: {type(exc).__name__}: {exc}"
            )
        return await run.status("completed", message=f"{job.service} is at {job.version}")

    async def _validate(self, provider: Provider, request: DeployRequest) -> Validation:
        try:
            return await provider.validate(request)
        except Exception as exc:
            from reconciler.providers import Check

            return Validation((Check("provider", False, f"{type(exc).__name__}: {exc}"),))


def _loop_time(deadline_monotonic: float) -> float:
    """asyncio's clock is time.monotonic() on every supported platform; convert defensively."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())
