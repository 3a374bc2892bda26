"""Decisions stored with what they were planned from, so that a standalone `status` of
20,000 services need not plan them all again (~30 us each in Python).

Whoever plans with the database at hand (a standalone `sync` or `deploy` at its end, the
daemon a moment after a sync or a deployment) stores each environment's decisions in
`environment_decisions` with

* a **basis**: the plan settings and the change counts (`environment_changes`, raised by
  database triggers whenever a row the planner reads changes: service states, live
  versions, suspension, the saved spec) of the environment and of those it depends on,
  read *before* the planner's own reads: a change in between leaves the stored basis older
  than the decisions, so they are planned again, never served stale;
* a **valid until**: the next edge of any of its deploy windows (an opening, the end of
  the one open now, a local midnight that changes how "window opens ..." is written). An
  environment with a retry countdown in a message (it changes every second) is not stored.

`status` serves a stored environment whose basis still matches and whose valid-until has
not passed, and plans the others (stale, expired, missing) as `Planner.decide_now` would:
its answer is a fresh plan's, order included (tests/test_stored_status.py checks it after
random operations). The decisions are stored without the refusal of the branch head,
which is added when served. Serving writes nothing (the sqlite3 reader is read-only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

from desired_state import EnvironmentSpec
from reconciler.plan import Decision, PlanSettings
from reconciler.planning import Ledger, Planner, with_refusal

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from reconciler.store.records import EnvironmentStateRecord, StoredDecisions

#: Raised when the stored form or what a basis covers changes: older rows are then stale.
FORMAT = 1


class DecisionLedger(Ledger, Protocol):
    """The reads serving needs beyond planning's: the `Store`'s or the sqlite3 reader's."""

    def reading(self) -> AbstractContextManager[None]: ...

    def environment_names(self) -> list[str]: ...

    def environment_changes(self) -> dict[str, int]: ...

    def stored_decisions(self) -> dict[str, StoredDecisions]: ...

    def environment_states_of(
        self, names: Collection[str]
    ) -> dict[str, EnvironmentStateRecord]: ...


def settings_key(settings: PlanSettings) -> str:
    tz = settings.timezone
    zone = tz.key if isinstance(tz, ZoneInfo) else repr(tz)
    return f"v{FORMAT};{settings.retries};{settings.retry_backoff!r};{zone}"


def basis(key: str, env: str, depends_on: Iterable[str], changes: Mapping[str, int]) -> str:
    """``key`` then ``name=count`` for the environment and each it depends on."""
    names = [env, *depends_on]
    return key + "\n" + ";".join(f"{n}={changes.get(n, 0)}" for n in names)


def holds(stored: str, key: str, changes: Mapping[str, int]) -> bool:
    """Whether a stored basis is still what planning would read now."""
    head, _, counts = stored.partition("\n")
    if head != key:
        return False
    for item in counts.split(";"):
        name, _, count = item.rpartition("=")
        if changes.get(name, 0) != int(count):
            return False
    return True


def _midnight_after(now: datetime, tz: tzinfo) -> datetime:
    local = now.astimezone(tz)
    day = datetime(local.year, local.month, local.day, tzinfo=tz) + timedelta(days=1)
    return day.astimezone(UTC)


def valid_until(
    spec: EnvironmentSpec, decisions: list[Decision], now: datetime, settings: PlanSettings
) -> tuple[bool, datetime | None]:
    """(storable, until when): not storable when a message counts down to a retry; until
    the first edge of a window (conservatively: the earliest opening, end or midnight);
    None when nothing in the decisions changes with the clock alone."""
    if any(d.not_before is not None and d.state != "waiting" for d in decisions):
        return False, None
    if not spec.windows:
        return True, None
    from croniter import croniter

    edges: list[datetime] = [_midnight_after(now, settings.timezone)]
    for w in spec.windows:
        tz = ZoneInfo(w.timezone) if w.timezone else settings.timezone
        local_now = now.astimezone(tz)
        edges.append(croniter(w.cron, local_now).get_next(datetime))
        start = croniter(w.cron, local_now - timedelta(seconds=w.duration)).get_next(datetime)
        if start <= local_now:
            edges.append(start + timedelta(seconds=w.duration))
        edges.append(_midnight_after(now, tz))
    return True, min(e.astimezone(UTC) for e in edges)


# ---- the stored form: column lists, each distinct verdict once


def encode(decisions: list[Decision]) -> str:
    kinds: dict[tuple[Any, ...], int] = {}
    index: list[int] = []
    for d in decisions:
        nb = d.not_before.astimezone(UTC).isoformat() if d.not_before is not None else None
        kind = (d.state, d.message, d.deploy, d.trigger, d.attempt, nb)
        index.append(kinds.setdefault(kind, len(kinds)))
    desired = [d.desired for d in decisions]
    deployed = [d.deployed for d in decisions]
    return json.dumps(
        [
            [d.service for d in decisions],
            desired,
            1 if deployed == desired else deployed,  # in sync: said once
            [d.last_deployment_id for d in decisions],
            index if len(kinds) > 1 else 0,  # one verdict for all: its number
            list(kinds),
        ],
        separators=(",", ":"),
    )


#: Decision from an 11-tuple, in C (`Decision(*row)` costs a Python call per decision).
_MAKE: Callable[[tuple[Any, ...]], Decision] = partial(tuple.__new__, Decision)


def decode(env: str, text: str) -> list[Decision]:
    services, desired, deployed, ids, index, raw = json.loads(text)
    if deployed == 1:
        deployed = desired
    n = len(services)
    if not n:
        return []
    kinds = [
        (s, m, dep, t, a, None if nb is None else datetime.fromisoformat(nb))
        for s, m, dep, t, a, nb in raw
    ]
    if isinstance(index, int):  # one verdict for every service: each field repeated
        columns: list[Iterable[Any]] = [repeat(value, n) for value in kinds[index]]
    else:
        columns = list(zip(*(kinds[k] for k in index), strict=True))
    rows = zip(repeat(env, n), services, desired, deployed, *columns, ids, strict=False)
    return list(map(_MAKE, rows))


# ---- planning the stale ones


class _Specs:
    """The `Desired` planning reads: the saved specs of the environments planned again
    and of those they depend on."""

    def __init__(self, effective: Mapping[str, EnvironmentSpec]) -> None:
        self.effective = effective
        self.invalid: Mapping[str, str] = {}
        self.refusal: str | None = None


def _parsed(store: DecisionLedger, names: Collection[str]) -> dict[str, EnvironmentSpec]:
    specs = {
        n: EnvironmentSpec.model_validate(s.spec)
        for n, s in store.environment_states_of(names).items()
    }
    deps = {d for s in specs.values() for d in s.depends_on} - specs.keys()
    if deps:
        specs.update(
            (n, EnvironmentSpec.model_validate(s.spec))
            for n, s in store.environment_states_of(deps).items()
        )
    return dict(sorted(specs.items()))


def plan_fresh(
    store: DecisionLedger, settings: PlanSettings, now: datetime, environments: list[str]
) -> tuple[dict[str, list[Decision]], dict[str, EnvironmentSpec]]:
    """Each environment's decisions, planned now from the saved specs (no refusal)."""
    if not environments:
        return {}, {}
    specs = _parsed(store, environments)
    planner = Planner(store, settings, lambda: now)
    wanted = [e for e in environments if e in specs]
    out: dict[str, list[Decision]] = {e: [] for e in wanted}
    for decision in planner.decide_now(_Specs(specs), wanted, now):
        out[decision.environment].append(decision)
    return out, specs


def _current(
    stored: StoredDecisions | None, key: str, changes: Mapping[str, int], now: datetime
) -> bool:
    return (
        stored is not None
        and (stored.valid_until is None or now < stored.valid_until)
        and holds(stored.basis, key, changes)
    )


def serve(
    store: DecisionLedger,
    settings: PlanSettings,
    now: datetime,
    environments: list[str],
    refusal: str | None,
    on_planned: Callable[[int], None] | None = None,
) -> list[Decision]:
    """The decisions of ``environments`` (saved ones, in order) as a fresh plan's: stored
    where they still hold, planned for the others."""
    with store.reading():
        changes = store.environment_changes()
        stored = store.stored_decisions()
    key = settings_key(settings)
    stale = [e for e in environments if not _current(stored.get(e), key, changes, now)]
    fresh, _ = plan_fresh(store, settings, now, stale)
    if on_planned is not None:
        on_planned(len(stale))
    out: list[Decision] = []
    for env in environments:
        found = fresh.get(env)
        if found is None:
            row = stored.get(env)
            found = decode(env, row.decisions) if env not in stale and row is not None else []
        out.extend(found)
    if refusal is not None:
        out = [with_refusal(d, refusal) for d in out]
    return out


class DecisionWriter(DecisionLedger, Protocol):
    def save_decisions(
        self, stored: Iterable[StoredDecisions], *, at: datetime, forget: Collection[str] = ()
    ) -> None: ...


def refresh(store: DecisionWriter, settings: PlanSettings, now: datetime) -> int:
    """Plan and store the environments whose stored decisions no longer hold; drop those
    of environments no longer saved. Returns how many were planned."""
    from reconciler.store.records import StoredDecisions

    with store.reading():  # before the planner's reads: see the module's docstring
        changes = store.environment_changes()
        names = store.environment_names()
        stored = store.stored_decisions()
    key = settings_key(settings)
    stale = [e for e in names if not _current(stored.get(e), key, changes, now)]
    fresh, specs = plan_fresh(store, settings, now, stale)
    rows = []
    for env, decisions in fresh.items():
        spec = specs[env]
        storable, until = valid_until(spec, decisions, now, settings)
        if storable:
            rows.append(
                StoredDecisions(
                    env, basis(key, env, spec.depends_on, changes), until, encode(decisions)
                )
            )
    store.save_decisions(rows, at=now, forget=stored.keys() - set(names))
    return len(stale)
