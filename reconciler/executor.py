"""One deployment, start to end: record it, validate, run under a deadline, record the outcome.

Every step is written to the store as it happens (status changes and progress events at
once, log lines in small batches up to the log's cap, whose tail is kept in memory and
written at the end), so a crash loses at most that tail and never a status. The end of a
run is one shielded step that always writes a terminal status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_exponential,
)

from desired_state import EnvironmentSpec, format_duration
from reconciler.providers import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Provider,
    Redactor,
    Validation,
)
from reconciler.providers.process import process_gone, start_token
from reconciler.store import (
    TERMINAL_STATUSES,
    CommitMeta,
    DeploymentRecord,
    NewDeployment,
    StatusStep,
    Store,
    StoreError,
    WouldWait,
    inline,
    is_transient,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a record write keeps retrying through a database outage before it gives up
# (the record is then ended `interrupted` at the next start, never lost).
STORE_RETRY_SECONDS = 900.0
STORE_RETRY_WAIT = 0.1  # first pause between attempts, doubling up to STORE_RETRY_WAIT_MAX
STORE_RETRY_WAIT_MAX = 10.0

LOG_FLUSH_SECONDS = 0.2
LOG_FLUSH_LINES = 200
# SPEC §6: a run's log keeps 1 MiB by default (`[daemon] log_cap`), lines cut at 16 KiB.
LOG_CAP = 1024 * 1024
LINE_LIMIT = 16 * 1024
# What a line counts against the cap at least: a stored row costs more than its text, and
# a flood of empty lines must not fill the tail with a million tiny objects.
LINE_MIN_COST = 32
# Tests only: a run's process group is never recorded, so that a test can kill the daemon
# in the window between a spawn and that record (tests/test_daemon_runs.py), which is
# otherwise a few milliseconds long. Read once, at import.
HOLD_PROCESS_RECORD = bool(os.environ.get("RECONCILER_TEST_HOLD_PROCESS_RECORD"))


def utcnow() -> datetime:
    return datetime.now(UTC)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "event=store_retry attempt=%d error=%r",
        state.attempt_number,
        str(exc).splitlines()[0] if exc else "",
    )


def _log_first_retry(exc: BaseException) -> None:
    log.warning("event=store_retry attempt=%d error=%r", 1, str(exc).splitlines()[0])


async def durable(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a store call off the loop, retrying with backoff while the database is away."""
    return await _retrying(stop_after_delay(STORE_RETRY_SECONDS), None, fn, *args, **kwargs)


async def _record_durably(store: Store, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`durable` for a run's own short writes: on SQLite the first attempt runs inline
    when it need not wait (`store.inline`)."""
    return await _retrying(stop_after_delay(STORE_RETRY_SECONDS), store, fn, *args, **kwargs)


async def _retrying(
    stop: Any, store: Store | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any
) -> T:
    # The first attempt goes straight to the worker thread (or runs inline, ``store``):
    # setting up the retry loop costs more than the write it guards, and nearly every
    # write succeeds at once.
    try:
        if store is not None:
            try:
                return inline(store.engine, fn, *args, **kwargs)
            except WouldWait:
                pass
        return await asyncio.to_thread(fn, *args, **kwargs)
    except Exception as exc:
        if not is_transient(exc):
            raise
        _log_first_retry(exc)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=STORE_RETRY_WAIT, max=STORE_RETRY_WAIT_MAX),
        stop=stop,
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


def _size(n: int) -> str:
    """Bytes as people read them: 512 B, 9.8 MB (decimal units, as SPEC §6 writes them)."""
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 999.95:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def _cut(text: str, limit: int, omitted: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, saying how much is gone."""
    data = text.encode()
    if len(data) <= limit and not omitted:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    gone = len(data) + omitted - len(kept.encode())
    return f"{kept} … [{gone:,} bytes cut]"


class _LogBuffer:
    """A run's log: lines written in batches off the event loop, capped (SPEC §6).

    The first half of the cap (the head) is written as it comes; after that, lines go to
    an in-memory tail of the other half, the oldest falling out and counted. At the end the
    count and the tail are written. So a run of any length costs at most the cap in the
    database and about that in memory, and the reader never waits on more than one batch.
    """

    def __init__(
        self, store: Store, deployment_id: int, redact: Redactor, cap: int = LOG_CAP
    ) -> None:
        self.store, self.id, self.redact = store, deployment_id, redact
        self.lines: list[tuple[str, str, datetime]] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # batches reach the store in order
        self._head_room = cap // 2
        self._tail_room = cap - self._head_room
        self._in_tail = False
        # (stream, line as read, bytes cut, at, cost against the cap, size as printed)
        self._tail: deque[tuple[str, str, int, datetime, int, int]] = deque()
        self._tail_size = 0
        self._at = utcnow()
        self._clock_read = time.monotonic()
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._closed = False

    def add(self, stream: str, line: str, cut: int = 0) -> None:
        """One line (``cut``: bytes the reader already left out). Called for every line
        of a flood, so it does little: lines that may be dropped are redacted later."""
        if self._closed:
            return
        size = (len(line) if line.isascii() else len(line.encode())) + cut
        cost = max(size + 1, LINE_MIN_COST) if size <= LINE_LIMIT else LINE_LIMIT + 65
        now = time.monotonic()
        if now - self._clock_read > 0.001:  # one clock read per millisecond, not per line
            self._at, self._clock_read = utcnow(), now
        if not self._in_tail:
            if cost <= self._head_room:
                self._head_room -= cost
                self.lines.append((stream, self._text(line, size, cut), self._at))
                if self._task is None:
                    self._task = asyncio.get_running_loop().create_task(self._flush_later())
                return
            self._in_tail = True
        self._tail.append((stream, line, cut, self._at, cost, size))
        self._tail_size += cost
        while self._tail_size > self._tail_room:
            dropped = self._tail.popleft()
            self._tail_size -= dropped[4]
            self.dropped_lines += 1
            self.dropped_bytes += dropped[5] + 1

    def _text(self, line: str, size: int, cut: int) -> str:
        """The line as stored: secrets replaced, then cut at LINE_LIMIT bytes."""
        text = self.redact(line) if self.redact.secrets else line
        return _cut(text, LINE_LIMIT, cut) if size > LINE_LIMIT else text

    async def _flush_later(self) -> None:
        await asyncio.sleep(LOG_FLUSH_SECONDS)
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self.lines:
                batch, self.lines = self.lines[:LOG_FLUSH_LINES], self.lines[LOG_FLUSH_LINES:]
                await _record_durably(self.store, self.store.append_log, self.id, batch)

    async def close(self) -> None:
        """Write what is left: the count of dropped lines, then the tail."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not self._closed:
            self._closed = True
            if self.dropped_lines:
                n, size = self.dropped_lines, _size(self.dropped_bytes)
                self.lines.append(("system", f"… {n:,} lines ({size}) dropped …", utcnow()))
            self.lines.extend(
                (stream, self._text(line, size, cut), at)
                for stream, line, cut, at, _, size in self._tail
            )
            self._tail.clear()
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


@dataclass(frozen=True)
class _Outcome:
    status: str
    message: str | None = None
    error_message: str | None = None
    validation: dict[str, Any] | None = None


class _Run:
    """The record side of one run: status changes, progress and log, all redacted."""

    def __init__(self, executor: Executor, rec: DeploymentRecord, redact: Redactor) -> None:
        self.x, self.rec, self.redact = executor, rec, redact
        self.logs = _LogBuffer(executor.store, rec.id, redact, executor.log_cap)
        self.deferred: StatusStep | None = None  # `defer`

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

    def step(
        self,
        status: str,
        *,
        message: str | None = None,
        error_message: str | None = None,
        validation: dict[str, Any] | None = None,
    ) -> StatusStep:
        """A status change as it is recorded: now, its texts redacted."""
        if validation is not None:  # check messages may quote what a platform echoed
            validation = json.loads(self.redact(json.dumps(validation)))
        return StatusStep(
            status,
            self.x.clock(),
            self.redact(message) if message else message,
            self.redact(error_message) if error_message else error_message,
            validation,
        )

    def defer(self, step: StatusStep) -> None:
        """Hold ``in_progress`` back: written with the run's process group (`process`), or
        with the terminal status when the run ended before that (one transaction fewer)."""
        self.deferred = step

    async def status(
        self,
        status: str,
        *,
        message: str | None = None,
        error_message: str | None = None,
        validation: dict[str, Any] | None = None,
    ) -> DeploymentRecord:
        await self.logs.flush()
        step = self.step(
            status, message=message, error_message=error_message, validation=validation
        )
        return await self._write([step])

    async def _write(
        self, steps: list[StatusStep], run_process: tuple[int, str] | None = None
    ) -> DeploymentRecord:
        """Record ``steps`` (after a deferred ``in_progress``) in one transaction, then
        publish each, in order."""
        if self.deferred is not None:
            steps = [self.deferred, *steps]
            self.deferred = None
        self.rec = await self._record(steps, run_process)
        for step in steps:
            self._emit(
                step.status,
                step.message or step.error_message or step.status,
                100 if step.status == "completed" else None,
                None,
                step.at,
            )
        return self.rec

    async def _record(
        self, steps: list[StatusStep], run_process: tuple[int, str] | None
    ) -> DeploymentRecord:
        store = self.x.store
        if steps[-1].status not in TERMINAL_STATUSES:
            return await _record_durably(
                store, store.set_statuses, self.rec.id, steps, run_process=run_process
            )
        try:  # a terminal status is written however long the database is away
            return await _retrying(
                stop_never, store, store.set_statuses, self.rec.id, steps, run_process=run_process
            )
        except StoreError:
            # An attempt whose answer was lost may have been written already.
            rec = await _retrying(stop_never, None, store.get_deployment, self.rec.id)
            if rec is None or rec.status not in TERMINAL_STATUSES:
                raise
            return rec

    async def finish(self, outcome: _Outcome) -> DeploymentRecord:
        """The one way a run ends: its log closed and a terminal status written, shielded
        from cancellation (a stop whose grace ran out while this retries through a
        database outage must not leave the record open, to be called interrupted and run
        again). A cancellation that arrives meanwhile is re-raised once it is written."""
        task = asyncio.ensure_future(self._finish(outcome))
        cancelled = False
        while True:
            try:
                rec = await asyncio.shield(task)
                break
            except asyncio.CancelledError:
                if task.done():
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return rec

    async def _finish(self, outcome: _Outcome) -> DeploymentRecord:
        try:
            await self.logs.close()
        except Exception:  # the log gave up on the database: the status must not
            log.exception("event=log_lost id=%d", self.rec.id)
        return await self.status(
            outcome.status,
            message=outcome.message,
            error_message=outcome.error_message,
            validation=outcome.validation,
        )

    async def process(self, pgid: int) -> None:
        """Record the run's process group, so that a restart can end what a crash left
        (with the deferred ``in_progress``, if any: one transaction)."""
        if HOLD_PROCESS_RECORD:
            await asyncio.Event().wait()  # a crash in the window, for as long as a test needs
        token = start_token(pgid)
        if self.deferred is None:
            if token is not None:
                store = self.x.store
                await _record_durably(store, store.set_run_process, self.rec.id, pgid, token)
            return
        if token is None and process_gone(pgid):
            return  # it ran already: ``in_progress`` goes with the terminal status
        await self._write([], None if token is None else (pgid, token))

    async def progress(
        self, percent: int | None, message: str, details: Mapping[str, Any] | None
    ) -> None:
        await self.logs.flush()
        if self.deferred is not None:  # the status first, then what the run reports
            await self._write([])
        at = self.x.clock()
        message = self.redact(message)
        clean = json.loads(self.redact(json.dumps(dict(details)))) if details else None
        await _record_durably(
            self.x.store,
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
        log_cap: int = LOG_CAP,
        listener: Listener | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.providers = providers
        self.kill_grace = kill_grace
        self.log_cap = log_cap
        self.listener = listener
        self.clock = clock
        self._ledger_id: str | None = None  # read once: the run marker's database identity

    def new_deployment(self, job: Job) -> NewDeployment:
        """The record of ``job`` as the store creates it."""
        provider = self.providers[job.spec.provider]
        service = job.spec.services.get(job.service)
        return NewDeployment(
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

    async def create(self, job: Job, *, starting: bool = False) -> DeploymentRecord:
        """Record the job's deployment, ``pending``; ``starting``: it runs at once (`run`
        follows), so it is recorded ``validating`` in the same write (both events kept)."""
        validating_at = self.clock() if starting else None
        new = self.new_deployment(job)
        rec = await _record_durably(
            self.store, self.store.create_deployment, new, validating_at=validating_at
        )
        self.created(rec)
        return rec

    def create_now(self, job: Job) -> DeploymentRecord:
        """Blocking (a worker thread): `create` of a job that runs at once, without its
        retries and events (the runners record a deployment in the thread trip that
        decided it, then call `created` on the loop)."""
        return self.store.create_deployment(self.new_deployment(job), validating_at=self.clock())

    def created(self, rec: DeploymentRecord) -> None:
        """Publish a new record's events: ``pending``, and ``validating`` if it starts."""
        if self.listener is not None:
            run = _Run(self, rec, Redactor())
            run._emit("pending", "pending", None, None, rec.created_at)
            if rec.status == "validating" and rec.started_at is not None:
                run._emit("validating", "validating", None, None, rec.started_at)

    async def mark_rolled_back(self, rec: DeploymentRecord, message: str) -> DeploymentRecord:
        """failed -> rolled_back once its rollback completed (the one change to a terminal
        record), published like any status change."""
        return await _Run(self, rec, Redactor()).status("rolled_back", message=message)

    async def run(self, job: Job, record: DeploymentRecord | None = None) -> DeploymentRecord:
        """Run one deployment to a terminal status and return its final record.

        Cancellation (a graceful stop that ran out of time) ends the record `cancelled` and
        re-raises, so the caller's task ends as cancelled too.
        """
        rec = record or await self.create(job, starting=True)
        provider = self.providers[job.spec.provider]
        if self._ledger_id is None and provider.reports_process:
            self._ledger_id = await durable(self.store.ledger_id)
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
            ledger_id=self._ledger_id or "",
        )
        run = _Run(self, rec, Redactor(provider.secrets()))
        ctx = DeployContext(
            request,
            deadline,
            run.progress,
            run.logs.add,
            kill_grace=self.kill_grace,
            _process=run.process,
        )
        try:
            outcome = await self._attempt(job, provider, request, run, ctx, deadline)
        except asyncio.CancelledError:
            await run.finish(
                _Outcome("cancelled", error_message="cancelled: reconciler stopped during the run")
            )
            raise
        return await run.finish(outcome)

    async def _attempt(
        self,
        job: Job,
        provider: Provider,
        request: DeployRequest,
        run: _Run,
        ctx: DeployContext,
        deadline: float,
    ) -> _Outcome:
        """Validate and deploy; what the run comes to (recorded by `_Run.finish`)."""
        limit = asyncio.timeout_at(_loop_time(deadline))
        try:
            async with limit:
                if run.rec.status == "pending":  # else `create` recorded it already
                    await run.status("validating", message="validating")
                validation = await self._validate(provider, request)
                if not validation.ok:
                    return _Outcome(
                        "failed",
                        error_message=validation.failure_message(),
                        validation=validation.to_json(),
                    )
                step = run.step(
                    "in_progress",
                    validation=validation.to_json(),
                    message=f"deploying {job.service} {job.version} with {provider.name}",
                )
                if provider.reports_process:  # recorded with the process group
                    run.defer(step)
                else:
                    await run.logs.flush()
                    await run._write([step])
                await provider.deploy(ctx)
        except DeploymentFailed as exc:
            return _Outcome("failed", error_message=str(exc) or "failed")
        except Exception as exc:  # a provider bug (or its own TimeoutError) must still end it
            if isinstance(exc, TimeoutError) and limit.expired():
                when = format_duration(job.spec.timeout)
                return _Outcome(
                    "timed_out", error_message=f"deadline of {when} reached: run stopped"
                )
            log.exception("provider %s raised", provider.name)
            return _Outcome("failed", error_message=f"provider error: {type(exc).__name__}: {exc}")
        return _Outcome("completed", message=f"{job.service} is at {job.version}")

    async def _validate(self, provider: Provider, request: DeployRequest) -> Validation:
        try:
            return await provider.validate(request)
        except Exception as exc:
            return Validation((Check("provider", False, f"{type(exc).__name__}: {exc}"),))


def _loop_time(deadline_monotonic: float) -> float:
    """asyncio's clock is time.monotonic() on every supported platform; convert defensively."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())
