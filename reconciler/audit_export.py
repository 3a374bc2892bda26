"""`reconciler audit export`: every deployment, oldest first, as JSON lines or CSV.

Rows are written as the store's pages arrive (`Store.export_deployments`), so memory
does not grow with the ledger. The fields are documented in docs/audit.md ("Export").
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, TextIO

from reconciler.store import Store
from reconciler.store.export import AuditRow
from reconciler.store.records import format_time

FORMATS = ("jsonl", "csv")

#: The export's fields, in order (JSON keys and CSV columns).
FIELDS = [
    "id",
    "environment",
    "service",
    "version",
    "previous_version",
    "status",
    "error_message",
    "trigger",
    "attempt",
    "commit",
    "commit_author",
    "commit_subject",
    "sync_id",
    "sync_seen_at",
    "operator_action",
    "rollback_of",
    "provider",
    "provider_type",
    "strategy",
    "params",
    "timeout_seconds",
    "validation",
    "created_at",
    "started_at",
    "completed_at",
    "duration_seconds",
    "progress",
]

#: Columns whose CSV cell is JSON (objects, lists).
JSON_COLUMNS = ("operator_action", "strategy", "params", "validation", "progress")


def export_record(row: AuditRow) -> dict[str, Any]:
    """One deployment as the export writes it."""
    d = row.deployment
    action = row.operator_action
    return {
        "id": d.id,
        "environment": d.environment,
        "service": d.service,
        "version": d.version,
        "previous_version": d.previous_version,
        "status": d.status,
        "error_message": d.error_message,
        "trigger": d.trigger,
        "attempt": d.attempt,
        "commit": d.commit,
        "commit_author": d.commit_author,
        "commit_subject": row.commit_subject,
        "sync_id": d.sync_id,
        "sync_seen_at": format_time(row.sync_seen_at),
        "operator_action": (
            None
            if action is None
            else {
                "id": action.id,
                "action": action.action,
                "actor": action.actor,
                "note": action.note,
                "origin": action.origin,
                "at": format_time(action.at),
            }
        ),
        "rollback_of": d.rollback_of,
        "provider": d.provider,
        "provider_type": d.provider_type,
        "strategy": d.strategy,
        "params": d.params,
        "timeout_seconds": d.timeout_seconds,
        "validation": d.validation,
        "created_at": format_time(d.created_at),
        "started_at": format_time(d.started_at),
        "completed_at": format_time(d.completed_at),
        "duration_seconds": d.duration_seconds,
        "progress": [event.to_json() for event in d.progress or []],
    }


def _jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> Iterator[None]:
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for record in records:
        out.write(dumps(record) + "\n")
        yield None


def _csv(records: Iterable[dict[str, Any]], out: TextIO) -> Iterator[None]:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode
    for record in records:
        for name in JSON_COLUMNS:
            value = record[name]
            record[name] = "" if value is None else dumps(value)
        writer.writerow(["" if record[k] is None else record[k] for k in FIELDS])
        yield None


Progress = Callable[[int, bool], None]


def export(
    store: Store,
    out: TextIO,
    *,
    fmt: str,
    environment: str | None = None,
    since: datetime | None = None,
    progress: Progress | None = None,
    every: float = 0.5,
) -> int:
    """Write the export to ``out``; the number of deployments written. ``progress(rows,
    done)`` is called at most every ``every`` seconds, and once at the end."""
    rows = store.export_deployments(environment=environment, since=since)
    records = (export_record(row) for row in rows)
    steps = _jsonl(records, out) if fmt == "jsonl" else _csv(records, out)
    written = 0
    shown = time.monotonic()
    for _ in steps:
        written += 1
        if progress is not None and time.monotonic() - shown >= every:
            shown = time.monotonic()
            progress(written, False)
    if progress is not None:
        progress(written, True)
    return written
