"""The daemon's whole-fleet status, re-planned only where something changed.

Planning 20,000 services costs ~150 ms of CPU; a status request between two deployments
changes nothing. The decisions of each environment are kept with what they were planned
from: the desired-state snapshot and plan settings (replaced, never mutated: compared by
identity), the drift monitor's reading count, and the fleet summary's change count of the
environment and of those it depends on (a deployment event, a retry, a suspension marks
its environment). An environment whose decisions depend on the clock (a `not_before`:
retry countdowns, windows) or that a sync would deploy now (a window may close before it
does) is planned afresh at every request. The answer equals a fresh plan's, order included
(tests/test_fleet_status.py checks it after random operations).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reconciler.fleet import FleetSummary
from reconciler.plan import Decision
from reconciler.planning import Desired, Planner


@dataclass(frozen=True)
class _Planned:
    changes: tuple[int, ...]  # the fleet's change counts of the environment and its deps
    decisions: list[Decision]


class FleetStatus:
    """`Planner.decide_now` for the whole fleet, kept per environment between requests."""

    def __init__(
        self, planner: Planner, fleet: FleetSummary, drift_readings: Callable[[], int]
    ) -> None:
        self.planner = planner
        self.fleet = fleet
        self.drift_readings = drift_readings
        self._basis: tuple[Any, ...] | None = None
        self._kept: dict[str, _Planned] = {}
        #: Environments planned so far (for tests and the bench: what was not kept).
        self.planned = 0
        self._lock = threading.Lock()  # requests come on worker threads

    def decisions(self, snapshot: Desired, now: datetime) -> list[Decision]:
        """Blocking (it may read the store): every service's decision, as a fresh plan."""
        with self._lock:
            return self._decisions(snapshot, now)

    def _decisions(self, snapshot: Desired, now: datetime) -> list[Decision]:
        basis = (snapshot, self.planner.settings, self.drift_readings(), self.fleet.generation)
        old_basis = self._basis
        if (
            old_basis is None
            or basis[0] is not old_basis[0]  # the snapshot and the settings: by identity
            or basis[1] is not old_basis[1]
            or basis[2:] != old_basis[2:]
        ):
            self._kept = {}
        self._basis = basis
        effective = snapshot.effective
        changes = self.fleet.changes()  # before the plan reads: a later mark re-plans
        kept: dict[str, _Planned] = {}
        stale: list[str] = []
        for env, spec in effective.items():
            count = (changes.get(env, 0), *(changes.get(d, 0) for d in spec.depends_on))
            old = self._kept.get(env)
            if old is not None and old.changes == count:
                kept[env] = old
            else:
                kept[env] = _Planned(count, [])
                stale.append(env)
        orphans = [env for env in snapshot.invalid if env not in effective]  # never valid
        fresh = self.planner.decide_now(snapshot, stale + orphans, now) if stale or orphans else []
        self.planned += len(stale)
        first: list[Decision] = []
        for decision in fresh:
            planned = kept.get(decision.environment)
            if planned is None:
                first.append(decision)  # an environment whose file never parsed
            else:
                planned.decisions.append(decision)
        out = first
        self._kept = {}
        for env, planned in kept.items():
            out.extend(planned.decisions)
            if all(d.not_before is None and not d.deploy for d in planned.decisions):
                self._kept[env] = planned  # nothing in it changes with the clock alone
        return out
