"""The words of the records: deployment statuses and triggers, sync triggers and results.

Apart from `records.py` (which re-exports them) so that a CLI option's choices
(`history --status`) cost this small module, not the records' dataclasses.
"""

from __future__ import annotations

from typing import Literal, get_args

Status = Literal[
    "pending",
    "validating",
    "in_progress",
    "completed",
    "failed",
    "rolled_back",
    "timed_out",
    "cancelled",
]
Trigger = Literal["git", "manual", "rollback", "retry", "drift"]

# The tuples come from the types, so the API schemas (reconciler.http.schemas) and the
# store's checks cannot disagree.
STATUSES: tuple[str, ...] = get_args(Status)
ACTIVE_STATUSES: frozenset[str] = frozenset({"pending", "validating", "in_progress"})
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"completed", "failed", "rolled_back", "timed_out", "cancelled"}
)
#: Terminal statuses that count as a failed attempt of a version (retry streak).
FAILURE_STATUSES: frozenset[str] = frozenset({"failed", "timed_out", "rolled_back"})
TRIGGERS: tuple[str, ...] = get_args(Trigger)

#: "notice": another replica announced a head this one had not applied (reconciler.bus).
SYNC_TRIGGERS: tuple[str, ...] = (
    "startup",
    "poll",
    "watch",
    "webhook",
    "manual",
    "reload",
    "notice",
)
SYNC_RESULTS: tuple[str, ...] = ("ok", "errors", "failed", "unchanged", "refused")
#: Sync results whose commit counts as applied (see `Store.last_synced_commit`).
SYNC_APPLIED_RESULTS: tuple[str, ...] = ("ok", "errors", "unchanged")

LOG_STREAMS: tuple[str, ...] = ("stdout", "stderr", "system")
#: "sync": a sync an operator forced (recorded for the audit ledger).
OPERATOR_ACTIONS: tuple[str, ...] = ("suspend", "resume", "retry", "deploy", "rollback", "sync")
