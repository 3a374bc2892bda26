"""The audit ledger's queries: its head, and retention (pruning old runs' detail).

A mixin of `Store`. Entries are appended by the queries that record the facts
(`chain.py`); this module reads the head and prunes. Pruning deletes the progress events
and log lines of terminal deployments that ended before a cut-off — the deployment rows
stay — and appends a checkpoint entry per batch recording what went (ids, counts and
digests), so `verify` still matches every deployment against its entry afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, exists, select

from reconciler.store import chain, rows
from reconciler.store.records import TERMINAL_STATUSES

_D, _E, _L = chain.D, chain.E, chain.L
_TERMINAL = tuple(sorted(TERMINAL_STATUSES))
_GENESIS = select(chain.A.c.hash).where(chain.A.c.seq == 1)


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What one `prune_history` call removed."""

    deployments: int = 0
    events: int = 0
    log_lines: int = 0
    checkpoints: int = 0


class LedgerQueries:
    """Audit ledger queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

    def head(self) -> chain.Head | None:
        """The newest ledger entry (seq, hash, at): one index look-up."""
        with self.engine.connect() as conn:
            return chain.head(conn)

    def ledger_id(self) -> str:
        """What tells this database from another on the same host: its ledger's genesis
        hash (cut to 32 hex digits), carried by a run's processes (`MARKER_LEDGER`) beside
        the deployment id, which repeats across databases. A chain not begun yet (an
        offline-migrated database) gets its genesis entry here, as its first append would.
        A copy of the database (a restored backup) has the same identity."""
        with self.engine.connect() as conn:
            genesis = conn.execute(_GENESIS).scalar()
        if genesis is None:
            with self._writer.begin() as conn:
                genesis = chain.begin(conn)
        return str(genesis)[:32]

    def prune_history(self, before: datetime, *, batch: int = 500) -> PruneReport:
        """Delete the progress events and logs of terminal deployments that ended before
        ``before``, ``batch`` deployments per transaction, each batch checkpointed."""
        rows.aware(before, "before")
        has_detail = exists().where(_E.c.deployment_id == _D.c.id) | exists().where(
            _L.c.deployment_id == _D.c.id
        )
        candidates = (
            select(_D.c.id)
            .where(
                _D.c.created_at < before,  # an index range; ended implies created before
                _D.c.completed_at < before,
                _D.c.status.in_(_TERMINAL),
                has_detail,
            )
            .order_by(_D.c.id)
            .limit(batch)
        )
        deployments = events = lines = checkpoints = 0
        while True:
            with self._writer.begin() as conn:
                chain.lock(conn)
                ids = list(conn.execute(candidates).scalars())
                if not ids:
                    break
                pruned = []
                for deployment_id in ids:
                    ev = chain.digest_of(conn, _E, chain.EVENT_COLUMNS, deployment_id)
                    log = chain.digest_of(conn, _L, chain.LOG_COLUMNS, deployment_id)
                    pruned.append([deployment_id, ev.pair(), log.pair()])
                    events += ev.count
                    lines += log.count
                for chunk in rows.chunks(ids):
                    conn.execute(delete(_E).where(_E.c.deployment_id.in_(chunk)))
                    conn.execute(delete(_L).where(_L.c.deployment_id.in_(chunk)))
                payload = {
                    "before": chain.iso(before),
                    "first": ids[0],
                    "last": ids[-1],
                    "events": sum(p[1][0] for p in pruned),
                    "log": sum(p[2][0] for p in pruned),
                    "deployments": pruned,
                }
                chain.append(conn, "checkpoint", None, chain.canonical(payload))
                deployments += len(ids)
                checkpoints += 1
        return PruneReport(deployments, events, lines, checkpoints)
