"""One deployment, start to end: record it, validate, run under a deadline, record the outcome.

Every step is written to the store as it happens (status changes and progress events at
once, log lines in small batches), so a crash loses at most the last fraction of a second
of log output and never a status.
"""

from __future__ import annotations

import asyncio
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
from reconciler.store import CommitMeta, DeploymentRecord, NewDeployment, Store, is_transient

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


Listener = Callable[[int, Mapping[str, Any]], None]


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

    def _emit(self, deployment_id: int, event: Mapping[str, Any]) -> None:
        if self.listener is not None:
            try:
                self.listener(deployment_id, event)
            except Exception:  # a slow or broken watcher never breaks a deployment
                log.exception("progress listener failed")

    async def _status(self, dep_id: int, status: str, **kw: Any) -> DeploymentRecord:
        rec = await durable(self.store.set_status, dep_id, status, at=self.clock(), **kw)
        self._emit(
            dep_id,
            {
                "status": status,
                "message": kw.get("message") or kw.get("error_message") or status,
                "percent": None,
            },
        )
        return rec

    async def create(self, job: Job) -> DeploymentRecord:
        provider = self.providers[job.spec.provider]
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
            params=dict(job.spec.services[job.service].params)
            if job.service in job.spec.services
            else {},
            sync_id=job.sync_id,
            rollback_of=job.rollback_of,
        )
        return await durable(self.store.create_deployment, new)

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
        logs = _LogBuffer(self.store, rec.id, Redactor(provider.secrets()))

        async def progress(
            percent: int | None, message: str, details: Mapping[str, Any] | None
        ) -> None:
            await logs.flush()
            at = self.clock()
            await durable(
                self.store.add_event,
                rec.id,
                status="in_progress",
                message=message,
                percent=percent,
                details=dict(details) if details else None,
                at=at,
            )
            self._emit(
                rec.id,
                {
                    "status": "in_progress",
                    "message": message,
                    "percent": percent,
                    "details": dict(details or {}),
                },
            )

        ctx = DeployContext(request, deadline, progress, logs.add, kill_grace=self.kill_grace)
        try:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await self._status(rec.id, "validating", message="validating")
                    validation = await self._validate(provider, request)
                    if not validation.ok:
                        await logs.close()
                        return await self._status(
                            rec.id,
                            "failed",
                            error_message=validation.failure_message(),
                            validation=validation.to_json(),
                        )
                    await self._status(
                        rec.id,
                        "in_progress",
                        validation=validation.to_json(),
                        message=f"deploying {job.service} {job.version} with {provider.name}",
                    )
                    await provider.deploy(ctx)
            except TimeoutError:
                await logs.close()
                return await self._status(
                    rec.id,
                    "timed_out",
                    error_message=f"deadline of {format_duration(job.spec.timeout)} reached: run stopped",
                )
            except DeploymentFailed as exc:
                await logs.close()
                return await self._status(rec.id, "failed", error_message=str(exc) or "failed")
            except asyncio.CancelledError:
                await logs.close()
                await self._status(
                    rec.id,
                    "cancelled",
                    error_message="cancelled: reconciler stopped during the run",
                )
                raise
            except Exception as exc:  # a provider bug must still end the record
                log.exception("provider %s raised", provider.name)
                await logs.close()
                return await self._status(
                    rec.id, "failed", error_message=f"provider error: {type(exc).__name__}: {exc}"
                )
            await logs.close()
            return await self._status(
                rec.id, "completed", message=f"{job.service} is at {job.version}"
            )
        finally:
            await logs.close()

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
