"""A snapshot of the desired state + the ledger → decisions, in one trip off the event loop.

Reading the recorded state is a few queries and planning a large fleet takes seconds of
pure Python (20,000 services with windows): both run in a worker thread, so the loop
keeps serving deployments, HTTP and the watchdog meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from desired_state import EnvironmentSpec
from reconciler.plan import (
    Decision,
    LiveVersion,
    PlanSettings,
    RecordedState,
    ServiceRecord,
    dependency_triples,
    plan,
)
from reconciler.store.records import LiveObservation, ServiceState

if TYPE_CHECKING:  # not imported at run time: `status` plans without SQLAlchemy
    from reconciler.config import Config


class Ledger(Protocol):
    """The reads planning makes: the `Store`'s, or the plain sqlite3 reader's
    (`store.sqlite_read`, what a standalone `status` reads through)."""

    def reading(self) -> AbstractContextManager[None]: ...

    def service_states(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], ServiceState]: ...

    def completed_versions(
        self, triples: Collection[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]: ...

    def live_versions(
        self, environments: Collection[str] | None = None
    ) -> dict[tuple[str, str], LiveObservation]: ...

    def suspended_environments(self) -> set[str]: ...


class Desired(Protocol):
    """What planning reads of a desired state: a sync's `Snapshot`, or the environment
    states saved in the store (`reconciler.status`)."""

    @property
    def effective(self) -> Mapping[str, EnvironmentSpec]: ...

    @property
    def invalid(self) -> Mapping[str, str]: ...

    @property
    def refusal(self) -> str | None: ...  # the head is refused: why (planned from the applied)


def host_timezone() -> tzinfo:
    tz = datetime.now().astimezone().tzinfo
    return tz if tz is not None else UTC


def plan_settings(config: Config) -> PlanSettings:
    tz = ZoneInfo(config.daemon.timezone) if config.daemon.timezone else host_timezone()
    d = config.daemon
    return PlanSettings(retries=d.retries, retry_backoff=d.retry_backoff, timezone=tz)


#: Reads the service-state rows: `Store.service_states`, or the daemon's in-memory
#: `FleetSummary.service_states` (same answer).
StatesReader = Callable[[Collection[str] | None], dict[tuple[str, str], ServiceState]]


def recorded_state(
    store: Ledger,
    effective: Mapping[str, EnvironmentSpec],
    environments: Iterable[str] | None,
    states_reader: StatesReader | None = None,
) -> RecordedState:
    """What the ledger says about these environments (and those they depend on)."""
    envs = None if environments is None else set(environments)
    specs = effective if envs is None else {e: s for e, s in effective.items() if e in envs}
    deps = {d for s in specs.values() for d in s.depends_on}
    read = states_reader or store.service_states
    states = read(None if envs is None else envs | deps)
    services = {  # positional: ~2x cheaper than by keyword, 20,000 times
        key: ServiceRecord(
            st.deployed_version,
            st.running_deployment_id is not None,
            st.last_status,
            st.last_version,
            st.last_deployment_id,
            st.streak_version,
            st.streak_count,
            st.streak_last_at,
        )
        for key, st in states.items()
    }
    # A dependency deployed at the version asked for has completed it (`deployed_*` is
    # the latest completed deployment): only the others are asked of the ledger.
    triples = dependency_triples(specs)
    known = {t for t in triples if (st := states.get((t[0], t[1]))) and st.deployed_version == t[2]}
    completed = known | (store.completed_versions(triples - known) if triples - known else set())
    live = {
        key: LiveVersion(obs.version, obs.deployment_id)
        for key, obs in store.live_versions(envs).items()
        if obs.version is not None
    }
    return RecordedState(
        services=services,
        operator_suspended=frozenset(store.suspended_environments()),
        completed=frozenset(completed),
        live=live,
    )


def with_refusal(decision: Decision, refusal: str) -> Decision:
    """The decision, its message saying that the head is refused and why (the desired
    state it was planned from is the last applied one)."""
    message = f"{decision.message}; {refusal}" if decision.message else refusal
    return decision._replace(message=message)


class Planner:
    """Decisions for a snapshot, as of the clock's now."""

    def __init__(
        self, store: Ledger, settings: PlanSettings, clock: Callable[[], datetime]
    ) -> None:
        self.store = store
        #: Where the service-state rows come from (the daemon points it at its summary).
        self.states_reader: StatesReader = store.service_states
        self.settings = settings  # replaced on reload
        self.clock = clock

    def recorded(
        self, snapshot: Desired, environments: Iterable[str] | None = None
    ) -> RecordedState:
        with self.store.reading():  # its few reads on one connection, one view
            return recorded_state(self.store, snapshot.effective, environments, self.states_reader)

    def plan(
        self,
        snapshot: Desired,
        environments: list[str] | None,
        recorded: RecordedState,
        now: datetime,
    ) -> list[Decision]:
        effective, invalid = snapshot.effective, snapshot.invalid
        envs = environments
        desired = effective if envs is None else {e: s for e, s in effective.items() if e in envs}
        wanted = invalid if envs is None else {e: m for e, m in invalid.items() if e in envs}
        declared = {e: s.services.keys() for e, s in effective.items()}
        decisions = plan(desired, recorded, now, self.settings, wanted, declared)
        if snapshot.refusal is not None:
            decisions = [with_refusal(d, snapshot.refusal) for d in decisions]
        return decisions

    async def decide(
        self, snapshot: Desired, environments: Iterable[str] | None = None
    ) -> list[Decision]:
        envs = None if environments is None else list(environments)
        import asyncio  # here: a standalone `status` plans without an event loop (~25 ms)

        return await asyncio.to_thread(self.decide_now, snapshot, envs, self.clock())

    def decide_now(
        self, snapshot: Desired, environments: list[str] | None, now: datetime
    ) -> list[Decision]:
        """Blocking: read the ledger and plan, in one trip to a worker thread."""
        return self.plan(snapshot, environments, self.recorded(snapshot, environments), now)
