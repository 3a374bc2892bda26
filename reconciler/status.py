"""`reconciler status` from the database alone, when the database holds all it needs.

Each sync saves the environments' effective desired state (`environment_state`). After a
sync that found no broken file, those rows are what the engine would read back from git
at that commit, so the status is planned from them by the daemon's own `Planner`: no
git, no providers, no engine, which were most of the command's start-up. The decisions
stored with what they were planned from are served where they still hold, and only the
other environments planned (`reconciler.stored_status`). After a sync with
file errors, the broken environments' rows come from the files themselves: `saved_status`
answers None and the caller asks the engine (`operations.decisions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from desired_state import EnvironmentSpec
from reconciler.plan import Decision
from reconciler.planning import plan_settings
from reconciler.stored_status import serve

if TYPE_CHECKING:
    from reconciler.config import Config
    from reconciler.store import Store
    from reconciler.store.sqlite_read import SQLiteReader


@dataclass(frozen=True)
class SavedDesired:
    """The desired state of the last applied sync, as the store saved it (no broken file)."""

    effective: Mapping[str, EnvironmentSpec]
    invalid: Mapping[str, str] = field(default_factory=dict)
    refusal: str | None = None  # the ledger's refusal of the head still in force


@dataclass(frozen=True)
class Status:
    commit: str | None  # the last applied commit; None before the first sync
    environments: frozenset[str]  # every environment it declared
    decisions: list[Decision]
    refusal: str | None  # why the branch head is not applied, while it is refused


def saved_status(
    config: Config,
    store: Store | SQLiteReader,
    environment: str | None,
    now: datetime | None = None,
) -> Status | None:
    """The status of every service (or `environment`'s), or None when the last applied
    sync found broken files (then only the engine can show them as `invalid`).

    Served from the decisions stored with what they were planned from, planning only the
    environments whose stored ones no longer hold (`reconciler.stored_status`)."""
    sync = store.applied_sync()
    if sync is not None and sync.errors:
        return None
    names = store.environment_names() if sync is not None else []
    refused = store.refusal_in_force()  # as the engine's `load_at_last_sync` reads it
    refusal = refused.error_message if refused is not None and refused.error_message else None
    commit = sync.commit_sha if sync is not None else None
    if environment is not None and environment not in names:
        return Status(commit, frozenset(names), [], refusal)  # named unknown by caller
    when = now or datetime.now(UTC)
    envs = names if environment is None else [environment]
    decisions = serve(store, plan_settings(config), when, envs, refusal)
    return Status(commit, frozenset(names), decisions, refusal)
