"""The daemon's fleet summary (reconciler/fleet.py) equals the store's answer.

A real engine (real repository, deploy script, SQLite) runs random commits — versions
that deploy, versions that fail, environments that roll back — and operator retries,
with the summary wired as the daemon wires it: fed by the event hub, read by the
planner. After every step the summary, whole and per environment, equals
`Store.service_states`, and it read the whole fleet from the store once.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from reconciler.engine import Engine
from reconciler.events import EventHub
from reconciler.fleet import FleetSummary
from reconciler.store import Store
from tests import support
from tests.support import World, env_yaml

pytestmark = pytest.mark.timeout(120)

ENVIRONMENTS = {"alpha": ["api", "worker"], "beta": ["api", "web", "db"], "gamma": ["api"]}


def test_the_summary_equals_the_store_after_random_operations(tmp_path: Path) -> None:
    world = World(tmp_path)
    rng = random.Random(12)
    for env, services in ENVIRONMENTS.items():
        world.repo.set_env(env, {s: "1.0" for s in services})
    hub = EventHub()

    async def body(engine: Engine) -> None:
        summary = FleetSummary(engine.store)
        hub.on_event(summary.on_event)
        engine.planner.states_reader = summary.service_states
        store: Store = engine.store

        def check(step: str) -> None:
            assert summary.service_states() == store.service_states(), step
            env = rng.choice(sorted(ENVIRONMENTS))
            assert summary.service_states([env]) == store.service_states([env]), step

        await engine.sync("startup")
        await engine.idle()
        check("startup")
        for step in range(14):
            env = rng.choice(sorted(ENVIRONMENTS))
            roll = rng.random()
            if roll < 0.2:  # an operator's retry: no deployment event, the daemon marks
                service = rng.choice(ENVIRONMENTS[env])
                store.reset_streak(env, service)
                summary.mark(env)
            else:
                versions = {
                    s: f"{step}.{i}" + ("-fail" if rng.random() < 0.4 else "")
                    for i, s in enumerate(ENVIRONMENTS[env])
                }
                extra = {"on_failure": "rollback"} if roll < 0.5 else {}
                world.repo.write(f"{env}.yaml", env_yaml(env, versions, **extra))
                world.repo.commit(f"step {step}")
                await engine.sync("watch")
                await engine.idle()
                await engine.decisions()  # the planner reads through the summary
            check(f"step {step}")
        statuses = {d.status for d in store.history(limit=1000)}
        assert {"completed", "failed", "rolled_back"} <= statuses, statuses
        assert summary.reads["full"] == 1  # the rest came from memory + stale environments
        assert summary.reads["stale"] >= 5

    support.run_engine(world.config, body, listener=hub.deployment)
