"""The service-state queries: `service_state`, one derived row per service.

It is kept up to date in the same transaction as every deployment insert or status change
(`refresh_service_state`, called by the deployment queries); `rebuild_service_state`
recomputes the table from the deployments with the same rules (`ServiceFold`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import groupby
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)

from reconciler.store import models, rows
from reconciler.store.fast import Fast
from reconciler.store.models import UNFINISHED_SQL
from reconciler.store.records import (
    ACTIVE_STATUSES,
    FAILURE_STATUSES,
    TERMINAL_STATUSES,
    ServiceState,
    service_states_from_text,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_chunks = rows.chunks
_reader = rows.reader
_insert_ignore = rows.insert_ignore

#: Rows fetched at a time when scanning one service's deployments backwards.
_SCAN_PAGE = 64

_D = models.deployments
_SS = models.service_state

_TERMINAL = tuple(sorted(TERMINAL_STATUSES))

# Columns the service-state fold reads, newest deployment first.
_FOLD_COLUMNS = (_D.c.id, _D.c.version, _D.c.status, _D.c.trigger, _D.c.completed_at)

#: service_state's columns in the order of `ServiceState`'s fields, as the driver reads them.
_STATE_SQL = "SELECT " + ", ".join(ServiceState._fields) + " FROM service_state"
_STATE_FIELDS = (
    "environment", "service", "deployed_version", "deployed_deployment_id",
    "last_deployment_id", "last_status", "last_version", "last_ended_at",
    "running_deployment_id", "streak_version", "streak_count", "streak_last_at",
)  # fmt: skip
assert ServiceState._fields == _STATE_FIELDS, "service_states unpacks rows in this order"


def _state_rows(conn: Connection, environments: Collection[str] | None) -> list[Sequence[Any]]:
    """service_state rows as the driver returns them (SQLite: times as text)."""
    cursor = conn.connection.cursor()
    try:
        if environments is None:
            cursor.execute(_STATE_SQL)
            return list(cursor.fetchall())
        wanted = sorted(set(environments))
        if conn.dialect.name == "postgresql":
            cursor.execute(_STATE_SQL + " WHERE environment = ANY(%s)", (wanted,))
            return list(cursor.fetchall())
        found: list[Sequence[Any]] = []
        for chunk in _chunks(wanted):
            marks = ", ".join("?" for _ in chunk)
            cursor.execute(f"{_STATE_SQL} WHERE environment IN ({marks})", tuple(chunk))
            found.extend(cursor.fetchall())
        return found
    finally:
        cursor.close()


@dataclass
class ServiceFold:
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

    @staticmethod
    def ended_newest(
        row: Any, version: str, status: str, trigger: str, completed_at: datetime | None
    ) -> dict[str, Any]:
        """The row's new values (all but ``running_deployment_id``) when the service's
        newest deployment, unfinished so far, ends with ``status``.

        The same rules as `feed`, applied to the one deployment the row has not folded
        yet: while unfinished it was skipped, so the row's streak and deployed version are
        the fold of the deployments before it, and it is newer than any reset marker.
        """
        values: dict[str, Any] = {"last_status": status, "last_ended_at": completed_at}
        if status == "completed":
            values["deployed_version"] = version
            values["deployed_deployment_id"] = row.last_deployment_id
        if trigger == "rollback" or status == "cancelled":
            return values
        if status in FAILURE_STATUSES:
            same = row.streak_count > 0 and row.streak_version == version
            values["streak_version"] = version
            values["streak_count"] = row.streak_count + 1 if same else 1
            values["streak_last_at"] = completed_at
        else:  # completed
            values.update(streak_version=None, streak_count=0, streak_last_at=None)
        return values

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


# Statements of the write path, built once: a deployment writes the row several times,
# and building a statement (and its cache key) costs more than running it.
_KEY = (_SS.c.environment == bindparam("env"), _SS.c.service == bindparam("svc"))
_DEPLOYMENTS_OF = (_D.c.environment == bindparam("env"), _D.c.service == bindparam("svc"))
_LOCK_ROW = select(_SS).where(*_KEY).with_for_update()
_FOLD_PAGE = (
    select(*_FOLD_COLUMNS)
    .where(*_DEPLOYMENTS_OF, _D.c.id < bindparam("before"))
    .order_by(_D.c.id.desc())
    .limit(_SCAN_PAGE)
)
# The condition is inlined as the partial index states it (not bound parameters), so
# both databases search ix_deployments_running instead of the whole history.
_RUNNING = select(func.max(_D.c.id)).where(*_DEPLOYMENTS_OF, text(UNFINISHED_SQL))
_UPDATE_ROW = update(_SS).where(*_KEY)
# The terminal step: the next running deployment looked up inside the UPDATE itself.
_ENDED = _UPDATE_ROW.values(running_deployment_id=_RUNNING.scalar_subquery())
# A new deployment is the service's newest: it becomes `last_*` and, being unfinished,
# the running one. Guarded so that a deployment that is not the newest (PostgreSQL: a
# concurrent transaction committed a newer one first) changes nothing here.
_CREATED = (
    update(_SS)
    .where(*_KEY, _SS.c.last_deployment_id < bindparam("id"))
    .values(
        last_deployment_id=bindparam("id"),
        last_status=bindparam("status"),
        last_version=bindparam("version"),
        last_ended_at=None,
        running_deployment_id=bindparam("id"),
    )
)
# An unfinished status change of the newest deployment: only `last_status` moves (the
# fold skips unfinished deployments, and the newest unfinished one stays the running one).
_STATUS = Fast(
    update(_SS)
    .where(*_KEY, _SS.c.last_deployment_id == bindparam("id"))
    .values(last_status=bindparam("status"))
)
# The statements of every deployment, run through the driver on SQLite (fast.py).
_FAST_CREATED = Fast(_CREATED)
_FAST_LOCK_ROW = Fast(_LOCK_ROW)
_FAST_ENDED = Fast(_ENDED)

#: Far above any id: the first page of a fold reads from the newest deployment.
_NO_BOUND = 2**62


def refresh_service_state(conn: Connection, environment: str, service: str) -> None:
    """Recompute one service's row from its deployments, inside the caller's transaction.

    The slow path (a page of history per call): for the cases the incremental updates
    below do not cover, and for `reset_streak`.
    """
    key = {"env": environment, "svc": service}
    # Make sure the row exists, then lock it: concurrent refreshes of one service
    # serialise here (PostgreSQL; SQLite writers are serialised by BEGIN IMMEDIATE).
    _insert_ignore(
        conn,
        _SS,
        {"environment": environment, "service": service, "streak_count": 0},
        ["environment", "service"],
    )
    reset_id = conn.execute(_LOCK_ROW, key).one().streak_reset_id

    fold = ServiceFold(reset_id=reset_id, track_running=False)
    before = _NO_BOUND
    while not fold.done:
        rows = conn.execute(_FOLD_PAGE, {**key, "before": before}).all()
        for row in rows:
            fold.feed(row)
            if fold.done:
                break
        if len(rows) < _SCAN_PAGE:
            break
        before = rows[-1][0]
    fold.running_deployment_id = conn.execute(_RUNNING, key).scalar()
    conn.execute(_UPDATE_ROW, {**key, **fold.values()})


@lru_cache(maxsize=2)
def _first_statement(dialect: str) -> Fast:
    """INSERT of a service's row made by its first deployment (the fold of one unfinished
    deployment: it is the last and the running one, nothing deployed, no streak), only
    when the service has no other deployment, and nothing when the row exists."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        dialect_insert: Any = postgresql_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        dialect_insert = sqlite_insert
    other = select(_D.c.id).where(*_DEPLOYMENTS_OF, _D.c.id != bindparam("id"))
    names = ("environment", "service", "last_deployment_id", "last_status", "last_version")
    values = select(
        bindparam("env", type_=_SS.c.environment.type),
        bindparam("svc", type_=_SS.c.service.type),
        bindparam("id", type_=_SS.c.last_deployment_id.type),
        bindparam("status", type_=_SS.c.last_status.type),
        bindparam("version", type_=_SS.c.last_version.type),
        bindparam("id", type_=_SS.c.running_deployment_id.type),
        literal(0),
    ).where(~exists(other))
    return Fast(
        dialect_insert(_SS)
        .from_select([*names, "running_deployment_id", "streak_count"], values)
        .on_conflict_do_nothing(index_elements=["environment", "service"])
    )


def note_created(
    conn: Connection, environment: str, service: str, ident: int, status: str, version: str
) -> None:
    """A deployment was inserted: one guarded UPDATE when it is the service's newest and
    the row exists (every deployment but a service's first); for a service's first
    deployment one guarded INSERT; else (a row missing beside older deployments, a
    concurrent newer one) the full refresh."""
    params = {"env": environment, "svc": service, "id": ident, "status": status, "version": version}
    if _FAST_CREATED.execute(conn, params) == 1:
        return
    if _first_statement(conn.dialect.name).execute(conn, params) != 1:
        refresh_service_state(conn, environment, service)


def note_status(conn: Connection, environment: str, service: str, ident: int, status: str) -> None:
    """An unfinished deployment moved to another unfinished status. Nothing else in the
    row depends on it: `last_status` when it is the newest, else nothing."""
    _STATUS.execute(conn, {"env": environment, "svc": service, "id": ident, "status": status})


def note_ended(
    conn: Connection,
    environment: str,
    service: str,
    ident: int,
    *,
    version: str,
    status: str,
    trigger: str,
    completed_at: datetime | None,
) -> None:
    """An unfinished deployment reached a terminal status (its row already written).

    When it is the service's newest deployment (the usual case: one runner per
    environment), the row advances by `ServiceFold.ended_newest` from what it says now;
    otherwise (an older deployment ending, e.g. crash recovery of several) the full
    refresh.
    """
    key = {"env": environment, "svc": service}
    row = _FAST_LOCK_ROW.one_or_none(conn, key)
    if row is None or row.last_deployment_id != ident or row.running_deployment_id != ident:
        refresh_service_state(conn, environment, service)
        return
    values = ServiceFold.ended_newest(row, version, status, trigger, completed_at)
    _FAST_ENDED.execute(conn, {**key, **values})


class ServiceStateQueries:
    """Service-state queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def service_states(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], ServiceState]:
        """Every service's row (or those of ``environments``), keyed (environment, service).

        The read behind every status (20,000 rows for a fleet of 1,000 x 20): the driver's
        own tuples, no SQLAlchemy rows or type processing, the two times converted here,
        and the garbage collector paused while 20,000 rows are read and made (its passes over
        them cost as much as making them).
        """
        sqlite = self.engine.dialect.name == "sqlite"
        new, make = tuple.__new__, ServiceState
        with rows.gc_paused():
            with _reader(self.engine) as conn:
                fetched = _state_rows(conn, environments)
            if sqlite:  # naive UTC text (models.UTCDateTime)
                return service_states_from_text(fetched)
            # Unpacked by name (the order is checked at import, _STATE_FIELDS); `x and
            # f(x)` keeps None: a time is None or a non-empty datetime.
            states: dict[tuple[str, str], ServiceState] = {}
            for e, s, dv, dd, li, ls, lv, ended, ri, sv, sc, sa in fetched:
                ended = ended and ended.astimezone(UTC)
                sa = sa and sa.astimezone(UTC)
                states[e, s] = new(make, (e, s, dv, dd, li, ls, lv, ended, ri, sv, sc, sa))
        return states

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
            refresh_service_state(conn, environment, service)  # ensures the row exists
            conn.execute(
                update(_SS)
                .where(_SS.c.environment == environment, _SS.c.service == service)
                .values(streak_reset_id=marker)
            )
            refresh_service_state(conn, environment, service)

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
                fold = ServiceFold(reset_id=resets.get((environment, service)), track_running=True)
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
