"""The audit export's queries: every deployment, oldest first, a page at a time.

A mixin of `Store`. Pages are read by keyset on the id (``id > last ORDER BY id LIMIT
n``), each with its progress events, its sync's commit and the operator action that
caused it, so that memory stays flat however many deployments there are (`audit export`
streams a million of them). The whole export runs on one connection, in one read
transaction: SQLite (WAL) exports one snapshot; PostgreSQL reads committed rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, select

from reconciler.store import models, rows
from reconciler.store.records import DeploymentRecord, EventRecord, OperatorActionRecord

_aware = rows.aware
_chunks = rows.chunks
_deployment = rows.deployment_record
_event = rows.event_record

_D = models.deployments
_E = models.deployment_events
_OA = models.operator_actions
_S = models.syncs

#: Deployments per page: one query for them, one per 300 for their events.
PAGE = 500

#: The operator action that starts a deployment of each trigger (SPEC §7): `deploy`
#: starts `manual` ones, `rollback` a `rollback` (not an automatic one, which names the
#: failed deployment in `rollback_of`), and `retry` (`sync --env E --service S`) lets
#: the next `git` or `retry` deployment of the service start.
_ACTION_TRIGGERS: dict[str, tuple[str, ...]] = {
    "deploy": ("manual",),
    "rollback": ("rollback",),
    "retry": ("git", "retry"),
}


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One deployment as the audit export shows it (``deployment.progress`` loaded)."""

    deployment: DeploymentRecord
    commit_subject: str | None
    sync_seen_at: datetime | None
    operator_action: OperatorActionRecord | None


def _filters(environment: str | None, since: datetime | None) -> list[Any]:
    where: list[Any] = []
    if environment is not None:
        where.append(_D.c.environment == environment)
    if since is not None:
        where.append(_D.c.created_at >= _aware(since, "since"))
    return where


def _candidate_action() -> Any:
    """The latest operator action of the deployment's kind on its service before it was
    planned: the one that may have caused it (`_caused` tells whether it did)."""
    kind = case(
        (_D.c.trigger == "manual", "deploy"),
        (_D.c.trigger == "rollback", "rollback"),
        else_="retry",
    )
    latest = (
        select(func.max(_OA.c.id))
        .where(
            _OA.c.environment == _D.c.environment,
            _OA.c.service == _D.c.service,
            _OA.c.action == kind,
            _OA.c.at <= _D.c.created_at,
        )
        .scalar_subquery()
    )
    possible = and_(
        _D.c.rollback_of.is_(None), _D.c.trigger.in_(("manual", "rollback", "git", "retry"))
    )
    return case((possible, latest), else_=None).label("operator_action_id")


def _action_record(row: Any) -> OperatorActionRecord:
    return OperatorActionRecord(
        id=row.id,
        at=row.at,
        environment=row.environment,
        service=row.service,
        action=row.action,
        actor=row.actor,
        note=row.note,
        origin=row.origin,
    )


class _Actions:
    """Operator actions and the one deployment each caused (the first deployment of its
    kind planned on its service at or after it). Human-made, so few: kept once read."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._known: dict[int, tuple[OperatorActionRecord, int | None]] = {}

    def caused(self, action_id: int, deployment_id: int) -> OperatorActionRecord | None:
        if action_id not in self._known:
            row = self._conn.execute(select(_OA).where(_OA.c.id == action_id)).one()
            action = _action_record(row)
            first = self._conn.execute(
                select(func.min(_D.c.id)).where(
                    _D.c.environment == action.environment,
                    _D.c.service == action.service,
                    _D.c.created_at >= action.at,
                    _D.c.trigger.in_(_ACTION_TRIGGERS[action.action]),
                    _D.c.rollback_of.is_(None),
                )
            ).scalar()
            self._known[action_id] = (action, first)
        action, first = self._known[action_id]
        return action if first == deployment_id else None


class ExportQueries:
    """The audit export's reads (mixed into `Store`)."""

    engine: Engine

    def count_deployments(
        self, *, environment: str | None = None, since: datetime | None = None
    ) -> int:
        """How many deployments an export with these filters writes (at the time asked)."""
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(_D).where(*_filters(environment, since))
            return int(conn.execute(query).scalar_one())

    def export_deployments(
        self,
        *,
        environment: str | None = None,
        since: datetime | None = None,
        page: int = PAGE,
    ) -> Iterator[AuditRow]:
        """Every deployment (of ``environment``, planned at or after ``since``), oldest
        first, with its progress timeline, its commit's subject and the operator action
        that caused it, if any. Lazy: one page of rows in memory at a time."""
        where = _filters(environment, since)
        query = (
            select(_D, _S.c.commit_subject, _S.c.seen_at.label("sync_seen_at"), _candidate_action())
            .select_from(_D.outerjoin(_S, _S.c.id == _D.c.sync_id))
            .order_by(_D.c.id)
            .limit(page)
        )
        last = 0
        with self.engine.connect() as conn:
            actions = _Actions(conn)
            while True:
                batch = conn.execute(query.where(_D.c.id > last, *where)).all()
                if not batch:
                    return
                ids = [row.id for row in batch]
                events: dict[int, list[EventRecord]] = {i: [] for i in ids}
                for chunk in _chunks(ids):
                    for event in conn.execute(
                        select(_E)
                        .where(_E.c.deployment_id.in_(chunk))
                        .order_by(_E.c.deployment_id, _E.c.id)
                    ):
                        events[event.deployment_id].append(_event(event))
                for row in batch:
                    m = row._mapping
                    action_id = m["operator_action_id"]
                    yield AuditRow(
                        deployment=_deployment(row, events.pop(row.id)),
                        commit_subject=m["commit_subject"],
                        sync_seen_at=m["sync_seen_at"],
                        operator_action=(
                            actions.caused(action_id, row.id) if action_id is not None else None
                        ),
                    )
                last = ids[-1]
