"""`reconciler status` from the database alone, when the database holds all it needs.

Each sync saves the environments' effective desired state (`environment_state`). After a
sync that found no broken file, those rows are what the engine would read back from git
at that commit, so the status is planned from them by the daemon's own `Planner`: no
git, no providers, no engine, which were most of the command's start-up. After a sync with
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
from reconciler.planning import Planner, plan_settings

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
    sync found broken files (then only the engine can show them as `invalid`)."""
    sync = store.applied_sync()
    if sync is not None and sync.errors:
        return None
    saved = store.environment_states() if sync is not None else {}
    refused = store.refusal_in_force()  # as the engine's `load_at_last_sync` reads it
    desired = SavedDesired(
        {name: EnvironmentSpec.model_validate(state.spec) for name, state in saved.items()},
        refusal=refused.error_message if refused is not None and refused.error_message else None,
    )
    commit = sync.commit_sha if sync is not None else None
    if environment is not None and environment not in saved:
        return Status(commit, frozenset(saved), [], desired.refusal)  # named unknown by caller
    when = now or datetime.now(UTC)
    planner = Planner(store, plan_settings(config), lambda: when)
    envs = None if environment is None else [environment]
    decisions = planner.decide_now(desired, envs, when)
    return Status(commit, frozenset(saved), decisions, desired.refusal)
