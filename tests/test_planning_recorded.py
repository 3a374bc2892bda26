"""`recorded_state`'s dependency facts (issue 12): a dependency deployed at the version
asked for counts as completed without asking the ledger; the others are asked."""

from __future__ import annotations

from datetime import UTC, datetime

from reconciler.planning import recorded_state
from reconciler.store import Store
from tests.test_fleet_status import new_deployment
from tests.test_plan import env


def deploy(store: Store, environment: str, service: str, version: str, status: str) -> None:
    record = store.create_deployment(new_deployment(environment, service, version))
    now = datetime.now(UTC)
    store.set_status(record.id, "in_progress", at=now)
    store.set_status(
        record.id, status, at=now, error_message=None if status == "completed" else "x"
    )


def test_dependency_facts_from_the_states_and_the_ledger(store: Store):
    deploy(store, "staging", "api", "1.0", "completed")
    deploy(store, "staging", "api", "1.1", "completed")  # deployed now: 1.1
    deploy(store, "staging", "worker", "2.0", "completed")
    deploy(store, "staging", "worker", "2.1", "failed")  # deployed still 2.0
    asked: list[set[tuple[str, str, str]]] = []
    ask = store.completed_versions

    def counting(triples):  # type: ignore[no-untyped-def]
        asked.append(set(triples))
        return ask(triples)

    store.completed_versions = counting  # type: ignore[method-assign]
    services = {"api": {"version": "1.0"}, "worker": {"version": "2.1"}, "db": {"version": "3"}}
    effective = {
        "staging": env("staging"),
        "production": env("production", services=services, depends_on=["staging"]),
    }
    wanted_11 = {**services, "api": {"version": "1.1"}}
    recorded = recorded_state(store, effective, None)
    # api 1.0 completed long ago (not deployed now): the ledger says so; 2.1 failed; no db.
    assert recorded.completed == {("staging", "api", "1.0")}
    assert asked == [
        {("staging", "api", "1.0"), ("staging", "worker", "2.1"), ("staging", "db", "3")}
    ]
    asked.clear()
    effective["production"] = env("production", services=wanted_11, depends_on=["staging"])
    recorded = recorded_state(store, effective, ["production"])
    assert recorded.completed == {("staging", "api", "1.1")}  # deployed: not asked
    assert asked == [{("staging", "worker", "2.1"), ("staging", "db", "3")}]
