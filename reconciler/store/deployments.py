"""The deployment queries: the ledger of deployments and their progress events.

A mixin of `Store`. Every insert and status change refreshes the service's `service_state`
row in the same transaction (`service_state.refresh_service_state`). A terminal record is
never changed, except ``failed`` → ``rolled_back`` (`_set_status`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from desired_state import one_line
from reconciler.store import chain, fence, models, notices, rows
from reconciler.store.fast import Fast
from reconciler.store.records import (
    ACTIVE_STATUSES,
    STATUSES,
    TERMINAL_STATUSES,
    TRIGGERS,
    DeploymentRecord,
    EventRecord,
    LogLine,
    NewDeployment,
    StatusStep,
    StoreError,
    deployment_from,
)
from reconciler.store.service_state import (
    note_created,
    note_ended,
    note_status,
    refresh_service_state,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_aware = rows.aware
_check = rows.check
_chunks = rows.chunks
_reader = rows.reader
_deployment = rows.deployment_record
_event = rows.event_record
_one_line = rows.one_line_or_none

_D = models.deployments
_E = models.deployment_events
_L = models.deployment_logs

_ACTIVE = tuple(sorted(ACTIVE_STATUSES))

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


def _now() -> datetime:
    return datetime.now(UTC)


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


# Statements of the write path, built once (see service_state.py). The deployment's row
# comes back from the write itself (RETURNING): no second read.
# Run through the driver on SQLite (fast.py).
_INSERT_DEPLOYMENT = Fast(insert(_D).returning(*_D.c))
_INSERT_EVENT = Fast(insert(_E).values(deployment_id=bindparam("did")))
_SET_PROCESS = (
    update(_D)
    .where(_D.c.id == bindparam("did"))
    .values(run_pgid=bindparam("pgid"), run_process=bindparam("token"))
)


def _event_values(status: str, message: str | None, at: datetime) -> dict[str, Any]:
    """A status change's progress event (``did``, the deployment id, bound separately)."""
    return {
        "status": status,
        "message": message or _DEFAULT_MESSAGES[status],
        "percent": 100 if status == "completed" else None,
        "details": {},
        "at": at,
    }


@lru_cache(maxsize=32)
def _advance_statement(columns: tuple[str, ...], starts: bool) -> Fast:
    """UPDATE of an unfinished deployment to ``:new_status`` (setting ``columns`` from
    the parameters of the same names; ``started_at`` the first time when ``starts``),
    returning the row; matches nothing when the deployment is finished or unknown."""
    values: dict[str, Any] = {"status": bindparam("new_status")}
    values.update({name: bindparam(name) for name in columns})
    if starts:
        # Typed: an untyped parameter would reach SQLite as the driver's own text of an
        # aware datetime ("... 10:00:01+00:00"), not the stored form the column's type makes.
        at = bindparam("at", type_=_D.c.started_at.type)
        values["started_at"] = func.coalesce(_D.c.started_at, at)
    return Fast(
        update(_D)
        .where(_D.c.id == bindparam("did"), _D.c.status.in_(_ACTIVE))
        .values(values)
        .returning(*_D.c)
    )


def _checked_update(
    conn: Connection,
    ident: int,
    status: str,
    at: datetime,
    error: str | None,
    validation: dict[str, Any] | None,
) -> Any:
    """The status changes the fast path leaves: read the row, refuse what SPEC §5
    forbids, allow ``failed`` → ``rolled_back``; the updated row."""
    row = conn.execute(select(_D).where(_D.c.id == ident).with_for_update()).one_or_none()
    if row is None:
        raise StoreError(f"no deployment {ident}")
    current = _deployment(row)
    values: dict[str, Any] = {"status": status}
    if current.status in TERMINAL_STATUSES:
        if not (current.status == "failed" and status == "rolled_back"):
            raise StoreError(
                f"deployment {ident} is {current.status}: "
                f"a finished deployment cannot become {status}"
            )
        # failed -> rolled_back: keep error_message and completed_at.
        if current.error_message is None and error is not None:
            values["error_message"] = error
    else:
        if status == "pending" and current.status != "pending":
            raise StoreError(f"deployment {ident} is {current.status}: not pending")
        if status in ("validating", "in_progress") and current.started_at is None:
            values["started_at"] = at
        if status in TERMINAL_STATUSES:
            values["completed_at"] = at
        if error is not None:
            values["error_message"] = error
    if validation is not None:
        values["validation"] = dict(validation)
    return conn.execute(update(_D).where(_D.c.id == ident).values(**values).returning(*_D.c)).one()


#: ``history(since=...)`` starts from the recent rows when fewer than this many are recent.
_SPARSE_SINCE = 2000


#: How `history` narrows by ``since``: not at all, from the few recent rows, or by a
#: plain range on a newest-first read (see `DeploymentQueries.history`).
SinceForm = Literal["none", "few", "many"]


@lru_cache(maxsize=1)
def few_since_query() -> Select[int]:
    """How many deployments were created at ``:since`` or later, counting up to
    `_SPARSE_SINCE` at most: an index-only count over ix_deployments_created_at."""
    recent = _D.c.created_at >= bindparam("since")
    probe = select(_D.c.id).where(recent).limit(_SPARSE_SINCE).subquery()
    return select(func.count()).select_from(probe)


@lru_cache(maxsize=64)
def history_query(
    *, environment: bool, service: bool, status: bool, since: SinceForm, before: bool = False
) -> Select[Any]:
    """`history`'s statement for one combination of filters, each bound by name
    (``:environment``, ``:service``, ``:status``, ``:since``, ``:before_id``, ``:limit``).
    The plain sqlite3 reader runs these same statements, compiled (`read_sql.py`)."""
    query = select(_D)
    if environment:
        query = query.where(_D.c.environment == bindparam("environment"))
    if service:
        query = query.where(_D.c.service == bindparam("service"))
    if status:
        # One service's history is short: read it through (environment, service, id)
        # rather than let SQLite's planner (no statistics) pick (status, service, id).
        both = environment and service
        column = _D.c.status.concat("") if both else _D.c.status
        query = query.where(column == bindparam("status"))
    if before:
        query = query.where(_D.c.id < bindparam("before_id"))
    recent = _D.c.created_at >= bindparam("since")
    if since == "few":
        query = query.where(_D.c.id.in_(select(_D.c.id).where(recent)))
    elif since == "many":
        query = query.where(recent)
    return query.order_by(_D.c.id.desc()).limit(bindparam("limit"))


#: One deployment, its progress events and its log lines, by ``:id`` (`get_deployment`).
DEPLOYMENT = select(_D).where(_D.c.id == bindparam("id"))
EVENTS = select(_E).where(_E.c.deployment_id == bindparam("id")).order_by(_E.c.id)
LOG = (
    select(_L.c.stream, _L.c.line, _L.c.at)
    .where(_L.c.deployment_id == bindparam("id"))
    .order_by(_L.c.id)
)


def _fenced_off(
    conn: Connection,
    deployment_id: int,
    status: str,
    at: datetime,
    message: str | None,
    error_message: str | None,
) -> DeploymentRecord | None:
    """None while this process may write the deployment (it holds the environment's lease,
    or needs none). Else a step on the way raises `LeaseLost`, and a terminal result, late
    from a replica that lost the lease, is kept beside the record (the record stays the
    new holder's): the record as it is."""
    if fence.holds(conn):
        return None
    if status not in TERMINAL_STATUSES:
        fence.check(conn)  # raises LeaseLost
    fence.keep_unconfirmed(
        conn,
        deployment_id,
        status,
        at=at,
        message=_one_line(message),
        error_message=_one_line(error_message),
        recorded_at=_now(),
    )
    row = conn.execute(select(_D).where(_D.c.id == deployment_id)).one_or_none()
    if row is None:
        raise StoreError(f"no deployment {deployment_id}")
    return _deployment(row)


def _advance_at_once(
    conn: Connection, deployment_id: int, steps: Sequence[StatusStep]
) -> DeploymentRecord | None:
    """Steps of an unfinished deployment through unfinished statuses (the executor's
    ``in_progress`` and, often, the terminal status after it) written as the last one
    with one UPDATE, their events in one INSERT, the `service_state` row advanced once:
    the same rows as `_set_status` step by step (each step's event, ``started_at`` from
    the first starting step, the last given error and validation), in fewer statements.
    None, having written nothing, when that does not apply (a ``pending`` or terminal
    step before the last, a record no longer unfinished): the caller goes step by step."""
    *before, last = steps
    if any(s.status == "pending" or s.status in TERMINAL_STATUSES for s in before):
        return None
    if last.status == "pending":
        return None
    changes: dict[str, Any] = {}
    started: datetime | None = None
    for step in steps:
        if started is None and step.status in ("validating", "in_progress"):
            started = step.at
        if step.error_message is not None:
            changes["error_message"] = _one_line(step.error_message)
        if step.validation is not None:
            changes["validation"] = dict(step.validation)
    if last.status in TERMINAL_STATUSES:
        changes["completed_at"] = last.at
    statement = _advance_statement(tuple(sorted(changes)), started is not None)
    row = statement.one_or_none(
        conn, {"did": deployment_id, "new_status": last.status, "at": started, **changes}
    )
    if row is None:
        return None
    rec = deployment_from(row)
    events = [
        {
            "did": deployment_id,
            **_event_values(s.status, _one_line(s.message) or _one_line(s.error_message), s.at),
        }
        for s in steps
    ]
    _INSERT_EVENT.execute_many(conn, events)
    for _ in steps:
        notices.notify(conn, "progress", f"{deployment_id} {rec.environment}")
    _note(conn, rec, last.status)
    if last.status in TERMINAL_STATUSES:
        chain.record_deployment(conn, deployment_id, row)
    return rec


def _note(conn: Connection, rec: DeploymentRecord, status: str) -> None:
    """The service's row after an unfinished deployment moved to ``status`` (its row
    written): advanced once at the end of a run, else only its `last_status`."""
    if status in TERMINAL_STATUSES:
        note_ended(
            conn,
            rec.environment,
            rec.service,
            rec.id,
            version=rec.version,
            status=status,
            trigger=rec.trigger,
            completed_at=rec.completed_at,
        )
    else:
        note_status(conn, rec.environment, rec.service, rec.id, status)


class DeploymentQueries:
    """Deployment and progress event queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def create_deployment(
        self, new: NewDeployment, *, validating_at: datetime | None = None
    ) -> DeploymentRecord:
        """Record a planned deployment, status ``pending``, with its first progress event.

        ``validating_at``: the deployment starts at once (the executor's own runs), so it is
        recorded ``pending`` and moved to ``validating`` in the same transaction: both
        progress events, in order, for one commit.
        """
        _check(new.trigger, TRIGGERS, "trigger")
        created_at = _aware(new.created_at, "created_at") if new.created_at else _now()
        status = "pending" if validating_at is None else "validating"
        events = [_event_values("pending", None, created_at)]
        if validating_at is not None:
            events.append(_event_values("validating", None, _aware(validating_at, "at")))
        with self._writer.begin() as conn:
            fence.check(conn, new.environment)
            try:
                row = _INSERT_DEPLOYMENT.rows(
                    conn,
                    {
                        "environment": new.environment,
                        "service": new.service,
                        "version": new.version,
                        "previous_version": new.previous_version,
                        "provider": new.provider,
                        "provider_type": new.provider_type,
                        "strategy": dict(new.strategy),
                        "status": status,
                        "trigger": new.trigger,
                        "commit": new.commit,
                        "commit_author": new.commit_author,
                        "attempt": new.attempt,
                        "timeout_seconds": new.timeout_seconds,
                        "params": dict(new.params),
                        "created_at": created_at,
                        "started_at": validating_at,
                        "sync_id": new.sync_id,
                        "rollback_of": new.rollback_of,
                    },
                )[0]
            except IntegrityError as exc:
                raise StoreError(
                    f"cannot record deployment: unknown sync {new.sync_id} "
                    f"or deployment {new.rollback_of}"
                ) from exc
            _INSERT_EVENT.execute_many(conn, [{"did": row.id, **event} for event in events])
            # Other replicas' live pages, and their fleet summaries (the environment).
            notices.notify(conn, "progress", f"{row.id} {new.environment}")
            note_created(conn, new.environment, new.service, row.id, status, new.version)
            return deployment_from(row)

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
            late = _fenced_off(conn, deployment_id, status, at, message, error_message)
            if late is not None:
                return late
            return self._set_status(
                conn,
                deployment_id,
                status,
                at=at,
                error_message=_one_line(error_message),
                validation=validation,
                message=_one_line(message),
            )

    def set_statuses(
        self,
        deployment_id: int,
        steps: Sequence[StatusStep],
        *,
        run_process: tuple[int, str] | None = None,
    ) -> DeploymentRecord:
        """Several status changes of one deployment in one transaction, in order (each
        recorded as by `set_status`, with its progress event), and ``run_process`` (the
        process group and its start token, `set_run_process`) with them. The executor's
        ``in_progress`` goes with the run's process group, or with the terminal status when
        the run ended first: one transaction fewer per deployment. The last record."""
        if not steps:
            raise StoreError("no status to set")
        for step in steps:
            _check(step.status, STATUSES, "status")
            _aware(step.at, "at")
        with self._writer.begin() as conn:
            last = steps[-1]  # fenced off: only a terminal result is kept, unconfirmed
            late = _fenced_off(
                conn, deployment_id, last.status, last.at, last.message, last.error_message
            )
            if late is not None:
                return late
            merged = _advance_at_once(conn, deployment_id, steps) if len(steps) > 1 else None
            for step in steps if merged is None else ():
                rec = self._set_status(
                    conn,
                    deployment_id,
                    step.status,
                    at=step.at,
                    error_message=_one_line(step.error_message),
                    validation=step.validation,
                    message=_one_line(step.message),
                )
            if run_process is not None:
                pgid, token = run_process
                conn.execute(_SET_PROCESS, {"did": deployment_id, "pgid": pgid, "token": token})
            return rec if merged is None else merged

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
        """Every status change, terminal ones included, inside the caller's transaction:
        the deployment row, its progress event, the service's `service_state` row.

        An unfinished deployment moves with one conditional UPDATE ... RETURNING (no read
        first); what that does not match (a finished record, ``pending`` again, an unknown
        id) takes `_checked_update`, which reads the row and says why.
        """
        changes: dict[str, Any] = {}
        if status in TERMINAL_STATUSES:
            changes["completed_at"] = at
        if error_message is not None:
            changes["error_message"] = error_message
        if validation is not None:
            changes["validation"] = dict(validation)
        row = None
        if status != "pending":
            starts = status in ("validating", "in_progress")
            statement = _advance_statement(tuple(sorted(changes)), starts)
            row = statement.one_or_none(
                conn, {"did": deployment_id, "new_status": status, "at": at, **changes}
            )
        checked = row is None
        mapping: Mapping[str, Any]
        if row is None:
            mapping = _checked_update(
                conn, deployment_id, status, at, error_message, validation
            )._mapping
        else:
            mapping = row
        rec = deployment_from(mapping)
        event = _event_values(status, message or error_message, at)
        _INSERT_EVENT.execute(conn, {"did": deployment_id, **event})
        notices.notify(conn, "progress", f"{deployment_id} {rec.environment}")
        if checked:  # off the common path: the service's row is re-derived
            refresh_service_state(conn, rec.environment, rec.service)
        else:  # the end of a run: the row advances once, here
            _note(conn, rec, status)
        if status in TERMINAL_STATUSES:
            # The audit ledger, same transaction, from the row the UPDATE returned.
            chain.record_deployment(conn, deployment_id, mapping)
        return rec

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
            fence.check(conn)
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
            notices.notify(conn, "progress", str(deployment_id))

    def get_deployment(
        self, deployment_id: int, *, with_progress: bool = False, with_log: bool = False
    ) -> DeploymentRecord | None:
        key = {"id": deployment_id}
        with self.engine.connect() as conn:
            row = conn.execute(DEPLOYMENT, key).one_or_none()
            if row is None:
                return None
            progress = None
            if with_progress:
                progress = [_event(event) for event in conn.execute(EVENTS, key)]
            log = None
            if with_log:
                log = [
                    LogLine(stream=entry.stream, line=entry.line, at=entry.at)
                    for entry in conn.execute(LOG, key)
                ]
            rec = _deployment(row, progress, log)
            if with_progress:
                unconfirmed = fence.unconfirmed_of(conn, deployment_id)
                if unconfirmed:
                    rec = replace(rec, unconfirmed=unconfirmed)
            return rec

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
        """Deployments, newest first (id descending); ``before_id`` pages further back.

        Each combination of the equality filters has an index of those columns then
        ``id`` (migration 0008), read newest first until ``limit`` rows match. ``since``
        is the one range: when fewer than `_SPARSE_SINCE` deployments are that recent,
        the query starts from them (ix_deployments_created_at) and sorts the few; when
        more are, they are the newest ids in practice, so reading newest first meets
        ``limit`` matches at once. Both forms give the same rows; only the plan differs.
        """
        params: dict[str, Any] = {"limit": limit}
        for name, value in (
            ("environment", environment),
            ("service", service),
            ("status", status),
            ("before_id", before_id),
        ):
            if value is not None:
                params[name] = value
        form: SinceForm = "none"
        with self.engine.connect() as conn:
            if since is not None:
                params["since"] = _aware(since, "since")
                count = conn.execute(few_since_query(), {"since": params["since"]}).scalar_one()
                form = "few" if int(count) < _SPARSE_SINCE else "many"
            query = history_query(
                environment=environment is not None,
                service=service is not None,
                status=status is not None,
                since=form,
                before=before_id is not None,
            )
            return [_deployment(row) for row in conn.execute(query, params)]

    def completed_versions(
        self, triples: Collection[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        """Which ``(environment, service, version)`` have at least one completed deployment."""
        wanted = sorted(set(triples))
        found: set[tuple[str, str, str]] = set()
        with _reader(self.engine) as conn:
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

    def set_run_process(self, deployment_id: int, pgid: int, token: str) -> None:
        """Record the process group a deployment's run leads (see `unfinished_processes`)."""
        with self._writer.begin() as conn:
            fence.check(conn)
            conn.execute(_SET_PROCESS, {"did": deployment_id, "pgid": pgid, "token": token})

    def unfinished_processes(
        self, *, environments: Collection[str] | None = None
    ) -> list[tuple[int, int, str]]:
        """``(deployment id, process group, start token)`` of every unfinished deployment
        that recorded a process: what a crashed daemon may have left running (in
        ``environments`` only, when given: a replica's newly claimed ones)."""
        return [
            (did, pgid, token)
            for did, pgid, token in self.unfinished_runs(environments=environments)
            if pgid is not None and token
        ]

    def unfinished_runs(
        self, *, environments: Collection[str] | None = None
    ) -> list[tuple[int, int | None, str | None]]:
        """``(deployment id, process group, start token)`` of every unfinished deployment,
        the group None where none was recorded: a daemon killed between a run's spawn and
        that record leaves one, found by the marker in its processes' environment."""
        query = select(_D.c.id, _D.c.run_pgid, _D.c.run_process).where(_D.c.status.in_(_ACTIVE))
        if environments is not None:
            query = query.where(_D.c.environment.in_(sorted(environments)))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(_D.c.id))
            return [(r.id, r.run_pgid, r.run_process) for r in rows]

    def interrupt_unfinished(
        self, *, message: str, at: datetime, environments: Collection[str] | None = None
    ) -> list[int]:
        """End every unfinished deployment ``failed`` with ``message`` (crash recovery; in
        ``environments`` only, when given: those a replica has just claimed)."""
        _aware(at, "at")
        query = select(_D.c.id).where(_D.c.status.in_(_ACTIVE))
        if environments is not None:
            query = query.where(_D.c.environment.in_(sorted(environments)))
        with self._writer.begin() as conn:
            ids = list(conn.execute(query.order_by(_D.c.id)).scalars())
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
