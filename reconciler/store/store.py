"""The queries: every read and write of the reconciler's records.

Each public method runs in its own short transaction and returns plain records
(`reconciler.store.records`), so a `Store` can be shared by threads (the engine's pool
gives each call its own connection; callers use ``asyncio.to_thread``).

`service_state` is a derived table kept up to date in the same transaction as every
deployment insert or status change; `rebuild_service_state` recomputes it from the
deployments with the same rules (`_ServiceFold`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import groupby
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from desired_state import one_line
from reconciler.store import rows
from reconciler.store.db import (
    HEAD_REVISION,
    SQLiteFile,
    check_schema,
    current_revision,
    make_engine,
    upgrade,
    write_engine,
)
from reconciler.store.drift import DriftQueries
from reconciler.store.models import (
    UNFINISHED_SQL,
    Deployment,
    DeploymentEvent,
    DeploymentLog,
    EnvironmentState,
    OperatorAction,
    OperatorSuspended,
    ServiceStateRow,
    Sync,
)
from reconciler.store.outbox import OutboxQueries
from reconciler.store.records import (
    ACTIVE_STATUSES,
    FAILURE_STATUSES,
    LOG_STREAMS,
    OPERATOR_ACTIONS,
    STATUSES,
    SYNC_APPLIED_RESULTS,
    SYNC_RESULTS,
    SYNC_TRIGGERS,
    TERMINAL_STATUSES,
    TRIGGERS,
    CommitMeta,
    DeploymentRecord,
    EnvironmentStateRecord,
    EventRecord,
    LogLine,
    NewDeployment,
    ServiceState,
    StoreError,
    SyncRecord,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_aware = rows.aware
_check = rows.check
_chunks = rows.chunks
_deployment = rows.deployment_record
_event = rows.event_record
_insert_ignore = rows.insert_ignore
_sync = rows.sync_record
_table = rows.table
_upsert = rows.upsert

#: Rows fetched at a time when scanning one service's deployments backwards.
_SCAN_PAGE = 64


def _one_line(text: str | None) -> str | None:
    """Messages in records stay one line: they are printed in tables, logs and CSV."""
    return None if text is None else one_line(text)


_D = _table(Deployment)
_E = _table(DeploymentEvent)
_L = _table(DeploymentLog)
_S = _table(Sync)
_SS = _table(ServiceStateRow)
_ENV = _table(EnvironmentState)
_OA = _table(OperatorAction)
_OS = _table(OperatorSuspended)

_ACTIVE = tuple(sorted(ACTIVE_STATUSES))
_TERMINAL = tuple(sorted(TERMINAL_STATUSES))

_DEFAULT_MESSAGES = {
    "pending": "deployment queued",
    "validating": "validating",
    "in_progress": "deployment started",
    "completed": "deployment completed",
    "failed": "deployment failed",
    "rolled_back": "deployment rolled back",
    "timed_out": "deployment timed out",
    "cancelled": "deployment cancelled",
}

# Columns the service-state fold reads, newest deployment first.
_FOLD_COLUMNS = (_D.c.id, _D.c.version, _D.c.status, _D.c.trigger, _D.c.completed_at)


def _now() -> datetime:
    return datetime.now(UTC)


#: service_state columns in the order of `ServiceState`'s fields.
_SERVICE_STATE_COLUMNS = tuple(_SS.c[name] for name in ServiceState._fields)


# --------------------------------------------------------------------------- service state


@dataclass
class _ServiceFold:
    """Derives one service's `service_state` from its deployments, newest first.

    The single definition of the rules, used by the incremental update (which stops
    reading as soon as `done`) and by `Store.rebuild_service_state` (which feeds all).
    """

    reset_id: int | None
    track_running: bool
    seen: int = 0
    last_deployment_id: int | None = None
    last_status: str | None = None
    last_version: str | None = None
    last_ended_at: datetime | None = None
    deployed_version: str | None = None
    deployed_deployment_id: int | None = None
    deployed_done: bool = False
    running_deployment_id: int | None = None
    running_done: bool = False
    streak_version: str | None = None
    streak_count: int = 0
    streak_last_at: datetime | None = None
    streak_done: bool = False

    @property
    def done(self) -> bool:
        return (
            self.deployed_done
            and self.streak_done
            and (self.running_done or not self.track_running)
        )

    def feed(self, row: Sequence[Any]) -> None:
        ident, version, status, trigger, completed_at = row
        if self.seen == 0:
            self.last_deployment_id = ident
            self.last_status = status
            self.last_version = version
            self.last_ended_at = completed_at
        self.seen += 1
        if not self.deployed_done and status == "completed":
            self.deployed_version = version
            self.deployed_deployment_id = ident
            self.deployed_done = True
        if self.track_running and not self.running_done and status in ACTIVE_STATUSES:
            self.running_deployment_id = ident
            self.running_done = True
        if self.streak_done:
            return
        if self.reset_id is not None and ident <= self.reset_id:
            self.streak_done = True
            return
        if trigger == "rollback" or status == "cancelled" or status in ACTIVE_STATUSES:
            return
        if status in FAILURE_STATUSES:
            if self.streak_count == 0:
                self.streak_version = version
                self.streak_count = 1
                self.streak_last_at = completed_at
            elif version == self.streak_version:
                self.streak_count += 1
            else:
                self.streak_done = True
        else:  # completed
            self.streak_done = True

    def values(self) -> dict[str, Any]:
        return {
            "deployed_version": self.deployed_version,
            "deployed_deployment_id": self.deployed_deployment_id,
            "last_deployment_id": self.last_deployment_id,
            "last_status": self.last_status,
            "last_version": self.last_version,
            "last_ended_at": self.last_ended_at,
            "running_deployment_id": self.running_deployment_id,
            "streak_version": self.streak_version,
            "streak_count": self.streak_count,
            "streak_last_at": self.streak_last_at,
        }


_PG_COMPLETED = text(
    "SELECT w.e, w.s, w.v FROM unnest(CAST(:e AS text[]), CAST(:s AS text[]), CAST(:v AS text[]))"
    " AS w(e, s, v) WHERE EXISTS (SELECT 1 FROM deployments AS d WHERE d.environment = w.e"
    " AND d.service = w.s AND d.version = w.v AND d.status = 'completed')"
)


@lru_cache(maxsize=16)
def _completed_query(size: int) -> Select[str, str, str]:
    """Which of ``size`` (environment, service, version) triples have a completed deployment.

    One OR term per triple (bound as ``e<i>``, ``s<i>``, ``v<i>``), each an index search on
    (environment, service, version, status); ``status || ''`` keeps SQLite's planner (no
    statistics) from scanning the status index instead. Built once per size: building
    thousands of expressions costs more than running the query.
    """
    completed = _D.c.status.concat("") == "completed"
    terms = [
        and_(
            _D.c.environment == bindparam(f"e{index}"),
            _D.c.service == bindparam(f"s{index}"),
            _D.c.version == bindparam(f"v{index}"),
            completed,
        )
        for index in range(size)
    ]
    return select(_D.c.environment, _D.c.service, _D.c.version).where(or_(*terms)).distinct()


def _refresh_service_state(conn: Connection, environment: str, service: str) -> None:
    """Recompute one service's row from its deployments, inside the caller's transaction."""
    key = (_SS.c.environment == environment, _SS.c.service == service)
    # Make sure the row exists, then lock it: concurrent refreshes of one service
    # serialise here (PostgreSQL; SQLite writers are serialised by BEGIN IMMEDIATE).
    _insert_ignore(
        conn,
        _SS,
        {"environment": environment, "service": service, "streak_count": 0},
        ["environment", "service"],
    )
    reset_id = conn.execute(select(_SS.c.streak_reset_id).where(*key).with_for_update()).scalar()

    fold = _ServiceFold(reset_id=reset_id, track_running=False)
    where = (_D.c.environment == environment, _D.c.service == service)
    before: int | None = None
    while not fold.done:
        query = select(*_FOLD_COLUMNS).where(*where).order_by(_D.c.id.desc()).limit(_SCAN_PAGE)
        if before is not None:
            query = query.where(_D.c.id < before)
        rows = conn.execute(query).all()
        for row in rows:
            fold.feed(row)
            if fold.done:
                break
        if len(rows) < _SCAN_PAGE:
            break
        before = rows[-1][0]
    # The condition is inlined as the partial index states it (not bound parameters), so
    # both databases search ix_deployments_running instead of the whole history.
    fold.running_deployment_id = conn.execute(
        select(func.max(_D.c.id)).where(*where, text(UNFINISHED_SQL))
    ).scalar()
    conn.execute(update(_SS).where(*key).values(**fold.values()))


# --------------------------------------------------------------------------- the store


class Store(OutboxQueries, DriftQueries):
    """All reads and writes of the reconciler's records."""

    engine: Engine

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = write_engine(engine)
        self._file = SQLiteFile.of(engine)

    @classmethod
    def from_url(cls, url: str, *, migrate: bool = True) -> Store:
        engine = make_engine(url)
        if migrate:
            upgrade(engine)
        return cls(engine)

    @classmethod
    def for_reading(cls, url: str) -> Store:
        """The store for a command that only reads (`history`, `show`, `status`): it creates
        a new database, but never upgrades an existing one behind the operator's back (that
        is `db upgrade`'s or the daemon's job). A database at this release's head is
        recognised without importing Alembic (most of a reading command's start-up)."""
        engine = make_engine(url)
        current = current_revision(engine)
        if current is None:
            upgrade(engine)
        elif current != HEAD_REVISION:
            try:
                check_schema(engine)  # a newer release's database says so
            finally:
                engine.dispose()
            raise StoreError(
                f"the database is at schema revision {current} and this reconciler needs "
                f"{HEAD_REVISION}: run `reconciler db upgrade` (the daemon does it at start)"
            )
        return cls(engine)

    def ping(self) -> None:
        """Raise if the database does not answer, or is no longer the file it was (a
        SQLite file deleted or replaced underneath: readiness checks)."""
        problem = self.file_problem()
        if problem is not None:
            raise StoreError(problem)
        with self.engine.connect() as conn:
            conn.execute(select(literal(1))).scalar_one()

    def file_problem(self) -> str | None:
        """Why the SQLite file written to is not the database any more (deleted or replaced
        under the process), or None; always None on PostgreSQL. One ``stat``: cheap."""
        return self._file.problem() if self._file is not None else None

    def close(self) -> None:
        """Close the pooled connections (the store can still be used afterwards)."""
        self.engine.dispose()

    # ------------------------------------------------------------------ syncs

    def begin_sync(self, *, trigger: str, seen_at: datetime, commit: CommitMeta | None) -> int:
        _check(trigger, SYNC_TRIGGERS, "sync trigger")
        values: dict[str, Any] = {
            "trigger": trigger,
            "seen_at": _aware(seen_at, "seen_at"),
            "full_load": False,
            "environments_changed": [],
            "errors": [],
        }
        if commit is not None:
            values.update(
                commit_sha=commit.sha,
                commit_author=commit.author,
                commit_time=commit.time,
                commit_subject=commit.subject,
            )
        with self._writer.begin() as conn:
            return int(conn.execute(insert(_S).values(**values).returning(_S.c.id)).scalar_one())

    def finish_sync(
        self,
        sync_id: int,
        *,
        result: str,
        ended_at: datetime,
        environments_changed: list[str],
        errors: list[dict[str, Any]],
        full_load: bool,
        note: str | None = None,
        error_message: str | None = None,
    ) -> None:
        _check(result, SYNC_RESULTS, "sync result")
        with self._writer.begin() as conn:
            changed = conn.execute(
                update(_S)
                .where(_S.c.id == sync_id)
                .values(
                    result=result,
                    ended_at=_aware(ended_at, "ended_at"),
                    environments_changed=list(environments_changed),
                    errors=[dict(error) for error in errors],
                    full_load=full_load,
                    note=note,
                    error_message=_one_line(error_message),
                )
            ).rowcount
            if changed == 0:
                raise StoreError(f"no sync {sync_id}")

    def last_synced_commit(self) -> str | None:
        """The commit of the latest sync that applied (result ok, errors or unchanged)."""
        with self.engine.connect() as conn:
            sha: str | None = conn.execute(
                select(_S.c.commit_sha)
                .where(_S.c.result.in_(SYNC_APPLIED_RESULTS), _S.c.commit_sha.is_not(None))
                .order_by(_S.c.id.desc())
                .limit(1)
            ).scalar()
            return sha

    def list_syncs(self, limit: int = 20) -> list[SyncRecord]:
        """The latest syncs, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(_S).order_by(_S.c.id.desc()).limit(limit)).all()
            return [_sync(row) for row in rows]

    # ------------------------------------------------------------------ deployments

    def create_deployment(self, new: NewDeployment) -> DeploymentRecord:
        """Record a planned deployment, status ``pending``, with its first progress event."""
        _check(new.trigger, TRIGGERS, "trigger")
        created_at = _aware(new.created_at, "created_at") if new.created_at else _now()
        with self._writer.begin() as conn:
            try:
                deployment_id = int(
                    conn.execute(
                        insert(_D)
                        .values(
                            environment=new.environment,
                            service=new.service,
                            version=new.version,
                            previous_version=new.previous_version,
                            provider=new.provider,
                            provider_type=new.provider_type,
                            strategy=dict(new.strategy),
                            status="pending",
                            trigger=new.trigger,
                            commit=new.commit,
                            commit_author=new.commit_author,
                            attempt=new.attempt,
                            timeout_seconds=new.timeout_seconds,
                            params=dict(new.params),
                            created_at=created_at,
                            sync_id=new.sync_id,
                            rollback_of=new.rollback_of,
                        )
                        .returning(_D.c.id)
                    ).scalar_one()
                )
            except IntegrityError as exc:
                raise StoreError(
                    f"cannot record deployment: unknown sync {new.sync_id} "
                    f"or deployment {new.rollback_of}"
                ) from exc
            conn.execute(
                insert(_E).values(
                    deployment_id=deployment_id,
                    status="pending",
                    message=_DEFAULT_MESSAGES["pending"],
                    percent=None,
                    details={},
                    at=created_at,
                )
            )
            _refresh_service_state(conn, new.environment, new.service)
            return _deployment(conn.execute(select(_D).where(_D.c.id == deployment_id)).one())

    def set_status(
        self,
        deployment_id: int,
        status: str,
        *,
        at: datetime,
        error_message: str | None = None,
        validation: dict[str, Any] | None = None,
        message: str | None = None,
    ) -> DeploymentRecord:
        """Move a deployment to ``status`` and append the matching progress event.

        ``validating``/``in_progress`` set ``started_at`` the first time; terminal statuses
        set ``completed_at``. A terminal record is never changed, except ``failed`` →
        ``rolled_back`` (which keeps its error message and end time).
        """
        _check(status, STATUSES, "status")
        _aware(at, "at")
        with self._writer.begin() as conn:
            return self._set_status(
                conn,
                deployment_id,
                status,
                at=at,
                error_message=_one_line(error_message),
                validation=validation,
                message=_one_line(message),
            )

    def _set_status(
        self,
        conn: Connection,
        deployment_id: int,
        status: str,
        *,
        at: datetime,
        error_message: str | None,
        validation: dict[str, Any] | None,
        message: str | None,
    ) -> DeploymentRecord:
        row = conn.execute(
            select(_D).where(_D.c.id == deployment_id).with_for_update()
        ).one_or_none()
        if row is None:
            raise StoreError(f"no deployment {deployment_id}")
        current = _deployment(row)
        values: dict[str, Any] = {"status": status}
        if current.status in TERMINAL_STATUSES:
            if not (current.status == "failed" and status == "rolled_back"):
                raise StoreError(
                    f"deployment {deployment_id} is {current.status}: "
                    f"a finished deployment cannot become {status}"
                )
            # failed -> rolled_back: keep error_message and completed_at.
            if current.error_message is None and error_message is not None:
                values["error_message"] = error_message
        else:
            if status == "pending" and current.status != "pending":
                raise StoreError(f"deployment {deployment_id} is {current.status}: not pending")
            if status in ("validating", "in_progress") and current.started_at is None:
                values["started_at"] = at
            if status in TERMINAL_STATUSES:
                values["completed_at"] = at
            if error_message is not None:
                values["error_message"] = error_message
        if validation is not None:
            values["validation"] = dict(validation)
        conn.execute(update(_D).where(_D.c.id == deployment_id).values(**values))
        conn.execute(
            insert(_E).values(
                deployment_id=deployment_id,
                status=status,
                message=message or error_message or _DEFAULT_MESSAGES[status],
                percent=100 if status == "completed" else None,
                details={},
                at=at,
            )
        )
        _refresh_service_state(conn, current.environment, current.service)
        return _deployment(conn.execute(select(_D).where(_D.c.id == deployment_id)).one())

    def add_event(
        self,
        deployment_id: int,
        *,
        status: str,
        message: str,
        percent: int | None,
        details: dict[str, Any] | None,
        at: datetime,
    ) -> None:
        """Append a progress event (e.g. a provider's report) without changing the status."""
        with self._writer.begin() as conn:
            try:
                conn.execute(
                    insert(_E).values(
                        deployment_id=deployment_id,
                        status=status,
                        message=one_line(message),
                        percent=percent,
                        details=dict(details or {}),
                        at=_aware(at, "at"),
                    )
                )
            except IntegrityError as exc:
                raise StoreError(f"no deployment {deployment_id}") from exc

    def append_log(self, deployment_id: int, lines: Sequence[tuple[str, str, datetime]]) -> None:
        """Append captured output lines: ``(stream, line, at)``, stream stdout/stderr/system."""
        if not lines:
            return
        rows = []
        for stream, line, at in lines:
            _check(stream, LOG_STREAMS, "log stream")
            rows.append(
                {
                    "deployment_id": deployment_id,
                    "stream": stream,
                    "line": line,
                    "at": _aware(at, "at"),
                }
            )
        with self._writer.begin() as conn:
            try:
                conn.execute(insert(_L), rows)
            except IntegrityError as exc:
                raise StoreError(f"no deployment {deployment_id}") from exc

    def get_deployment(
        self, deployment_id: int, *, with_progress: bool = False, with_log: bool = False
    ) -> DeploymentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_D).where(_D.c.id == deployment_id)).one_or_none()
            if row is None:
                return None
            progress = None
            if with_progress:
                progress = [
                    _event(event)
                    for event in conn.execute(
                        select(_E).where(_E.c.deployment_id == deployment_id).order_by(_E.c.id)
                    )
                ]
            log = None
            if with_log:
                log = [
                    LogLine(stream=entry.stream, line=entry.line, at=entry.at)
                    for entry in conn.execute(
                        select(_L.c.stream, _L.c.line, _L.c.at)
                        .where(_L.c.deployment_id == deployment_id)
                        .order_by(_L.c.id)
                    )
                ]
            return _deployment(row, progress, log)

    def events_after(
        self, deployment_id: int, after_event_id: int, *, limit: int | None = None
    ) -> list[EventRecord]:
        """Progress events of a deployment with an id above ``after_event_id``, in order
        (the first ``limit`` of them, if given)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_E)
                .where(_E.c.deployment_id == deployment_id, _E.c.id > after_event_id)
                .order_by(_E.c.id)
                .limit(limit)
            ).all()
            return [_event(row) for row in rows]

    def _log_lines(self, max_chars: int) -> Select[Any]:
        return select(
            _L.c.stream,
            func.substr(_L.c.line, 1, max_chars).label("line"),
            func.length(_L.c.line).label("length"),
            _L.c.at,
        )

    @staticmethod
    def _log_line(row: Row[Any], max_chars: int) -> LogLine:
        line = row.line
        if row.length > max_chars:  # only runs recorded before lines were cut on capture
            line += f" … ({row.length - max_chars:,} characters cut)"
        return LogLine(stream=row.stream, line=line, at=row.at)

    def log_page(
        self, deployment_id: int, offset: int, limit: int, *, max_chars: int = 16384
    ) -> list[LogLine]:
        """Lines ``offset`` to ``offset + limit`` (0-based, in order) of a run's log, each
        cut at ``max_chars``: a page of any log in bounded memory."""
        query = (
            self._log_lines(max_chars)
            .where(_L.c.deployment_id == deployment_id)
            .order_by(_L.c.id)
            .offset(offset)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [self._log_line(row, max_chars) for row in conn.execute(query)]

    def log_tail(
        self, deployment_id: int, limit: int, *, max_chars: int = 16384
    ) -> tuple[int, list[LogLine]]:
        """(how many lines the run's log has, its last ``limit`` lines in order)."""
        query = (
            self._log_lines(max_chars)
            .where(_L.c.deployment_id == deployment_id)
            .order_by(_L.c.id.desc())
            .limit(limit)
        )
        count = select(func.count()).select_from(_L).where(_L.c.deployment_id == deployment_id)
        with self.engine.connect() as conn:
            total = int(conn.execute(count).scalar_one())
            lines = [self._log_line(row, max_chars) for row in conn.execute(query)]
        lines.reverse()
        return total, lines

    def history(
        self,
        *,
        environment: str | None = None,
        service: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[DeploymentRecord]:
        """Deployments, newest first (id descending); ``before_id`` pages further back."""
        query = select(_D)
        if environment is not None:
            query = query.where(_D.c.environment == environment)
        if service is not None:
            query = query.where(_D.c.service == service)
        if status is not None:
            query = query.where(_D.c.status == status)
        if since is not None:
            query = query.where(_D.c.created_at >= _aware(since, "since"))
        if before_id is not None:
            query = query.where(_D.c.id < before_id)
        query = query.order_by(_D.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_deployment(row) for row in conn.execute(query)]

    def service_states(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], ServiceState]:
        query = select(*_SERVICE_STATE_COLUMNS)
        rows: list[Any] = []
        with self.engine.connect() as conn:
            if environments is None:
                rows = list(conn.execute(query).all())
            else:
                for chunk in _chunks(sorted(set(environments))):
                    rows.extend(conn.execute(query.where(_SS.c.environment.in_(chunk))).all())
        # Positional construction: this runs for every service of every status query.
        make = ServiceState._make
        return {(row[0], row[1]): make(row) for row in rows}

    def completed_versions(
        self, triples: Collection[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        """Which ``(environment, service, version)`` have at least one completed deployment."""
        wanted = sorted(set(triples))
        found: set[tuple[str, str, str]] = set()
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql" and wanted:
                # One round trip: the triples as three arrays, each probed with an index
                # search (the OR form costs ~4x more to plan on PostgreSQL).
                envs, services, versions = (list(column) for column in zip(*wanted, strict=True))
                rows = conn.execute(_PG_COMPLETED, {"e": envs, "s": services, "v": versions})
                return {(row[0], row[1], row[2]) for row in rows}
            for chunk in _chunks(wanted):
                params: dict[str, str] = {}
                for index, (environment, service, version) in enumerate(chunk):
                    params[f"e{index}"] = environment
                    params[f"s{index}"] = service
                    params[f"v{index}"] = version
                query = _completed_query(len(chunk))
                found.update((row[0], row[1], row[2]) for row in conn.execute(query, params))
        return found

    def previous_completed_version(
        self, environment: str, service: str, *, before_version: str | None = None
    ) -> str | None:
        """The latest completed version other than ``before_version`` (rollback target)."""
        query = select(_D.c.version).where(
            _D.c.environment == environment,
            _D.c.service == service,
            _D.c.status == "completed",
        )
        if before_version is not None:
            query = query.where(_D.c.version != before_version)
        with self.engine.connect() as conn:
            version: str | None = conn.execute(query.order_by(_D.c.id.desc()).limit(1)).scalar()
            return version

    def reset_streak(self, environment: str, service: str) -> None:
        """Forget the service's failed attempts so far (an operator asked for a retry)."""
        with self._writer.begin() as conn:
            marker = conn.execute(
                select(func.max(_D.c.id)).where(
                    _D.c.environment == environment,
                    _D.c.service == service,
                    _D.c.status.in_(_TERMINAL),
                )
            ).scalar()
            if marker is None:
                return
            _refresh_service_state(conn, environment, service)  # ensures the row exists
            conn.execute(
                update(_SS)
                .where(_SS.c.environment == environment, _SS.c.service == service)
                .values(streak_reset_id=marker)
            )
            _refresh_service_state(conn, environment, service)

    def set_run_process(self, deployment_id: int, pgid: int, token: str) -> None:
        """Record the process group a deployment's run leads (see `unfinished_processes`)."""
        with self._writer.begin() as conn:
            conn.execute(
                update(_D).where(_D.c.id == deployment_id).values(run_pgid=pgid, run_process=token)
            )

    def unfinished_processes(self) -> list[tuple[int, int, str]]:
        """``(deployment id, process group, start token)`` of every unfinished deployment
        that recorded a process: what a crashed daemon may have left running."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_D.c.id, _D.c.run_pgid, _D.c.run_process)
                .where(_D.c.status.in_(_ACTIVE), _D.c.run_pgid.is_not(None))
                .order_by(_D.c.id)
            )
            return [(r.id, r.run_pgid, r.run_process) for r in rows if r.run_process]

    def interrupt_unfinished(self, *, message: str, at: datetime) -> list[int]:
        """End every unfinished deployment ``failed`` with ``message`` (crash recovery)."""
        _aware(at, "at")
        with self._writer.begin() as conn:
            ids = list(
                conn.execute(
                    select(_D.c.id).where(_D.c.status.in_(_ACTIVE)).order_by(_D.c.id)
                ).scalars()
            )
            for deployment_id in ids:
                self._set_status(
                    conn,
                    deployment_id,
                    "failed",
                    at=at,
                    error_message=message,
                    validation=None,
                    message=message,
                )
            return ids

    def rebuild_service_state(self) -> None:
        """Recompute the whole `service_state` table from the deployments (repairs)."""
        with self._writer.begin() as conn:
            resets = {
                (row.environment, row.service): row.streak_reset_id
                for row in conn.execute(
                    select(_SS.c.environment, _SS.c.service, _SS.c.streak_reset_id).where(
                        _SS.c.streak_reset_id.is_not(None)
                    )
                )
            }
            conn.execute(delete(_SS))
            rows = conn.execute(
                select(_D.c.environment, _D.c.service, *_FOLD_COLUMNS)
                .order_by(_D.c.environment, _D.c.service, _D.c.id.desc())
                .execution_options(yield_per=10_000)
            )
            batch: list[dict[str, Any]] = []
            for (environment, service), group in groupby(rows, key=lambda r: (r[0], r[1])):
                fold = _ServiceFold(reset_id=resets.get((environment, service)), track_running=True)
                for row in group:
                    if not fold.done:
                        fold.feed(row[2:])
                batch.append(
                    {
                        "environment": environment,
                        "service": service,
                        "streak_reset_id": fold.reset_id,
                        **fold.values(),
                    }
                )
                if len(batch) >= 5000:
                    conn.execute(insert(_SS), batch)
                    batch = []
            rows.close()
            if batch:
                conn.execute(insert(_SS), batch)

    # ------------------------------------------------------------------ environments

    def save_environment_state(
        self, name: str, *, spec: dict[str, Any], source_path: str, commit: str, at: datetime
    ) -> None:
        """Remember the last valid desired state applied for an environment."""
        with self._writer.begin() as conn:
            _upsert(
                conn,
                _ENV,
                {
                    "name": name,
                    "spec": dict(spec),
                    "source_path": source_path,
                    "commit": commit,
                    "updated_at": _aware(at, "at"),
                },
                ["name"],
            )

    def save_environment_states(
        self, states: Iterable[tuple[str, dict[str, Any], str]], *, commit: str, at: datetime
    ) -> None:
        """Several `(name, spec, source_path)` at once, in one transaction (a full load)."""
        when = _aware(at, "at")
        rows = [
            {"name": n, "spec": dict(spec), "source_path": p, "commit": commit, "updated_at": when}
            for n, spec, p in states
        ]
        if not rows:
            return
        with self._writer.begin() as conn:
            from sqlalchemy.dialects import postgresql, sqlite  # here: see rows.insert_ignore

            insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert_(_ENV)
            changes = {c: stmt.excluded[c] for c in ("spec", "source_path", "commit", "updated_at")}
            # One statement, many rows (executemany): a full load saves 1,000 of them.
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=changes), rows)

    def environment_states(self) -> dict[str, EnvironmentStateRecord]:
        with self.engine.connect() as conn:
            return {
                row.name: EnvironmentStateRecord(
                    name=row.name,
                    spec=row.spec,
                    source_path=row.source_path,
                    commit=row.commit,
                    updated_at=row.updated_at,
                )
                for row in conn.execute(select(_ENV).order_by(_ENV.c.name))
            }

    def forget_environment_states(self, names: Collection[str]) -> None:
        """Drop the saved desired state of environments that left the repository, so that
        falling back on the saved states never brings them back."""
        if not names:
            return
        with self._writer.begin() as conn:
            for chunk in _chunks(sorted(names)):
                conn.execute(delete(_ENV).where(_ENV.c.name.in_(chunk)))

    def applied_commit(self) -> CommitMeta | None:
        """The commit of the latest sync that applied, as that sync recorded it."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_S.c.commit_sha, _S.c.commit_author, _S.c.commit_time, _S.c.commit_subject)
                .where(_S.c.result.in_(SYNC_APPLIED_RESULTS), _S.c.commit_sha.is_not(None))
                .order_by(_S.c.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        return CommitMeta(sha=row[0], author=row[1], time=row[2], subject=row[3])

    def record_operator_action(
        self,
        *,
        environment: str,
        service: str | None,
        action: str,
        actor: str,
        note: str | None,
        at: datetime,
    ) -> None:
        """Record what an operator did; ``suspend``/``resume`` also (un)suspend it."""
        _check(action, OPERATOR_ACTIONS, "operator action")
        _aware(at, "at")
        with self._writer.begin() as conn:
            conn.execute(
                insert(_OA).values(
                    at=at,
                    environment=environment,
                    service=service,
                    action=action,
                    actor=actor,
                    note=note,
                )
            )
            if action == "suspend":
                _insert_ignore(
                    conn,
                    _OS,
                    {"environment": environment, "since": at, "actor": actor},
                    ["environment"],
                )
            elif action == "resume":
                conn.execute(delete(_OS).where(_OS.c.environment == environment))

    def suspended_environments(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(_OS.c.environment)).scalars())

    def suspension_reasons(self) -> dict[str, str | None]:
        """Each environment an operator suspended: the reason given (`suspend --reason`,
        the note of the latest `suspend` action there), None when none was given."""
        latest = (
            select(_OA.c.environment, func.max(_OA.c.id).label("id"))
            .where(_OA.c.action == "suspend")
            .group_by(_OA.c.environment)
            .subquery()
        )
        query = (
            select(_OS.c.environment, _OA.c.note)
            .select_from(_OS)
            .outerjoin(latest, latest.c.environment == _OS.c.environment)
            .outerjoin(_OA, _OA.c.id == latest.c.id)
        )
        with self.engine.connect() as conn:
            return {env: note for env, note in conn.execute(query).all()}

    def commit_subjects(self, sync_ids: Collection[int]) -> dict[int, str]:
        """The subject of the commit each sync read (what `history` and `show` print beside
        a deployment's commit), by sync id; syncs without one are left out."""
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(sorted(set(sync_ids))):
                query = select(_S.c.id, _S.c.commit_subject).where(
                    _S.c.id.in_(chunk), _S.c.commit_subject.is_not(None)
                )
                out.update({int(i): str(subject) for i, subject in conn.execute(query).all()})
        return out
