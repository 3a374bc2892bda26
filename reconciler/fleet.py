"""The daemon's fleet summary: every service's recorded state (`ServiceState`), in memory.

A whole-fleet status (GET /api/v1/status, the dashboard, the control channel) plans every
service from its `service_state` row; reading 20,000 of them from the store on each
request costs more than the rest of the answer. The daemon keeps them: read once, and
every deployment event it publishes marks its environment stale; a read first re-reads
the stale environments (one indexed query for all of them). Re-reading rather than
folding the events in memory keeps one definition of the rules (the store's
`ServiceFold`): the summary equals the store's answer by construction, and costs only
the environments that changed since the last read.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

from reconciler.executor import DeploymentEvent
from reconciler.store import ServiceState, Store

StateMap = dict[tuple[str, str], ServiceState]


class FleetSummary:
    """`Store.service_states`, answered from memory; `mark` what changed underneath."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Marks come from the event loop and must never wait on a read: `_marks` guards
        # only the marks; `_reading` lets one reader at a time (worker threads) refresh.
        self._marks = threading.Lock()
        self._reading = threading.Lock()
        self._states: StateMap = {}
        self._keys: dict[str, list[tuple[str, str]]] = {}  # the keys of each environment
        self._everything = True  # read the whole fleet at the next read
        self._stale: set[str] = set()
        #: Store reads so far (whole fleet, stale environments): for tests and metrics.
        self.reads = {"full": 0, "stale": 0}
        #: Change counts (`FleetStatus` keeps the decisions of unchanged environments):
        #: `generation` counts `mark_all`, `_changes` each environment's marks.
        self.generation = 0
        self._changes: dict[str, int] = {}
        self._count = 0

    def mark(self, environment: str) -> None:
        """This environment's rows changed in the store (after the change committed)."""
        with self._marks:
            self._stale.add(environment)
            self._count += 1
            self._changes[environment] = self._count

    def mark_all(self) -> None:
        """Anything may have changed (recovery, a repair): read everything next time."""
        with self._marks:
            self._everything = True
            self.generation += 1

    def changes(self) -> dict[str, int]:
        """Each environment's latest change (0: none since the daemon started)."""
        with self._marks:
            return dict(self._changes)

    def on_event(self, event: object) -> None:
        """An `EventHub` callback: a deployment event marks its environment."""
        if isinstance(event, DeploymentEvent):
            self.mark(event.environment)

    def service_states(self, environments: Collection[str] | None = None) -> StateMap:
        """Blocking (it may read the store): the same answer as `Store.service_states`."""
        with self._reading:
            with self._marks:  # what changed up to now; later marks wait for the next read
                everything, self._everything = self._everything, False
                stale, self._stale = self._stale, set()
            try:
                if everything:
                    self._states = self.store.service_states()
                    self._keys = {}
                    for key in self._states:
                        self._keys.setdefault(key[0], []).append(key)
                    self.reads["full"] += 1
                elif stale:
                    fresh = self.store.service_states(stale)
                    states, keys = self._states, self._keys
                    for environment in stale:
                        for key in keys.pop(environment, ()):
                            del states[key]
                    for key in fresh:
                        keys.setdefault(key[0], []).append(key)
                    states.update(fresh)
                    self.reads["stale"] += 1
            except BaseException:  # the database failed: nothing is known fresh any more
                self.mark_all()
                raise
            if environments is None:
                return dict(self._states)
            states = self._states
            return {
                key: states[key] for env in set(environments) for key in self._keys.get(env, ())
            }
