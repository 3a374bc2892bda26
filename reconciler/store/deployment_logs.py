"""The run log queries: captured output lines of a deployment's run (`deployment_logs`).

A mixin of `Store`. Pages and tails are read in bounded memory, each line cut on read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, func, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from reconciler.store import fence, models, rows
from reconciler.store.records import LOG_STREAMS, LogLine, StoreError

# Shared with the other query modules (rows.py), under the names the queries use.
_aware = rows.aware
_check = rows.check

_L = models.deployment_logs


class LogQueries:
    """Run log queries (mixed into `Store`)."""

    engine: Engine
    _writer: Engine

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
            fence.check(conn)
            try:
                conn.execute(insert(_L), rows)
            except IntegrityError as exc:
                raise StoreError(f"no deployment {deployment_id}") from exc

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
