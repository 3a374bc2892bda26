"""The queries behind `reconciler blame`: when a commit was first synced, and which
deployment of a version followed.

A mixin of `Store`.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Engine, select

from reconciler.store import models, rows
from reconciler.store.records import SYNC_APPLIED_RESULTS, DeploymentRecord, SyncRecord

_D = models.deployments
_S = models.syncs


class BlameQueries:
    """Blame's reads (mixed into `Store`)."""

    engine: Engine

    def first_sync_of(self, commits: Collection[str]) -> SyncRecord | None:
        """The oldest sync that applied one of ``commits`` (ok, errors or unchanged)."""
        found: SyncRecord | None = None
        with self.engine.connect() as conn:
            for chunk in rows.chunks(sorted(set(commits))):
                row = conn.execute(
                    select(_S)
                    .where(_S.c.commit_sha.in_(chunk), _S.c.result.in_(SYNC_APPLIED_RESULTS))
                    .order_by(_S.c.id)
                    .limit(1)
                ).first()
                if row is not None and (found is None or row.id < found.id):
                    found = rows.sync_record(row)
        return found

    def version_deployments(
        self, environment: str, service: str, version: str, *, since: datetime | None
    ) -> tuple[DeploymentRecord | None, DeploymentRecord | None]:
        """Of the deployments of ``version`` to the service planned at or after
        ``since``: the first that completed, and the latest (None, None if there is none)."""
        query = select(_D).where(
            _D.c.environment == environment, _D.c.service == service, _D.c.version == version
        )
        if since is not None:
            query = query.where(_D.c.created_at >= rows.aware(since, "since"))
        with self.engine.connect() as conn:
            completed = conn.execute(
                query.where(_D.c.status == "completed").order_by(_D.c.id).limit(1)
            ).first()
            latest = conn.execute(query.order_by(_D.c.id.desc()).limit(1)).first()
        return (
            rows.deployment_record(completed) if completed is not None else None,
            rows.deployment_record(latest) if latest is not None else None,
        )
