"""The sync queries: one row per sync (fetch, load, record), begun and finished.

A mixin of `Store`. A sync that applied (result ok, errors or unchanged) names the commit
the recorded desired state came from (`last_synced_commit`, `applied_commit`).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, insert, select, update

from reconciler.store import chain, models, rows
from reconciler.store.records import (
    SYNC_APPLIED_RESULTS,
    SYNC_RESULTS,
    SYNC_TRIGGERS,
    CommitMeta,
    StoreError,
    SyncRecord,
)

# Shared with the other query modules (rows.py), under the names the queries use.
_aware = rows.aware
_check = rows.check
_one_line = rows.one_line_or_none
_sync = rows.sync_record

_S = models.syncs

#: The latest sync that applied a commit (`applied_sync`).
APPLIED_SYNC = (
    select(_S)
    .where(_S.c.result.in_(SYNC_APPLIED_RESULTS), _S.c.commit_sha.is_not(None))
    .order_by(_S.c.id.desc())
    .limit(1)
)
#: The latest sync that applied or was refused (`refusal_in_force`: refused, in force).
LAST_APPLIED_OR_REFUSED = (
    select(_S)
    .where(_S.c.result.in_((*SYNC_APPLIED_RESULTS, "refused")))
    .order_by(_S.c.id.desc())
    .limit(1)
)
#: The commit subjects of the syncs ``:ids`` (expanding).
COMMIT_SUBJECTS = select(_S.c.id, _S.c.commit_subject).where(
    _S.c.id.in_(bindparam("ids", expanding=True)), _S.c.commit_subject.is_not(None)
)


class SyncQueries:
    """Sync queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def begin_sync(
        self,
        *,
        trigger: str,
        seen_at: datetime,
        commit: CommitMeta | None,
        signer: str | None = None,
    ) -> int:
        _check(trigger, SYNC_TRIGGERS, "sync trigger")
        values: dict[str, Any] = {
            "trigger": trigger,
            "seen_at": _aware(seen_at, "seen_at"),
            "full_load": False,
            "environments_changed": [],
            "errors": [],
            "signer": _one_line(signer),
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
            chain.record_sync(conn, sync_id)

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

    def refusal_in_force(self) -> SyncRecord | None:
        """The latest refused sync when no sync applied a commit since (the head is still
        refused, as far as the ledger knows): what `status` says beside the applied state."""
        with self.engine.connect() as conn:
            row = conn.execute(LAST_APPLIED_OR_REFUSED).first()
        if row is None or row._mapping["result"] != "refused":
            return None
        return _sync(row)

    def list_syncs(self, limit: int = 20) -> list[SyncRecord]:
        """The latest syncs, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(_S).order_by(_S.c.id.desc()).limit(limit)).all()
            return [_sync(row) for row in rows]

    def applied_commit(self) -> CommitMeta | None:
        """The commit of the latest sync that applied, as that sync recorded it."""
        sync = self.applied_sync()
        if sync is None or sync.commit_sha is None:
            return None
        return CommitMeta(
            sha=sync.commit_sha,
            author=sync.commit_author,
            time=sync.commit_time,
            subject=sync.commit_subject,
        )

    def applied_sync(self) -> SyncRecord | None:
        """The latest sync that applied a commit (the one `environment_states` were saved
        by, with the file errors it found)."""
        with self.engine.connect() as conn:
            row = conn.execute(APPLIED_SYNC).first()
        return None if row is None else _sync(row)

    def commit_subjects(self, sync_ids: Collection[int]) -> dict[int, str]:
        """The subject of the commit each sync read (what `history` and `show` print beside
        a deployment's commit), by sync id; syncs without one are left out."""
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for chunk in rows.chunks(sorted(set(sync_ids))):
                found = conn.execute(COMMIT_SUBJECTS, {"ids": list(chunk)}).all()
                out.update({int(i): str(subject) for i, subject in found})
        return out
